"""The streamed token cache (pretrain.cache): documents read one at a time, the same split and blocks as the
in-memory path, reuse and invalidation, lazy readers, and memory that does not grow with the corpus."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lmtailor.config import RunConfig
from lmtailor.errors import DataError

_WORDS = (
    "To list files in a directory use ls -la extract a tar archive find by name count lines show disk usage "
    "search text copy folder print the working quick brown fox jumps over lazy dog hello world answer question"
)
WORDS = sorted(set(_WORDS.split(" ")))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmtailor.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("stream")
    (root / "words.txt").write_text(" ".join(WORDS * 3))
    train_tokenizer(root / "words.txt", 600, root / "tok", "bpe", min_frequency=1)  # whole words: fast to tokenize
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _doc(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder mixing JSON Lines, CSV and text files, with duplicates, empty and whitespace-padded documents."""
    rng = random.Random(1)
    docs = [_doc(rng, rng.randint(5, 60)) for _ in range(40)]
    lines = [*docs[:25], docs[3], "   ", f"  {docs[7]}\n", docs[10]]  # 2 duplicates (one once stripped), 1 empty
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in lines))
    (root / "b.csv").write_text("text\n" + "".join(f'"{d}"\n' for d in docs[25:35]))
    for i, d in enumerate(docs[35:]):
        (root / f"c{i}.txt").write_text(d)
    return root


def _cfg(tmp_path: Path, data: dict, **extra) -> RunConfig:
    return RunConfig.model_validate(
        {
            "objective": "clm",
            "max_length": 16,
            "pretrain": {"cache": True},
            "output_dir": str(tmp_path / "run"),
            "data": data,
            **extra,
        }
    )


def _ids(blocks) -> list[list[int]]:
    return [list(blocks[i].input_ids) for i in range(len(blocks))]


@pytest.mark.parametrize(
    "data, extra",
    [
        ({"val_size": 3}, {}),
        ({"val_fraction": 0.2, "split_seed": 7}, {}),
        ({"val_fraction": 0.25, "max_examples": 9}, {"eval": {"max_examples": 2}}),
        ({"val_size": 0}, {}),
        ({"val_path": "VAL"}, {}),
    ],
)
def test_streamed_split_and_blocks_match_the_in_memory_path(tok, corpus, tmp_path, data, extra):
    from lmtailor.data.validate import load_datasets
    from lmtailor.pretrain.corpus import _blocks, cached_corpus, doc_text

    if data.get("val_path") == "VAL":  # two documents also in the training folder, one new, one repeated
        val = tmp_path / "val.jsonl"
        first = json.loads((corpus / "a.jsonl").read_text().splitlines()[0])["text"]
        val.write_text("".join(json.dumps({"text": t}) + "\n" for t in [first, "fox dog", "fox dog", WORDS[0]]))
        data = {"val_path": str(val)}
    cfg = _cfg(tmp_path, {"path": str(corpus), **data}, **extra)
    train_ex, val_ex, stats = load_datasets(cfg.data)
    val_ex = val_ex[: cfg.eval.max_examples]

    got = cached_corpus(cfg, tok, root=tmp_path / "cache")
    assert _ids(got.train) == list(_blocks([doc_text(e) for e in train_ex], tok, 16))
    assert _ids(got.val) == list(_blocks([doc_text(e) for e in val_ex], tok, 16))
    assert [(e.text, e.source) for e in got.val_examples] == [(e.text, e.source) for e in val_ex]
    assert {k: got.stats[k] for k in stats} == stats
    assert got.stats["train_blocks"] == len(got.train) and got.stats["val_items"] == len(got.val)
    assert got.stats["train_tokens"] == sum(len(b) for b in _ids(got.train))


def test_streamed_cache_is_reused_and_invalidated(tok, tok_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    from lmtailor.pretrain.corpus import cached_corpus

    cfg = _cfg(tmp_path, {"path": str(corpus), "val_size": 2})
    first = cached_corpus(cfg, tok, root=tmp_path / "cache")
    again = cached_corpus(cfg, tok, root=tmp_path / "cache")
    assert not first.stats["train_cache_reused"] and again.stats["train_cache_reused"]
    assert again.stats == {**first.stats, "train_cache_reused": True} and _ids(again.train) == _ids(first.train)
    assert sorted(p.name for p in first.train.path.parent.iterdir()) == [
        "stats.json",
        "train.arrow",
        "val-docs.arrow",
        "val.arrow",
    ]
    changed = [
        _cfg(tmp_path, {"path": str(corpus), "val_size": 2, "split_seed": 1}),  # split
        _cfg(tmp_path, {"path": str(corpus), "val_size": 2}, max_length=8),
    ]  # block length
    for other in changed:
        assert not cached_corpus(other, tok, root=tmp_path / "cache").stats["train_cache_reused"]
    grown = AutoTokenizer.from_pretrained(tok_dir)
    grown.add_tokens(["directory"])
    assert not cached_corpus(cfg, grown, root=tmp_path / "cache").stats["train_cache_reused"]  # tokenizer
    (corpus / "c0.txt").write_text("a changed document")
    assert not cached_corpus(cfg, tok, root=tmp_path / "cache").stats["train_cache_reused"]  # corpus
    assert len(list((tmp_path / "cache").glob("corpus-*"))) == 5


def test_streamed_documents_are_scrubbed(tok, tmp_path):
    from lmtailor.pretrain.corpus import cached_corpus

    path = tmp_path / "pii.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"mail jane{i}@acme-corp.io about {w}"}) + "\n" for i, w in enumerate(WORDS))
    )
    cfg = _cfg(tmp_path, {"path": str(path), "val_size": 2}, privacy={"scrub": True})
    got = cached_corpus(cfg, tok, root=tmp_path / "cache")
    assert got.audit["total"] == len(WORDS) == got.stats["pii_replaced"]
    assert all("@" not in e.text and "<EMAIL>" in e.text for e in got.val_examples)
    assert cached_corpus(cfg, tok, root=tmp_path / "cache").audit == got.audit  # kept with the cache


