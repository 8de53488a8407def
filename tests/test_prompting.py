"""Prompt engineering: task files, templates, few-shot selection, verbalizer scoring, cache, search, compare."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lmtailor.errors import ConfigError, DataError
from lmtailor.models import load_pretrained, load_tokenizer
from lmtailor.prompting.fewshot import fit_demos, make_selector
from lmtailor.prompting.predict import PromptRunner, PromptSpec, parse_answer
from lmtailor.prompting.scoring import ScoreCache, Scorer, answer_ids
from lmtailor.prompting.search import (
    Candidate,
    fit_schedule,
    halving_rounds,
    instruction_blocks,
    rounds_cost,
    successive_halving,
)
from lmtailor.prompting.task import Item, PromptTask, build_messages, load_task, make_items
from lmtailor.render import prompt_ids, prompt_text

TASK = {
    "name": "toy",
    "inputs": ["text"],
    "output": {"field": "label", "labels": {"neg": ["apple"], "pos": ["zebra", "yes"]}},
    "system": "Be brief.",
    "templates": ["Is this good? {{ text }}", "Text: {{ text }}\nGood or not?"],
    "metric": "accuracy",
    "few_shot": {"k": 2, "strategy": "balanced", "max_tokens": 400},
}


def task(**changes: object) -> PromptTask:
    return PromptTask.model_validate({**TASK, **changes})


def item(text: str, label: str = "neg", i: int = 0) -> Item:
    return Item({"text": text, "label": label}, f"toy.jsonl:{i + 1}")


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> tuple[nn.Module, object]:
    model = load_pretrained(str(tiny_model))
    model.eval()
    return model, load_tokenizer(str(tiny_model))


# ---- task files and templates ------------------------------------------------------------------------------------

def test_template_renders_exactly_through_the_chat_renderer(tiny: tuple) -> None:
    _, tok = tiny
    t = task()
    demos = [item("great stuff", "pos"), item("awful", "neg")]
    msgs = build_messages(t, t.templates[1], demos, item("so so"))
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Text: great stuff\nGood or not?"},
        {"role": "assistant", "content": "zebra"},  # the label's first verbalizer word
        {"role": "user", "content": "Text: awful\nGood or not?"},
        {"role": "assistant", "content": "apple"},
        {"role": "user", "content": "Text: so so\nGood or not?"},
    ]
    text = prompt_text(tok, msgs)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nText: great stuff\nGood or not?"
                    "<|im_end|>\n<|im_start|>assistant\nzebra<|im_end|>\n<|im_start|>user\nText: awful\nGood or "
                    "not?<|im_end|>\n<|im_start|>assistant\napple<|im_end|>\n<|im_start|>user\nText: so so\nGood or "
                    "not?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(tok, msgs) == list(tok(text, add_special_tokens=False)["input_ids"])


def test_template_with_unknown_field_names_template_and_field(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**TASK, "templates": ["ok {{ text }}", "bad {{ txet }}"]}))
    with pytest.raises(ConfigError, match=r"templates\[1\].*'txet'"):
        load_task(path)
    path.write_text(yaml.safe_dump({**TASK, "few_shot": {"kk": 2}}))
    with pytest.raises(ConfigError, match=r"few_shot.kk.*allowed keys: few_shot.k"):
        load_task(path)
    path.write_text(yaml.safe_dump({**TASK, "metric": "bleu"}))
    with pytest.raises(ConfigError, match="allowed values are accuracy, macro_f1"):
        load_task(path)


def test_record_missing_field_or_unknown_label_names_the_record() -> None:
    from lmtailor.data.example import Example

    t = task()
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'label'"):
        make_items([Example(text="x", source="d.jsonl:3", meta={})], t)
    with pytest.raises(DataError, match=r"d.jsonl:4: field 'label': label 'maybe'"):
        make_items([Example(text="x", source="d.jsonl:4", meta={"label": "maybe"})], t)


# ---- few-shot selection -----------------------------------------------------------------------------------------

def test_balanced_selection_balances_a_skewed_pool() -> None:
    pool = [item(f"ham message {i}", "neg", i) for i in range(90)] + [item(f"spam {i}", "pos", i) for i in range(10)]
    select = make_selector("balanced", pool, task(), seed=3)
    chosen = select(item("query"), 6)
    assert Counter(pool[i].fields["label"] for i in chosen) == {"neg": 3, "pos": 3}
    assert select(item("another query"), 6) == chosen  # fixed examples: every prompt shares the prefix
    random_pick = make_selector("random", pool, task(), seed=3)(item("q"), 20)
    assert len(set(random_pick)) == 20


def test_nearest_picks_the_planted_example_and_never_the_query_itself() -> None:
    pool = [item(f"weather report number {i} sunny and mild", "neg", i) for i in range(30)]
    pool.insert(17, item("invoice overdue payment reminder for account", "pos", 99))
    pool.append(item("is my invoice payment overdue", "pos", 100))  # identical to the query: must be skipped
    select = make_selector("nearest", pool, task(), seed=0)
    chosen = select(item("is my invoice payment overdue"), 3)
    assert chosen[0] == 17
    assert len(pool) - 1 not in chosen


def test_token_budget_drops_whole_examples(tiny: tuple) -> None:
    _, tok = tiny
    t = task()
    demos = [item("list files " * 12, "pos", i) for i in range(4)]
    query = item("short")
    full = len(fit_demos(t, t.templates[0], demos, query, tok, 10**6)[1])
    kept, ids = fit_demos(t, t.templates[0], demos, query, tok, full - 1)
    assert len(kept) == 3 and len(ids) <= full - 1
    text = tok.decode(ids)
    assert text.count(("list files " * 12).strip()) == 3  # each kept example is whole
    kept, ids = fit_demos(t, t.templates[0], demos, query, tok, 5)
    assert kept == [] and len(ids) > 5  # the query alone is never truncated
    a, b = item("first", "pos", 1), item("second", "neg", 2)
    assert fit_demos(t, t.templates[0], [a, b], query, tok, 10**6, order="reversed")[0] == [b, a]


# ---- scoring ----------------------------------------------------------------------------------------------------

def test_batched_prefix_scoring_equals_one_full_forward_per_answer(tiny: tuple) -> None:
    model, tok = tiny
    t = task()
    prompts = [prompt_ids(tok, build_messages(t, t.templates[0], [item("great", "pos")], item(q)))
               for q in ["list files", "tar", "the quick brown fox jumps over", "grep -r word"]]
    scores = Scorer(model, tok, "m", batch_size=3).label_scores(prompts, [["apple"], ["zebra", "yes"]])

    def full(p: list[int], word: str) -> float:
        ans = answer_ids(tok, word)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + ans])).logits[0].float(), -1)
        return float(sum(logp[len(p) - 1 + i, a] for i, a in enumerate(ans)))

    for p, row in zip(prompts, scores, strict=True):
        pos = math.log(math.exp(full(p, "zebra")) + math.exp(full(p, "yes")))
        assert row == pytest.approx([full(p, "apple"), pos], abs=1e-4)
    assert answer_ids(tok, "apple")[-1] == tok.eos_token_id  # the end of turn is part of the answer


def rig(model: nn.Module, tok: object, word: str, boost: float) -> nn.Module:
    """A copy of the model whose output head prefers the tokens of `word` by `boost` nats."""
    import copy

    rigged = copy.deepcopy(model)
    old = rigged.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data)
    head.bias.data.zero_()
    for t in answer_ids(tok, word)[:-1]:  # not EOS, which every answer ends with
        head.bias.data[t] = boost
    rigged.lm_head = head
    rigged.config.tie_word_embeddings = False
    return rigged


@pytest.mark.parametrize("preferred", ["neg", "pos"])
def test_verbalizer_picks_the_label_a_rigged_model_prefers(tiny: tuple, preferred: str) -> None:
    model, tok = tiny
    t = task()
    word = "apple" if preferred == "neg" else "zebra"
    rigged = rig(model, tok, word, 8.0)
    items = [item(x, "neg", i) for i, x in enumerate(["list files", "tar", "count lines", "pwd", "du -sh"])]
    runner = PromptRunner(t, Scorer(rigged, tok, f"rig-{preferred}"), [])
    preds = runner.predict(PromptSpec(t.templates[0]), items)
    assert preds.predictions == [preferred] * len(items)
    # Calibration against a content-free input cancels a preference that does not depend on the input.
    cal = runner.predict(PromptSpec(t.templates[0], calibrate=True), items)
    raw_margin = [abs(a - b) for a, b in preds.scores]
    cal_margin = [abs(a - b) for a, b in cal.scores]
    assert min(raw_margin) > 5 and max(cal_margin) < min(raw_margin) / 4


def test_cache_avoids_recomputation_and_persists(tiny: tuple, tmp_path: Path) -> None:
    model, tok = tiny
    t = task()
    pool = [item(f"example {i}", "pos" if i % 2 else "neg", i) for i in range(6)]
    items = [item(f"query {i}", "neg", i) for i in range(7)]
    spec = PromptSpec(t.templates[0], k=2, strategy="balanced")
    cache = ScoreCache(tmp_path / "scores.sqlite")
    scorer = Scorer(model, tok, "tiny", cache)
    first = PromptRunner(t, scorer, pool).predict(spec, items)
    assert scorer.calls == 7
    again = PromptRunner(t, scorer, pool).predict(spec, items)
    assert scorer.calls == 7 and again.scores == first.scores
    other = Scorer(model, tok, "tiny", ScoreCache(tmp_path / "scores.sqlite"))  # a later process
    PromptRunner(t, other, pool).predict(spec, items + [item("new one")])
    assert other.calls == 1
    different_model = Scorer(model, tok, "another-model", ScoreCache(tmp_path / "scores.sqlite"))
    PromptRunner(t, different_model, pool).predict(spec, items[:2])
    assert different_model.calls == 2


def test_free_text_answer_parsing_rule() -> None:
    assert parse_answer("  ls -la\nThis lists files.") == "ls -la"
    assert parse_answer("Here you go:\n```bash\ntar -xzvf a.tar.gz\n```\nDone") == "tar -xzvf a.tar.gz"
    assert parse_answer("\n\nAnswer: `pwd`") == "pwd"
    assert parse_answer("\"du -sh d\"") == "du -sh d"
    assert parse_answer("") == ""


# ---- search -------------------------------------------------------------------------------------------------------

def test_halving_schedule_and_its_cost() -> None:
    assert halving_rounds(12, 200, 16, 3) == [(12, 16), (4, 48), (2, 144), (1, 200)]
    assert rounds_cost(halving_rounds(12, 200, 16, 3)) == 12 * 16 + 4 * 32 + 2 * 96 + 56
    assert halving_rounds(1, 50, 16, 3) == [(1, 50)]
    for budget in (30, 100, 400, 5000):
        m, dev, rounds = fit_schedule(20, 200, 16, 3, budget)
        assert rounds_cost(rounds) <= budget or (m, dev) == (1, 1)


@pytest.mark.parametrize("budget", [60, 250, 2000])
def test_search_finds_the_planted_best_within_budget(budget: int) -> None:
    quality = {i: 0.3 + 0.01 * (i % 7) for i in range(24)}
    quality[13] = 0.9  # the planted best
    cands = [Candidate(i, PromptSpec(f"t{i} {{{{ text }}}}", k=i % 3), f"template {i}") for i in range(24)]
    calls = {"n": 0}
    seen: dict[int, int] = {}

    def evaluate(spec: PromptSpec, n: int) -> tuple[float, int]:
        cid = int(spec.template.split()[0][1:])
        new = n - seen.get(cid, 0)  # earlier examples come from the cache
        seen[cid] = n
        calls["n"] += new
        noise = 0.05 * math.sin(7 * cid + n)  # small subsets are noisy, but not enough to hide 0.9
        return quality[cid] + noise, new

    result = successive_halving(cands, evaluate, 200, budget, first=8, eta=3, seed=1)
    assert result.calls == calls["n"] <= budget
    tried = [c for c in result.candidates if c.scores]
    if any(c.id == 13 for c in tried):
        assert result.best.id == 13
    if budget == 2000:
        assert result.best.id == 13 and max(result.best.scores) == 200  # the winner is scored on the whole set
        assert len(tried) == 24
    else:
        assert 0 < len(tried) < 24 and tried[0].id == 0  # a small budget samples fewer; the baseline stays
    if budget == 250:
        assert len(tried) >= 12 and max(result.best.scores) >= 24
    again = successive_halving([Candidate(c.id, c.spec, c.origin) for c in cands], lambda s, n: (
        quality[int(s.template.split()[0][1:])] + 0.05 * math.sin(7 * int(s.template.split()[0][1:]) + n), n),
        200, budget, first=8, eta=3, seed=1)
    assert again.best.id == result.best.id  # same seed, same result
    assert [r["id"] for r in result.table()][0] == result.best.id
    dropped = [c for c in result.candidates if c.dropped_at is not None]
    assert dropped and all(len(c.scores) <= c.dropped_at for c in dropped)


def test_instruction_blocks_keep_template_lines() -> None:
    t = "Classify the message.\nBe careful.\n\nMessage: {{ text }}\nAnswer spam or ham."
    assert instruction_blocks(t) == [(0, 2), (4, 5)]


# ---- end to end through the CLI ----------------------------------------------------------------------------------

TOY_TEXTS = ["list files", "extract archive", "find by name", "count lines", "disk usage", "search text",
             "copy folder", "working directory", "show processes", "make folder"]


@pytest.fixture
def toy_task(tmp_path: Path) -> Path:
    rows = [{"text": f"{t} {j}", "label": "pos" if i % 3 == 0 else "neg"} for j in range(4)
            for i, t in enumerate(TOY_TEXTS)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {**TASK, "data": {"path": str(data), "format": "labeled", "val_fraction": 0.25},
            "dev_size": 12, "search": {"budget": 70, "paraphrases": 1, "shots": [0, 2],
                                       "strategies": ["balanced", "nearest"], "min_examples": 4}}
    path = tmp_path / "toy-task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cli_prompt_run_optimize_and_compare_with_a_soft_prompt_run(tiny_model: Path, toy_task: Path,
                                                                    tmp_path: Path, monkeypatch, capsys) -> None:
    from lmtailor.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = str(tiny_model)
    assert main(["prompt", "run", str(toy_task), "--model", model, "--out", "pr"]) == 0
    result = json.loads((tmp_path / "pr/metrics.json").read_text())
    assert result["examples"] == 10 and result["prompt"]["k"] == 2 and 0 <= result["score"] <= 1
    assert len((tmp_path / "pr/predictions.jsonl").read_text().splitlines()) == 10

    assert main(["prompt", "optimize", str(toy_task), "--model", model]) == 0
    folder = tmp_path / "runs/toy-prompt-search"
    summary = json.loads((folder / "candidates.json").read_text())
    assert summary["calls"] <= 70 and summary["candidates"] >= 6
    assert (folder / "search.png").read_bytes()[:4] == b"\x89PNG" and "Every candidate" in (
        folder / "report.html").read_text()
    best = load_task(folder / "best_task.yaml")
    assert best.templates[0] == summary["best"]["template"] and best.few_shot.k == summary["best"]["k"]

    # a soft prompt trained through the normal training loop on the task's own prompts
    assert main(["train", "--no-progress", f"base_model={model}", "method=prompt_tuning",
                 "soft_prompt.virtual_tokens=4",
                 f"data.path={tmp_path / 'toy.jsonl'}", "data.format=labeled", "data.val_fraction=0.25",
                 f"data.prompt_task={toy_task}", "max_steps=3", "batch_size=4", "lr=0.05", "output_dir=soft",
                 "eval.generate_examples=2", "max_length=64", "pack_length=128"]) == 0
    adapter = json.loads((tmp_path / "soft/model/adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 4

    capsys.readouterr()
    assert main(["compare", str(toy_task), "zero-shot", "few-shot", "optimized", "soft", "--model", model]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs/toy-compare/compare.json").read_text())
    assert [r["system"] for r in report["rows"]] == ["zero-shot", "few-shot", "optimized", "soft"]
    assert report["rows"][3]["kind"] == "fine-tuned" and report["examples"] == 10
    assert all(0 <= r["metrics"]["accuracy"] <= 1 for r in report["rows"])
    assert "| zero-shot |" in out and (tmp_path / "runs/toy-compare/compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.joinpath("configs/tasks").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_task_files_validate(path: Path) -> None:
    t = load_task(path)
    assert t.templates and t.metric


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_soft_prompt_loss_is_the_same_packed_or_padded_and_trains(tiny_model: Path, method: str) -> None:
    from lmtailor.data.example import Example
    from lmtailor.data.packing import collate
    from lmtailor.models import add_soft_prompt
    from lmtailor.objectives.causal import CausalLMLoss
    from lmtailor.render import tokenize_all

    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_model))
    model = add_soft_prompt(load_pretrained(str(tiny_model)), method, 8)
    exs = [Example(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]) for q, a in
           [("list files", "ls -la"), ("count lines", "wc -l f"), ("working directory", "pwd")]]
    seqs, _ = tokenize_all(tok, exs, 64)
    loss_fn = CausalLMLoss(model)
    packed = collate(seqs, tok.pad_token_id, packing=True, pack_length=256, share_prefix=True)
    assert (packed["segment_ids"] == 0).any()  # the system turn is a shared prefix of the packed row
    padded = collate(seqs, tok.pad_token_id, packing=False)
    a, n = loss_fn(**packed)
    b, m = loss_fn(**padded)
    assert int(n) == int(m) and float(a) == pytest.approx(float(b), rel=1e-5)
    # ... and equals the loss of PEFT's own forward (all logits), with the adapter on and off
    keep = padded["targets"] != -100
    for ctx in (torch.enable_grad(), model.disable_adapter()):
        with ctx:
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            ref = torch.nn.functional.cross_entropy(logits[:, -keep.shape[1]:][keep].float(),
                                                    padded["targets"][keep], reduction="sum")
            assert float(loss_fn(**padded)[0]) == pytest.approx(float(ref), rel=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) < 5000  # only the soft prompt
    opt = torch.optim.AdamW(trainable, lr=0.3)
    first = float(a / n)
    for _ in range(30):
        loss, n = loss_fn(**padded)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    assert float(loss / n) < first - 0.05  # a random tiny model barely listens to its context; still it learns


def test_free_text_task_generates_parses_scores_and_caches(tiny: tuple) -> None:
    model, tok = tiny
    t = PromptTask.model_validate({"inputs": ["input"], "output": {"field": "output"}, "metric": "chrf",
                                   "templates": ["Shell command to {{ input }}?"], "max_new_tokens": 6})
    pool = [Item({"input": q, "output": a}, f"p:{i}") for i, (q, a) in enumerate([("list files", "ls -la"),
                                                                                ("print directory", "pwd")])]
    items = [Item({"input": q, "output": a}, f"t:{i}") for i, (q, a) in enumerate([("count lines", "wc -l f"),
                                                                                 ("disk usage", "du -sh d")])]
    scorer = Scorer(model, tok, "tiny-free")
    runner = PromptRunner(t, scorer, pool)
    spec = PromptSpec(t.templates[0], k=1, strategy="nearest")
    scores, preds = runner.evaluate(spec, items)
    assert set(scores) >= {"chrf", "bleu", "rougeL", "exact_match"} and scorer.calls == 2
    assert preds.references == ["wc -l f", "du -sh d"] and all("\n" not in p for p in preds.predictions)
    again, _ = runner.evaluate(spec, items)
    assert scorer.calls == 2 and again == scores
    with pytest.raises(ConfigError, match="balanced"):
        runner.predict(PromptSpec(t.templates[0], k=1, strategy="balanced"), items)
