"""Token cache for corpora larger than memory: text is tokenized once into a memory-mapped Arrow file of blocks.

The cache key hashes the tokenizer (its full serialized definition and special tokens), the corpus (its files'
paths, sizes and modification times, or its text) and the block length, so a second run with the same inputs maps
the existing file (no tokenizing), and a changed tokenizer or corpus writes a new one.

`cached_corpus` is what a run with `pretrain.cache` uses: it reads the documents of `data.path` one at a time,
splits them as `load_datasets` would, and writes the training and validation blocks as it goes, so memory holds
one tokenizer batch and 8 bytes per document, never the corpus.

In a run that seals its outputs (`encrypt_outputs`), the cache is sealed too: it is built in RAM (/dev/shm, via
`crypto.plain_staging`), every file is encrypted into the cache folder, and a run reads it back by decrypting it
into memory with the run's key. Token ids are the text in another alphabet, and the validation documents are the
text itself, so neither may rest on disk in plaintext. The price: a sealed cache is held in memory while a run
uses it, instead of being memory-mapped from disk. A cache sealed with another key is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from lmtailor import crypto
from lmtailor.config import PrivacySettings, RunConfig
from lmtailor.data.example import Example
from lmtailor.data.sources import local_files
from lmtailor.data.validate import ExampleReader, no_training_left, split_rank, strip_example, val_count
from lmtailor.errors import DataError, EncryptionError
from lmtailor.io import atomic_dir, cache_dir
from lmtailor.render import Tokenized, encode_long

_log = logging.getLogger(__name__)
CACHE_VERSION = 2  # part of every cache key: a change in what a cache holds must not reuse an older one
TRAIN, VAL = 1, 2  # document roles; 0: not used (empty, a duplicate, in the validation file, or past a cap)


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


def doc_text(example: Example) -> str:
    """The text a document contributes to a corpus (a conversation's turns joined by newlines)."""
    return example.text if example.text is not None else "\n".join(m["content"] for m in example.messages or [])


def _blocks(texts: Iterable[str], tok: Any, block: int, batch: int = 256, batch_chars: int = 1 << 16
            ) -> Iterator[list[int]]:
    """Documents joined with EOS and cut into consecutive `block`-token pieces (the last one may be shorter).

    Texts are tokenized `batch` documents (or about `batch_chars` characters) at a time, so a stream of any length
    holds one batch in memory; a document longer than `batch_chars` is tokenized alone, in windows (encode_long).
    """
    buf: list[int] = []
    pending: list[str] = []
    chars = 0

    def flush() -> Iterator[list[int]]:
        nonlocal buf, chars
        if not pending:  # tokenizers fail on an empty batch (no documents, or a count that is a multiple of batch)
            return
        docs = [encode_long(tok, pending[0])] if len(pending[0]) > batch_chars else \
            tok(pending, add_special_tokens=False)["input_ids"]
        for ids in docs:
            buf += ids
            buf.append(tok.eos_token_id)
            full = len(buf) - len(buf) % block
            for i in range(0, full, block):
                yield buf[i:i + block]
            buf = buf[full:]
        pending.clear()
        chars = 0

    for t in texts:
        if len(t) > batch_chars:
            yield from flush()
        if t:
            pending.append(t)
            chars += len(t)
        if len(pending) >= batch or chars >= batch_chars:
            yield from flush()
    yield from flush()
    if len(buf) > 1:
        yield buf


def _write_blocks(path: Path, blocks: Iterable[list[int]]) -> None:
    from datasets import Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=Features({"input_ids": List(Value("int32"))}), path=str(path)) as writer:
        for ids in blocks:
            writer.write({"input_ids": ids})
        writer.finalize()


def _open_arrow(path: Path, key: crypto.Key | None) -> Any:
    """An Arrow file as a Dataset: memory-mapped when plain; a sealed one decrypted into memory (`key`).

    Raises:
        EncryptionError: the wrong key, or a damaged file.
    """
    from datasets import Dataset

    if key is None or not crypto.is_encrypted(path):
        return Dataset.from_file(str(path))
    with crypto.plain_staging() as stage:
        plain = crypto.decrypt_file(path, stage / path.name, key)
        return Dataset.from_file(str(plain), in_memory=True)