def test_mlm_and_span_train_from_the_streamed_cache_and_validate_maps_it(
    tok_dir, corpus, tmp_path, monkeypatch, capsys
):
    from lmtailor.cli import main

    monkeypatch.setenv("LMTAILOR_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data: {{path: '{corpus}', val_size: 3}}\nmax_length: 32\npack_length: 64\nmethod: full\n"
        "pretrain: {cache: true}\neval: {generate_examples: 0}\nbatch_size: 4\nmax_steps: 2\n"
    )
    for arch, objective in (("bert", "mlm"), ("t5", "span")):
        run = tmp_path / objective
        args = [
            f"objective={objective}",
            f"output_dir={run}",
            f"pretrain.scratch={{arch: {arch}, tokenizer: '{tok_dir}', layers: 1, hidden: 16, heads: 2, context: 64}}",
        ]
        assert main(["train", str(recipe), *args, "--no-progress"]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["data"]["train_blocks"] > 4 and metrics["after"]["loss"] > 0
        capsys.readouterr()
        assert main(["validate", str(recipe), *args]) == 0
        out = capsys.readouterr().out
        assert f"blocks {metrics['data']['train_blocks']}," in out and "cache_reused True" in out


# ---- readers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, head, row", [("d.jsonl", b"", b'{"text": "ok %d"}\n'), ("d.csv", b"text\n", b'"ok %d"\n')]
)
def test_line_readers_stream(tmp_path, name, head, row):
    """Records come out before the reader has seen the rest of the file: a bad byte far below stops it there."""
    from lmtailor.data.sources import read_records

    path = tmp_path / name
    good = head + b"".join(row % i for i in range(3000))
    path.write_bytes(good + b'"caf\xe9"\n')
    records = read_records(str(path))
    assert next(records).data == {"text": "ok 0"}
    with pytest.raises(
        DataError,
        match=rf"{name}: not UTF-8 text \(byte offset {len(good) + 4}, line "
        rf"{3001 + bool(head)}\)",
    ):
        list(records)


def test_blocks_survive_a_document_count_that_is_a_multiple_of_the_batch(tok):
    from lmtailor.pretrain.corpus import _blocks

    blocks = list(_blocks(["fox dog"] * 4, tok, 4, batch=2))
    assert sum(len(b) for b in blocks) == 4 * (len(tok("fox dog", add_special_tokens=False)["input_ids"]) + 1)
    assert list(_blocks([], tok, 4)) == []


# ---- memory -----------------------------------------------------------------------------------------------------

_MEASURE = """
import json, os, shutil, sys, threading, time
from pathlib import Path
from transformers import AutoTokenizer
from lmtailor.config import RunConfig
from lmtailor.pretrain.corpus import cached_corpus

tok_dir, warm, big, root = map(Path, sys.argv[1:5])
tok = AutoTokenizer.from_pretrained(tok_dir)

def cfg(path):
    return RunConfig.model_validate({"objective": "clm", "max_length": 256, "pretrain": {"cache": True},
                                     "data": {"path": str(path), "val_size": 5}})

cached_corpus(cfg(warm), tok, root=root / "warm")  # imports, tokenizer and writer buffers reach steady state
page = os.sysconf("SC_PAGE_SIZE")

def anonymous():  # resident minus file-backed pages: the memory-mapped cache itself is the kernel's to drop
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * page

base, peak, done = anonymous(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
got = cached_corpus(cfg(big), tok, root=root / "big")
done.set()
sampler.join()
print(json.dumps({"growth": peak[0] - base, "blocks": len(got.train), "docs": got.stats["read"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux /proc/self/statm")
def test_building_the_cache_does_not_hold_the_corpus_in_memory(tok_dir, tmp_path):
    """Peak memory while a 24 MB corpus is cached grows by well under half its size (the in-memory path takes
    about twice the corpus: the file's text and every document), measured in a fresh process."""
    rng = random.Random(0)

    def write(path: Path, size: int) -> int:
        with open(path, "w") as f:
            while f.tell() < size:
                f.write(json.dumps({"text": _doc(rng, rng.randint(200, 1200))}) + "\n")
            return f.tell()

    write(tmp_path / "warm.jsonl", 1 << 20)
    size = write(tmp_path / "big.jsonl", 24 << 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            str(tok_dir),
            str(tmp_path / "warm.jsonl"),
            str(tmp_path / "big.jsonl"),
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["blocks"] > 10_000 and got["docs"] > 3000
    assert got["growth"] < size / 2, f"grew {got['growth'] / 2**20:.1f} MB for a {size / 2**20:.0f} MB corpus"
