"""Shared fixtures: a tokenizer trained here and a 2-layer, 64-wide llama model built from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and spinning OpenMP threads crawl when other processes share the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CORPUS = [
    "To list files in a directory use ls -la",
    "To extract a tar archive use tar -xzvf archive.tar.gz",
    "To find files by name use find . -name pattern",
    "To count lines in a file use wc -l file.txt",
    "To show disk usage use du -sh folder",
    "To search text use grep -r word .",
    "To copy a folder use cp -r src dst",
    "To print the working directory use pwd",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system hello world answer question",
] * 20

PAIRS = [
    ("list files", "ls -la"),
    ("extract archive", "tar -xzvf a.tar.gz"),
    ("find by name", "find . -name x"),
    ("count lines", "wc -l f.txt"),
    ("disk usage", "du -sh d"),
    ("search text", "grep -r w ."),
    ("copy folder", "cp -r a b"),
    ("working directory", "pwd"),
    ("show processes", "ps aux"),
    ("make folder", "mkdir -p d"),
]


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch | None = None):  # noqa: ANN201
    """benchmarks/<name>.py as a module (with `monkeypatch`, benchmarks/ on sys.path for its own imports)."""
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_tiny(folder: Path, layers: int = 2, width: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtailor.tokenizers import train_bpe

    tok = train_bpe(CORPUS, vocab_size=400, min_frequency=1)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny llama model + its BPE tokenizer (ChatML template, EOS <|im_end|>)."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    """Ten alpaca records."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    return path


def lora_batch(tiny_model: Path, data: Path, *overrides: str, mixed: str = "no") -> tuple:
    """(model, loss module, batch): the tiny model with an all-linear LoRA (r=4) whose B matrices are given values
    (they start at zero), so every adapter weight gets a gradient, and a batch of the first six training items.
    `mixed`: the run's mixed precision, which decides what the frozen weights are kept in."""
    import torch

    from lmtailor.config import load_config
    from lmtailor.objectives import get_objective
    from lmtailor.rundata import build_run_data
    from lmtailor.train import _apply_method

    cfg = load_config(None, [f"base_model={tiny_model}", f"data.path={data}", "method=lora", "lora.r=4",
                             "lora.target_modules=all-linear", *overrides])
    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    items = build_run_data(objective, ctx, write_audit=False).train_items
    torch.manual_seed(0)
    model = _apply_method(objective.model(ctx, torch.float32), ctx.cfg, mixed=mixed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    batch = objective.collate(ctx, [items[i] for i in range(min(6, len(items)))])
    return model, objective.build(ctx, model), batch

