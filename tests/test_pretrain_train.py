"""Pretraining through the real CLI and training loop: clm / mlm / span from scratch, the token cache across runs,
depth-pruned continued pretraining, and `eval --metric perplexity`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtailor.cli import main

FAST = ["max_steps=14", "batch_size=4", "lr=3e-3", "data.val_size=4", "max_length=32", "pack_length=64",
        "method=full", "warmup_ratio=0", "eval.generate_examples=0", "--no-progress"]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [" ".join(CORPUS[i:i + 4]) + f" ({i})" for i in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import CORPUS
    from lmtailor.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("pt")
    (root / "corpus.txt").write_text("\n".join(CORPUS))
    train_tokenizer(root / "corpus.txt", 400, root / "tok", "bpe", min_frequency=1)
    return root / "tok"


def _scratch(tok: Path, arch: str) -> list[str]:
    return [f"pretrain.scratch={{arch: {arch}, tokenizer: '{tok}', layers: 2, hidden: 32, heads: 4, context: 64}}"]


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _learns(run: Path) -> dict:
    losses = [r["loss"] for r in _history(run)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.95, losses
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    return metrics


@pytest.mark.parametrize("arch, objective", [("llama", "clm"), ("bert", "mlm"), ("t5", "span")])
def test_objectives_from_scratch_learn_and_save_hf_folders(tok_dir, text_data, tmp_path, arch, objective, capsys):
    import transformers

    run = tmp_path / objective
    extra = ["mlm.whole_word_mask=true"] if objective == "mlm" else []
    assert main(["train", f"objective={objective}", f"data.path={text_data}", f"output_dir={run}", *FAST,
                 *_scratch(tok_dir, arch), *extra]) == 0
    assert "MFLOPs per training token" in capsys.readouterr().out
    metrics = _learns(run)
    auto = {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "span": "AutoModelForSeq2SeqLM"}[objective]
    model = getattr(transformers, auto).from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 2
    if objective == "mlm":
        assert 0 <= metrics["after"]["masked_accuracy"] <= 1 and metrics["after"]["pseudo_perplexity"] > 1


def test_token_cache_is_reused_by_a_second_run(tok_dir, text_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LMTAILOR_CACHE", str(tmp_path / "cache"))
    # eval_every=1: validation reads the memory-mapped blocks too (by position, they do not slice)
    args = ["objective=clm", f"data.path={text_data}", *FAST, "max_steps=2", "pretrain.cache=true", "eval_every=1",
            *_scratch(tok_dir, "llama")]
    for name in ("a", "b"):
        assert main(["train", f"output_dir={tmp_path / name}", *args]) == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text())["data"] for n in "ab")
    assert a["train_cache_reused"] is False and b["train_cache_reused"] is True
    assert a["train_cache"] == b["train_cache"] and a["train_blocks"] == b["train_blocks"] > 4


def test_nsp_pairs_train(tok_dir, text_data, tmp_path):
    run = tmp_path / "nsp"
    assert main(["train", "objective=mlm", "mlm.nsp=true", f"data.path={text_data}", f"output_dir={run}", *FAST,
                 "max_steps=3", *_scratch(tok_dir, "bert")]) == 0
    assert json.loads((run / "metrics.json").read_text())["data"]["train_random_pairs"] > 0


def test_pruned_continued_pretraining_reloads_and_evaluates_perplexity(tiny_model, text_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "dapt"
    assert main(["train", f"base_model={tiny_model}", "objective=clm", f"data.path={text_data}", f"output_dir={run}",
                 *FAST, "pretrain.keep_layers=1", "pretrain.rope_factor=2", "clm.eval_context=16"]) == 0
    metrics = _learns(run)
    assert metrics["after"]["window_perplexity"] < metrics["before"]["window_perplexity"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 1 and model.config.rope_parameters["factor"] == 2.0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(text_data), "--metric", "perplexity", "--context", "16",
                 "--stride", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "perplexity" and out["context"] == 16 and 1 < out["perplexity"] < 400
