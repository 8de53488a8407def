"""Reward models (objective: reward, `lmtailor score`) and preference pairs from a model's own answers
(`lmtailor pairs make`)."""

from __future__ import annotations

import json

import pytest
import torch

from lmtailor.cli import main
from lmtailor.objectives.reward import bradley_terry_loss

WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar", "papa",
         "romeo", "sierra", "tango", "victor", "whiskey", "yankee", "zulu", "quebec"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bradley_terry_loss_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    expected = -torch.log(torch.sigmoid(rc - rr)) + 0.01 * (rc + rr) ** 2
    torch.testing.assert_close(bradley_terry_loss(rc, rr, 0.01), expected, atol=1e-5, rtol=0)


def test_reward_run_learns_pairs_and_scores_text(tiny_model, tmp_path, capsys):
    rows = [{"prompt": f"what to do with {w} {i}", "chosen": f"ls -la {w}", "rejected": f"rm -rf {w}"}
            for i in range(2) for w in WORDS]
    data = _write(tmp_path / "prefs.jsonl", rows)
    run = tmp_path / "reward"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={run}", "objective=reward",
                 "max_steps=30", "batch_size=8", "lr=1e-2", "data.val_size=8", "lora.target_modules=all-linear",
                 "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] >= 0.9 > metrics["before"]["accuracy"] - 0.3, metrics["after"]
    capsys.readouterr()
    assert main(["score", str(run), "--prompt", "what to do with zulu 7", "--answer", "ls -la zulu",
                 "--answer", "rm -rf zulu"]) == 0
    good, bad = (float(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines())
    assert good > bad
    assert main(["score", str(run), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 40 and summary["accuracy"] >= 0.9
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 40
    # the reward run as grpo's reward
    from lmtailor.objectives.grpo import GrpoRewards, Rewarder

    rewarder = Rewarder(GrpoRewards(model=str(run)))
    good, bad = rewarder.batch(["what to do with zulu 7"] * 2, ["ls -la zulu", "rm -rf zulu"], ["", ""], [True, True])
    assert good > bad


def test_score_without_input_is_one_line_error(tiny_model, capsys):
    assert main(["score", str(tiny_model)]) == 2
    assert "score needs --data" in capsys.readouterr().err


def test_pairs_make_rejects_the_models_own_answers(tiny_model, tmp_path):
    from conftest import PAIRS

    data = _write(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in PAIRS])
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "make", str(tiny_model), "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
                 "--batch-size", "4", "--temperature", "1.5", "--stop-repeats", "0", "--no-progress"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(PAIRS)  # an untrained model sampling never answers with the reference
    assert {r["prompt"]: r["chosen"] for r in records} == dict(PAIRS)
    assert all(r["rejected"] != r["chosen"] for r in records)
    # the pairs train directly
    assert main(["validate", f"base_model={tiny_model}", f"data.path={out}", "objective=dpo"]) == 0
    rev = tmp_path / "rev.jsonl"
    assert main(["pairs", "make", str(tiny_model), "--data", str(data), "--out", str(rev), "--max-new-tokens", "6",
                 "--temperature", "1.5", "--reverse", "--limit", "3", "--no-progress"]) == 0
    assert [json.loads(x)["rejected"] for x in rev.read_text().splitlines()] == [a for _, a in PAIRS[:3]]
    assert all(json.loads(x)["chosen"] not in dict(PAIRS).values() for x in rev.read_text().splitlines())


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_preference_objectives_refuse_chat_data(tiny_model, tmp_path, capsys, objective):
    from conftest import PAIRS

    data = _write(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in PAIRS])
    assert main(["validate", f"base_model={tiny_model}", f"data.path={data}", f"objective={objective}"]) == 2
    assert "use data.format: preference" in capsys.readouterr().err


def test_pairs_make_skips_the_answering_runs_held_out_questions(tiny_model, tmp_path):
    from conftest import PAIRS

    rows = [{"instruction": f"{q} {i}", "output": a} for i in range(3) for q, a in PAIRS]
    data = _write(tmp_path / "sft.jsonl", rows)
    run = tmp_path / "sft"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={run}", "max_steps=1",
                 "data.val_size=5", "eval.before_after=false", "eval.generate_examples=0", "--no-progress"]) == 0
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "make", str(run), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
                 "--temperature", "1.5", "--stop-repeats", "0", "--no-progress"]) == 0
    prompts = {json.loads(x)["prompt"] for x in out.read_text().splitlines()}
    from lmtailor.config import load_config
    from lmtailor.data.validate import load_datasets

    _, val, _ = load_datasets(load_config(run / "config.yaml").data)
    assert len(prompts) <= 25 and not prompts & {ex.messages[0]["content"] for ex in val}


def test_pairs_make_shows_a_retrieval_run_its_neighbours_but_never_its_own_pair(tiny_model, tmp_path, monkeypatch):
    """A run trained with data.retrieved_examples answers each lone training request with its nearest other pairs
    in the prompt, as it trained, and never with the request's own pair (the answer would copy the reference)."""
    import lmtailor.generate as generate_module
    from conftest import PAIRS
    from lmtailor.data.retrieve import INTRO

    data = _write(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in PAIRS])
    run = tmp_path / "rag"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={run}", "max_steps=1",
                 "data.val_size=2", "data.retrieved_examples=1", "eval.before_after=false",
                 "eval.generate_examples=0", "--no-progress"]) == 0
    seen: list = []
    real = generate_module.generate

    def spy(model, tok, prompts, *args, **kwargs):  # the real decoding; the prompts it was given are kept
        seen.extend(prompts)
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "make", str(run), "--data", str(data), "--out", str(out), "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    answers = dict(PAIRS)
    assert len(seen) == len(PAIRS) - 2  # the run's 2 validation questions are skipped
    for prompt in seen:
        assert isinstance(prompt, str) and prompt.startswith(INTRO), prompt
        request = prompt.rsplit("\n", 1)[-1]
        assert request in answers and f"Answer: {answers[request]}" not in prompt, prompt