class TokenBlocks(Sequence[Tokenized]):
    """The blocks of a cache file, read on demand from the memory map (the corpus is never all in memory)."""

    def __init__(self, dataset: Any, path: Path, reused: bool) -> None:
        self.dataset = dataset
        self.path = path
        self.reused = reused

    def __len__(self) -> int:
        return len(self.dataset)

    @overload
    def __getitem__(self, i: int) -> Tokenized: ...

    @overload
    def __getitem__(self, i: slice) -> list[Tokenized]: ...

    def __getitem__(self, i: int | slice) -> Tokenized | list[Tokenized]:
        if isinstance(i, slice):  # evaluation batches slice their items
            return [self[j] for j in range(*i.indices(len(self)))]
        ids = self.dataset[int(i)]["input_ids"]
        return Tokenized(ids, list(ids), f"{self.path.name}#{i}")

    @property
    def n_tokens(self) -> int:
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.dataset.data.column("input_ids"))  # counted on the memory map
        return int(pc.sum(lengths).as_py() or 0)


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
    corpus = digest or text_digest(texts())
    key = crypto.sealing_key()
    name = hashlib.sha256(f"{tokenizer_digest(tok)}:{corpus}:{block}".encode()).hexdigest()[:24]
    folder = Path(root) if root else cache_dir("tokens")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"blocks-{name}.arrow" if key is None else f"blocks-{name}.sealed.arrow")
    if path.is_file():
        try:
            return TokenBlocks(_open_arrow(path, key), path, True)
        except EncryptionError:
            _log.warning("%s was sealed with another key (or is damaged): rebuilding it", path.name)
    if key is None:
        tmp = folder / f".blocks-{name}.{os.getpid()}.tmp"
        _write_blocks(tmp, _blocks(texts(), tok, block))
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache that a later run would trust
    else:  # tokenized in RAM, sealed onto the disk
        with crypto.plain_staging() as stage:
            _write_blocks(stage / path.name, _blocks(texts(), tok, block))
            crypto.encrypt_file(stage / path.name, path, key)
    return TokenBlocks(_open_arrow(path, key), path, False)


def file_digest(files: Sequence[Path]) -> str:
    """A cheap corpus key from file paths, sizes and modification times (no reading)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---- a run's corpus, streamed from data.path into the cache -------------------------------------------------------

def streams_corpus(cfg: RunConfig) -> bool:
    """Whether a run streams its corpus into the token cache instead of loading it: `pretrain.cache` is on and the
    objective trains on blocks (clm, span, mlm without NSP)."""
    return cfg.pretrain.cache and cfg.objective in ("clm", "mlm", "span") and not getattr(cfg.settings, "nsp", False)


class CachedDocuments(Sequence[Example]):
    """Documents stored in an Arrow file (the held-out ones, for evaluations that need text), read on demand."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.dataset[int(i)]
        if row["messages"] is not None:
            return Example(messages=json.loads(row["messages"]), source=row["source"])
        return Example(text=row["text"], source=row["source"])

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]


@dataclass
class CachedCorpus:
    """A run's data in the cache: training and validation blocks, the validation documents, and data statistics
    (the keys of `load_datasets`' stats plus train_blocks, train_tokens, train_cache, train_cache_reused, val_items
    and, when scrubbing, pii_replaced); `audit` is the privacy audit (empty without privacy.scrub)."""

    train: TokenBlocks
    val: TokenBlocks
    val_examples: CachedDocuments
    stats: dict[str, Any]
    audit: dict[str, Any]


