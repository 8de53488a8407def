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
