"""`lmtailor auto`: objective from the data, a successive-halving search on a dev split, the winner trained and
reported against the baselines, all within the budget."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from lmtailor.cli import main

WORDS = {"sport": ["goal", "match", "league", "coach"], "money": ["bank", "loan", "interest", "credit"]}


def test_auto_classifies_a_labeled_file_within_its_budget(tiny_model, tmp_path, capsys):
    rows = [{"text": f"the {WORDS[lab][i % 4]} story number {i}", "label": lab}
            for i in range(60) for lab in ("sport", "money")]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "auto"
    t0 = time.monotonic()
    assert main(["auto", str(data), "--budget", "150s", "--trials", "2", "--base-model", str(tiny_model),
                 "--out", str(out)]) == 0
    elapsed = time.monotonic() - t0
    report = json.loads((out / "auto.json").read_text())
    assert report["format"] == "labeled" and report["objective"] == "classify"
    assert 1 <= len(report["candidates"]) <= 2 and set(report["best_params"]) <= {"lr", "lora.r", "epochs"}
    # the test split was held out from the search: trials trained on train.jsonl only
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    test = (out / "data" / "test.jsonl").read_text().splitlines()
    assert not set(train) & set(test) and len(train) + len(test) == 120
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"} and "macro_f1" in report["after"]
    assert report["verdict"] and (out / "final" / "model").is_dir()
    # a tiny model's steps are cheap: the plan paid for the 2 trials asked; the final report is on the test split
    assert report["plan"]["trials"] == 2 and report["plan"]["step_s"] > 0
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["evaluated_on"] == "test" and final["after"]["examples"] == len(test)
    md = (out / "auto.md").read_text()
    assert "objective **classify**" in md and "tfidf_logreg" in md and "| 0 |" in md
    assert elapsed < 150 * 1.5  # the budget covers training; loading and evaluation add a little


def test_the_plan_searches_only_when_the_budget_pays_for_it():
    from lmtailor.auto import MIN_TRIAL_STEPS, MIN_TRIALS, plan_search

    slow = {"step_s": 2.3, "eval_s": 0.0, "eval_every": 0}  # a 135M model on 2 CPU cores
    plan = plan_search(20 * 60, slow, trials=6, search_share=0.4)
    assert plan["trials"] == 0 and plan["search_s"] == 0 and "no search" in plan["reason"]
    assert plan["steps_fit"] == int(20 * 60 * 0.85 / 2.3)
    fast = {"step_s": 0.05, "eval_s": 1.0, "eval_every": 20}  # the same budget on a GPU
    plan = plan_search(20 * 60, fast, trials=6, search_share=0.4)
    assert plan["trials"] == 6 and plan["search_s"] == 20 * 60 * 0.85 * 0.4
    # the trials that fit, never more than asked, and a search only with enough of them
    some = {"step_s": 1.0, "eval_s": 0.0, "eval_every": 0}
    seconds = (MIN_TRIALS + 1) * MIN_TRIAL_STEPS / 0.4 / 0.85 + 1
    assert plan_search(seconds, some, trials=6, search_share=0.4)["trials"] == MIN_TRIALS + 1
    assert plan_search(seconds, some, trials=2, search_share=0.4)["trials"] == 2
    assert plan_search(seconds / 2, some, trials=6, search_share=0.4)["trials"] == 0


def test_adapters_widen_only_when_the_budget_fits_every_planned_step_with_them():
    from lmtailor.auto import widen_adapters

    narrow, wide = {"step_s": 2.0, "planned": 244}, {"step_s": 2.6, "planned": 244}
    assert widen_adapters(narrow, wide, {"steps_fit": 379}).startswith("lora.target_modules=all-linear")
    kept = widen_adapters(narrow, wide, {"steps_fit": 150})
    assert kept.startswith("adapters stay") and "150 of the 244 planned steps" in kept and "2.60 s" in kept


def test_long_documents_are_cut_so_the_budget_sees_an_epoch():
    from lmtailor.auto import MIN_LENGTH, shorter_length

    probe = {"max_length": 512, "per_epoch": 60}
    assert shorter_length("classify", probe, {"steps_fit": 30}) == 256  # half an epoch fits: half the length
    assert shorter_length("classify", probe, {"steps_fit": 3}) == MIN_LENGTH  # never shorter than the floor
    assert shorter_length("classify", probe, {"steps_fit": 60}) is None  # an epoch fits already
    assert shorter_length("sft", probe, {"steps_fit": 30}) is None  # answers would be cut
    assert shorter_length("classify", {"max_length": 96, "per_epoch": 60}, {"steps_fit": 10}) is None


def test_a_forward_pass_is_charged_half_a_step_on_a_frozen_model_and_a_third_when_every_weight_trains(
        tiny_model, tmp_path):
    """A validation pass (and auto's estimate of a probe head's forward pass over the training items) is charged as
    forward-only work: the backward of LoRA on a frozen model computes the activations' gradients but almost no
    weights', so a forward is about half of a step, not the third it is when every weight trains (charging a third
    under LoRA put python-docs' probe at 229 s where it took 459-482 s). The measured time per token cancels out of
    eval_s / step_s, so the share the estimate used can be read back exactly."""
    from lmtailor.auto import head_probe_seconds
    from lmtailor.config import build_config
    from lmtailor.train import measure_recipe

    rows = [{"text": f"the {WORDS[lab][i % 4]} story number {i} " + "word " * (i % 7), "label": lab}
            for i in range(24) for lab in ("sport", "money")]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shares = {}
    for method in ("lora", "full"):
        cfg = build_config({"base_model": str(tiny_model), "objective": "classify", "method": method,
                            "data": {"path": str(data), "val_size": 8}, "output_dir": str(tmp_path / method)})
        probe = measure_recipe(cfg, probe_steps=2)
        assert probe["val_items"] == 8 and probe["val_tokens"] > 0 and probe["train_tokens"] > probe["val_tokens"]
        # step_s = per_token * train_tokens / per_epoch * 1.05 and eval_s = per_token * share * val_tokens
        shares[method] = (probe["eval_s"] / probe["step_s"] * probe["train_tokens"] * 1.05
                          / (probe["per_epoch"] * probe["val_tokens"]))
        # the probe head reads every training item once: the validation pass scaled by tokens, not by item counts
        assert head_probe_seconds(probe) == pytest.approx(probe["eval_s"] * probe["train_tokens"] / probe["val_tokens"])
    assert shares["full"] == pytest.approx(1 / 3, rel=1e-6)
    assert 0.45 < shares["lora"] <= 0.5, shares


def test_retrieval_is_chosen_when_neighbours_carry_the_answer():
    import random

    from lmtailor.data.example import Example
    from lmtailor.fitting import RETRIEVED, choose_retrieval

    def chat(q: str, a: str) -> Example:
        return Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    tools = {"archive": "tar -xzf", "files": "ls -la", "lines": "wc -l", "space": "du -sh", "text": "grep -rn"}
    # each request's id is its own, so the topic word is what similar requests share
    similar = [chat(f"show the {topic} of entry {topic[:2]}{i}", f"{cmd} {topic[:2]}{i}") for i in range(12)
               for topic, cmd in tools.items()]
    # ordered by topic, as data files often are (a contiguous dev tail would hold a whole topic the pool lacks)
    by_topic = sorted(similar, key=lambda ex: ex.messages[1]["content"].split()[0])
    assert choose_retrieval(by_topic)["k"] == RETRIEVED
    random.Random(0).shuffle(similar)
    picked = choose_retrieval(similar)
    assert picked["k"] == RETRIEVED and picked["nearest_chrf"] > picked["copy_chrf"]
    rng = random.Random(1)
    unrelated = [chat(f"show the {topic} of item {i}", "".join(rng.choice("qxzjvk") for _ in range(12)))
                 for i in range(12) for topic in tools]
    assert choose_retrieval(unrelated)["k"] == 0 and "no retrieved examples" in choose_retrieval(unrelated)["reason"]


def test_auto_tailors_instruction_pairs_and_chooses_retrieval(tiny_model, tmp_path):
    """alpaca records are written back as chats (the format the final recipe reads), and similar requests whose
    answers carry over turn retrieval on."""
    cmds = {"archive": "tar -xzf", "files": "ls -la", "lines": "wc -l", "space": "du -sh", "text": "grep -rn"}
    rows = [{"instruction": f"show the {topic} of item {i}", "output": f"{cmd} item{i}"}
            for i in range(12) for topic, cmd in cmds.items()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "auto"
    assert main(["auto", str(data), "--budget", "60s", "--trials", "1", "--base-model", str(tiny_model),
                 "--out", str(out)]) == 0
    report = json.loads((out / "auto.json").read_text())
    assert report["format"] == "alpaca" and report["objective"] == "sft"
    assert report["plan"]["retrieval"]["k"] >= 1
    assert json.loads((out / "data" / "train.jsonl").read_text().splitlines()[0])["messages"][0]["role"] == "user"
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["evaluated_on"] == "test" and "nearest_answer" in final["baselines"] and "chrf" in final["after"]
    # the adapters' width was decided by a timed probe, and the final recipe says what was decided
    widened = any(c.startswith("lora.target_modules=all-linear") for c in report["plan"]["chosen_from_data"])
    recipe = yaml.safe_load((out / "final.yaml").read_text())
    assert (recipe.get("lora", {}).get("target_modules") == "all-linear") is widened


def test_auto_on_an_encrypted_file_writes_no_plaintext(tiny_model, tmp_path, monkeypatch):
    """An encrypted input: the splits auto writes are encrypted with the same key, and no file under its output
    folder holds a planted marker in plaintext."""
    from lmtailor import crypto

    monkeypatch.setenv(crypto.DEFAULT_KEY_ENV, crypto.new_key_text())
    marker = "ZQXJ-MARKER-7731"
    rows = [{"text": f"{marker} the {WORDS[lab][i % 4]} story number {i}", "label": lab}
            for i in range(30) for lab in ("sport", "money")]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "news.jsonl.enc"
    crypto.encrypt_file(plain, data)
    plain.unlink()
    out = tmp_path / "auto"
    assert main(["auto", str(data), "--budget", "40s", "--trials", "1", "--base-model", str(tiny_model),
                 "--out", str(out)]) == 0
    assert not (out / "data" / "train.jsonl").exists() and crypto.is_encrypted(out / "data" / "train.jsonl.enc")
    assert crypto.is_encrypted(out / "data" / "test.jsonl.enc")
    assert json.loads((out / "auto.json").read_text())["objective"] == "classify"
    leaked = [p for p in out.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert not leaked, f"plaintext marker in {leaked}"