def cached_corpus(cfg: RunConfig, tok: Any, root: str | Path | None = None) -> CachedCorpus:
    """Training and validation blocks of `cfg.data`, streamed into the cache on first use and mapped after.

    Documents are read one at a time, three times over: once to rank them (cleaning, deduplication and the held-out
    choice are those of `load_datasets`, then `max_examples` and `eval.max_examples` cap training and validation
    documents), once to tokenize the training ones and once the validation ones. The blocks are therefore those
    the in-memory path makes, and memory holds a tokenizer batch and 8 bytes per document, never the corpus.

    Args:
        cfg: the run; its data, max_length, eval.max_examples and privacy settings are used.
        tok: the tokenizer.
        root: cache folder (default `$LMTAILOR_CACHE/tokens`).

    Raises:
        DataError: as `load_datasets` (no path, bad records, nothing left to train on).
        ConfigError: privacy.scrub in pseudonym mode without its salt.
    """

    data = cfg.data
    if not data.path:
        raise DataError("no training data: data.path is not set",
                        hint="set data.path to a file, a folder, a hub dataset id or catalog:NAME")
    reader = ExampleReader(data.path, data.format, data.split, data.system_prompt)
    val_reader = ExampleReader(data.val_path, data.format, data.split, data.system_prompt) if data.val_path else None
    scrubber, scrub_key = _scrubber(cfg.privacy)
    h = hashlib.sha256(f"corpus-v{CACHE_VERSION}:{tokenizer_digest(tok)}:{cfg.max_length}:{cfg.eval.max_examples}:"
                       f"{scrub_key}:{json.dumps(data.model_dump(mode='json'), sort_keys=True)}".encode())
    for r in (reader, val_reader):
        if r is not None:
            h.update(_source_digest(r).encode())
    key = crypto.sealing_key()
    sealed = "" if key is None else "-sealed"  # a sealed run never maps a plain cache, nor a plain one a sealed one
    folder = (Path(root) if root else cache_dir("tokens")) / f"corpus-{h.hexdigest()[:24]}{sealed}"
    reused = (folder / "stats.json").is_file()
    loaded = None
    if reused:
        try:
            loaded = _load(folder, key)
        except EncryptionError:
            _log.warning("%s was sealed with another key (or is damaged): rebuilding it", folder.name)
            reused = False
    if loaded is None:
        if key is None:
            with atomic_dir(folder) as tmp:  # a crash never leaves a half-written cache that a later run would trust
                meta = _build(tmp, cfg, tok, reader, val_reader, scrubber)
                (tmp / "stats.json").write_text(json.dumps(meta, indent=2) + "\n")
        else:  # built in RAM, every file sealed into the cache folder (which appears whole or not at all)
            with crypto.plain_staging() as stage:
                meta = _build(stage, cfg, tok, reader, val_reader, scrubber)
                (stage / "stats.json").write_text(json.dumps(meta, indent=2) + "\n")
                crypto.encrypt_tree(stage, folder, key)
        loaded = _load(folder, key)
    train_ds, val_ds, docs_ds, meta = loaded
    train, val = (TokenBlocks(ds, folder / f"{n}.arrow", reused) for ds, n in ((train_ds, "train"), (val_ds, "val")))
    stats = {**meta["stats"], "train_blocks": len(train), "train_tokens": train.n_tokens,
             "train_cache": str(train.path), "train_cache_reused": reused, "val_items": len(val)}
    return CachedCorpus(train, val, CachedDocuments(docs_ds), stats, meta["audit"])


