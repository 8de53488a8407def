"""Token cache for corpora larger than memory: text is tokenized once into a memory-mapped Arrow file of blocks.

The cache key hashes the tokenizer (its full serialized definition and special tokens), the corpus text and the
block length, so a second run with the same inputs maps the existing file (no tokenizing), and a changed
tokenizer or corpus writes a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmtailor.io import cache_dir
from lmtailor.render import Tokenized


def tokenizer_digest(tok: Any) -> str:
    """Hash of everything that decides how a tokenizer splits text."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([tok.eos_token_id, tok.pad_token_id, str(tok.added_tokens_encoder)], default=str).encode())
    return h.hexdigest()


def text_digest(texts: Iterable[str]) -> str:
    """Hash of a sequence of documents (order matters; a document boundary is part of the content)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", errors="replace")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _blocks(texts: Iterable[str], tok: Any, block: int, batch: int = 256) -> Iterator[list[int]]:
    """Documents joined with EOS and cut into consecutive `block`-token pieces (the last one may be shorter)."""
    buf: list[int] = []
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal buf
        for ids in tok(pending, add_special_tokens=False)["input_ids"]:
            buf += ids + [tok.eos_token_id]
            while len(buf) >= block:
                yield buf[:block]
                buf = buf[block:]
        pending.clear()

    for t in texts:
        if t:
            pending.append(t)
        if len(pending) >= batch:
            yield from flush()
    yield from flush()
    if len(buf) > 1:
        yield buf


class TokenBlocks(Sequence[Tokenized]):
    """The blocks of a cache file, read on demand from the memory map (the corpus is never all in memory)."""

    def __init__(self, dataset: Any, path: Path, reused: bool) -> None:
        self.dataset = dataset
        self.path = path
        self.reused = reused

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tokenized:  # type: ignore[override]
        ids = self.dataset[int(i)]["input_ids"]
        return Tokenized(ids, list(ids), f"{self.path.name}#{i}")

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.dataset.with_format("arrow")["input_ids"].to_pylist()))


def token_cache(texts: Callable[[], Iterable[str]], tok: Any, block: int, root: str | Path | None = None,
                digest: str | None = None) -> TokenBlocks:
    """Memory-mapped blocks of `block` tokens of a corpus, built on first use and reused after.

    Args:
        texts: returns a fresh iterable over the documents (called once to hash them unless `digest` is given,
            and once more to tokenize them when the cache misses); streaming, so the corpus may exceed memory.
        tok: the tokenizer.
        block: tokens per block (the context length).
        root: cache folder (default `$LMTAILOR_CACHE/tokens`).
        digest: a precomputed corpus hash (e.g. of file names, sizes and mtimes) to skip hashing the text.
    """
    from datasets import Dataset, Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    corpus = digest or text_digest(texts())
    key = hashlib.sha256(f"{tokenizer_digest(tok)}:{corpus}:{block}".encode()).hexdigest()[:24]
    folder = Path(root) if root else cache_dir("tokens")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"blocks-{key}.arrow"
    reused = path.is_file()
    if not reused:
        tmp = folder / f".blocks-{key}.{os.getpid()}.tmp"
        features = Features({"input_ids": List(Value("int32"))})
        with ArrowWriter(features=features, path=str(tmp)) as writer:
            for ids in _blocks(texts(), tok, block):
                writer.write({"input_ids": ids})
            writer.finalize()
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache that a later run would trust
    return TokenBlocks(Dataset.from_file(str(path)), path, reused)


def file_digest(files: Sequence[Path]) -> str:
    """A cheap corpus key from file paths, sizes and modification times (no reading)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
