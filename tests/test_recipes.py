"""Every shipped recipe in configs/ validates through the data assembly `train` runs (`lmtailor validate`).

Tests stay offline, so each recipe's catalog data is replaced by a small local file of the same format; everything
else (objective, its settings, the bundled base model's tokenizer and chat template, prompt-task rendering,
packing limits, schedule) is the recipe's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import CORPUS, PAIRS
from lmtailor.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def _local_data(catalog: str, folder: Path) -> tuple[Path, int]:
    """A small local stand-in for a catalog dataset, in the catalog's format; returns (path, records)."""
    if catalog == "shell-commands":  # alpaca
        rows = [{"instruction": f"To {q} ({i})", "output": a} for i in range(12) for q, a in PAIRS]
    elif catalog == "sms-spam":  # labeled
        rows = [{"text": f"WIN a free prize {i}, call 0800 now" if i % 4 == 0 else f"see you at {i} tonight",
                 "label": "spam" if i % 4 == 0 else "ham"} for i in range(120)]
    elif catalog == "python-docs":  # text: one document per file
        docs = folder / "docs"
        docs.mkdir()
        for i in range(12):
            (docs / f"page{i}.rst").write_text("\n".join(CORPUS[i:i + 12]) + f"\npage {i}\n")
        return docs, 12
    elif catalog == "pairs":  # preference: what `lmtailor pairs make` writes
        rows = [{"prompt": f"To {q} ({i})", "chosen": a, "rejected": f"{a} {a}"} for i in range(12) for q, a in PAIRS]
    else:
        raise AssertionError(f"no local stand-in for catalog:{catalog}; add one to this test")
    path = folder / f"{catalog}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


def test_every_shipped_recipe_is_covered():
    assert {p.stem for p in RECIPES} >= {"quickstart", "classify-spam", "seq2seq-shell", "dapt",
                                         "pretrain-from-scratch", "spam-sft", "spam-soft-prompt", "dpo-shell",
                                         "reward-shell", "grpo-shell"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for these tests: the bundled model is converted once, token caches stay out of ~/.cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates_through_the_training_data_assembly(recipe: Path, tmp_path: Path, cache: Path,
                                                                    monkeypatch, capsys):
    from lmtailor.tokenizers import train_bpe

    monkeypatch.chdir(CONFIGS.parent)  # recipes name other files relative to the repository (prompt tasks)
    monkeypatch.setenv("LMTAILOR_CACHE", str(cache))
    cfg = yaml.safe_load(recipe.read_text())
    source = cfg["data"]["path"]
    overrides = []
    if cfg.get("data", {}).get("format") == "preference":  # pairs a documented first step makes from a run
        source = "catalog:pairs"
    if str(cfg.get("base_model", "")).startswith("runs/"):  # a model a documented first step exports: the bundled
        overrides.append("base_model=smollm2-135m-instruct")  # one here
    assert source.startswith("catalog:"), "shipped recipes use the built-in catalog"
    path, n = _local_data(source.removeprefix("catalog:"), tmp_path)
    overrides.append(f"data.path={path}")
    if cfg.get("data", {}).get("max_examples"):
        overrides.append(f"data.max_examples={min(cfg['data']['max_examples'], 60)}")
    scratch = (cfg.get("pretrain") or {}).get("scratch")
    if scratch:  # the recipe's tokenizer is trained by a documented first step; train a small one here
        tok_dir = tmp_path / "tok"
        train_bpe(CORPUS, vocab_size=300, min_frequency=1).save_pretrained(tok_dir)
        overrides.append(f"pretrain.scratch.tokenizer={tok_dir}")
    if (cfg.get("retrieval") or {}).get("kb"):  # the recipe's knowledge base is built by a documented first step
        from lmtailor.knowledge.base import build_kb

        sheets = tmp_path / "sheets"
        sheets.mkdir()
        (sheets / "sheet.txt").write_text("\n\n".join(f"# {q}\n{a}" for q, a in PAIRS))
        build_kb([str(sheets)], tmp_path / "kb", embedder=None, progress=False)
        overrides += [f"retrieval.kb={tmp_path / 'kb'}", "retrieval.mode=bm25"]
    assert main(["validate", str(recipe), *overrides]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"recipe OK: objective {cfg.get('objective', 'sft')}"), out
    # what the objective made of the records: rendered chats, labeled examples or corpus blocks
    expected = {"classify": "examples", "clm": "blocks" if (cfg.get("pretrain") or {}).get("cache") else
                "sequences", **dict.fromkeys(["dpo", "ipo", "orpo", "simpo", "reward"], "pairs"),
                "grpo": "prompts"}.get(cfg.get("objective", "sft"), "sequences")
    assert f"items: {expected} " in out, out
    if (cfg.get("data") or {}).get("prompt_task"):
        # rendered through the prompt task into yes/no chats: answers are supervised, so chat stats appear
        assert "supervised_tokens" in out and "records read" in out
    assert f"{n} records read" in out or "blocks" in out


def test_validate_runs_the_prompt_task_rendering_and_the_scrub(tmp_path: Path, tiny_model: Path, capsys):
    """validate checks what training would train on: spam-sft's SMS texts become yes/no chats, and with
    privacy.scrub the PII in them is replaced before tokenizing, exactly as train does."""
    from lmtailor.config import load_config
    from lmtailor.objectives import get_objective
    from lmtailor.rundata import build_run_data

    path, _ = _local_data("sms-spam", tmp_path)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["text"] = "mail me at jane.doe@acme.org for the prize"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CONFIGS / "tasks" / "spam.yaml"
    args = [f"base_model={tiny_model}", f"data.path={path}", "data.format=labeled", f"data.prompt_task={task}",
            "privacy.scrub=true", "data.val_size=10"]
    assert main(["validate", *args]) == 0
    out = capsys.readouterr().out
    assert "PII values replaced" in out and "supervised_tokens" in out
    cfg = load_config(None, args)
    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    data = build_run_data(objective, ctx, write_audit=False)
    texts = [ctx.tokenizer.decode(data.train_items[i].input_ids) for i in range(len(data.train_items))]
    assert all("Answer yes or no" in t for t in texts)  # the task's template, not the bare SMS text
    assert not any("jane.doe@acme.org" in t for t in texts) and any("<EMAIL>" in t for t in texts)