def _load(folder: Path, key: crypto.Key | None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(train blocks, val blocks, val documents, stats and audit) of a cache folder, sealed or plain."""
    stats = folder / "stats.json"
    meta = json.loads(crypto.read_bytes(stats, key) if key is not None and crypto.is_encrypted(stats)
                      else stats.read_bytes())
    return (*(_open_arrow(folder / f"{n}.arrow", key) for n in ("train", "val", "val-docs")), meta)


def _source_digest(reader: ExampleReader) -> str:
    """Key of what a reader reads: its files' paths, sizes and times, or (a hub dataset) a hash of its text."""
    files = local_files(reader.local)
    return file_digest(files) if files is not None else text_digest(doc_text(ex) for ex in reader)


def _scrubber(privacy: PrivacySettings) -> tuple[Any, str]:
    """(a privacy Scrubber, or None; the part of the cache key that says how it scrubs)."""
    if not privacy.scrub:
        return None, ""
    from lmtailor.privacy.scrub import SCRUBBER_VERSION, Scrubber, salt_from_env, scan_options

    salt, source = salt_from_env(privacy.salt_env, required=True) if privacy.mode == "pseudonym" else (None, "unused")
    salt_key = hashlib.sha256(salt).hexdigest() if salt else ""  # a changed salt changes the pseudonyms
    options = scan_options(privacy)  # the detectors' version and options change what is scrubbed, so the key too
    return Scrubber(privacy.mode, salt, privacy.ner, source, options), \
        f"scrub:{SCRUBBER_VERSION}:{privacy.mode}:{privacy.ner}:{options}:{salt_key}"


def _ranks(reader: ExampleReader, seed: int, counts: dict[str, int]) -> np.ndarray:
    """(N,) uint64: the first 8 bytes of each non-empty document's split rank, in reading order; counts read and
    empty documents into `counts`."""
    out = array("Q")
    for ex in reader:
        counts["read"] += 1
        stripped = strip_example(ex)
        if stripped is None:
            counts["empty"] += 1
        else:
            out.append(int.from_bytes(split_rank(stripped, seed)[:8], "big"))
    return np.frombuffer(out, dtype=np.uint64)


def _first(ranks: np.ndarray) -> np.ndarray:
    """Positions of the first document of each rank (equal content, equal rank: what deduplication keeps), sorted."""
    _, first = np.unique(ranks, return_index=True)
    return np.sort(first)


def _cap(roles: np.ndarray, role: int, limit: int | None) -> int:
    """Keep the first `limit` documents of `role` (the others get role 0); how many were there before."""
    where = np.flatnonzero(roles == role)
    if limit is not None:
        roles[where[limit:]] = 0
    return len(where)


def _docs(reader: ExampleReader, roles: np.ndarray, role: int) -> Iterator[Example]:
    """The stripped documents of `reader` that `roles` (indexed like `_ranks`) gives `role`."""
    i = 0
    for ex in reader:
        stripped = strip_example(ex)
        if stripped is not None:
            if roles[i] == role:
                yield stripped
            i += 1


def _build(folder: Path, cfg: RunConfig, tok: Any, reader: ExampleReader, val_reader: ExampleReader | None,
           scrubber: Any) -> dict[str, Any]:
    """Write train.arrow, val.arrow and val-docs.arrow into `folder`; return the stats and audit to keep."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    data = cfg.data
    counts = {"read": 0, "empty": 0}
    ranks = _ranks(reader, data.split_seed, counts)
    kept = _first(ranks)
    roles = np.zeros(len(ranks), np.uint8)
    if val_reader is None:  # the held-out documents are those of smallest rank, as in split_examples
        held = kept[np.argsort(ranks[kept], kind="stable")[:val_count(len(kept), data.val_fraction, data.val_size)]]
        roles[kept] = TRAIN
        roles[held] = VAL
        val_roles, overlap = roles, 0
    else:  # validation documents come from val_path; training ones equal to one of them are dropped
        val_ranks = _ranks(val_reader, data.split_seed, {"read": 0, "empty": 0})
        val_kept = _first(val_ranks)
        val_roles = np.zeros(len(val_ranks), np.uint8)
        val_roles[val_kept] = VAL
        in_val = np.isin(ranks[kept], val_ranks[val_kept])
        roles[kept[~in_val]] = TRAIN
        overlap = int(in_val.sum())
    n_train = min(_cap(roles, TRAIN, data.max_examples), data.max_examples or len(ranks))
    n_val = _cap(val_roles, VAL, cfg.eval.max_examples)
    stats = {"format": reader.format or data.format, **counts, "kept": len(kept),
             "duplicates": len(ranks) - len(kept)}
    stats = {k: stats[k] for k in ("format", "read", "kept", "duplicates", "empty")}  # load_datasets' order
    stats.update(train=n_train, val=n_val, val_overlap=overlap)
    if not n_train:
        raise no_training_left(str(data.path), stats, n_val)

    def docs(source: ExampleReader, which: np.ndarray, role: int) -> Iterator[Example]:
        for ex in _docs(source, which, role):
            yield scrubber.example(ex) if scrubber else ex

    train_texts = (doc_text(ex) for ex in docs(reader, roles, TRAIN))
    _write_blocks(folder / "train.arrow", _blocks(train_texts, tok, cfg.max_length))
    features = Features({"text": Value("string"), "messages": Value("string"), "source": Value("string")})
    with ArrowWriter(features=features, path=str(folder / "val-docs.arrow")) as writer:

        def val_texts() -> Iterator[str]:  # each validation document is kept as it is tokenized
            for ex in docs(val_reader or reader, val_roles, VAL):
                writer.write({"text": ex.text, "source": ex.source,
                              "messages": None if ex.messages is None else json.dumps(ex.messages)})
                yield doc_text(ex)

        _write_blocks(folder / "val.arrow", _blocks(val_texts(), tok, cfg.max_length))
        writer.finalize()
    audit = scrubber.audit.to_dict() if scrubber else {}
    if audit:
        stats["pii_replaced"] = audit["total"]
    return {"stats": stats, "audit": audit}
