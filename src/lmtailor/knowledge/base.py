"""A knowledge base on disk, plain files only, and its search.

    KB/manifest.json        format version, embedder (name, weights digest, dimension), chunking, BM25 library,
                            the sources added, counts
    KB/chunks.parquet       one row per chunk: id, text, source, heading, start_line, end_line, n_tokens
    KB/vectors.safetensors  "vectors": (N, D) float32 unit rows, row i embeds chunk i (absent for a BM25-only base)
    KB/bm25/                the bm25s index (numpy arrays and JSON; no pickle)

Search ranks chunks by BM25, by cosine similarity of embeddings, or both fused by reciprocal rank (`hybrid`).
A base records its embedder's weights digest: opening it with another embedder, or after the embedder's weights
changed, is refused, since the stored vectors would be compared with vectors from a different space.
Adding documents embeds only the new chunks; the BM25 index (whose IDF depends on every chunk) is recomputed from
the stored texts, which takes seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lmtailor.errors import ConfigError
from lmtailor.io import atomic_dir, atomic_write_json
from lmtailor.knowledge.chunk import Chunk, chunk_documents, read_documents, word_offsets
from lmtailor.knowledge.fusion import rrf
from lmtailor.outputs import check_output, existing, staged_folder

FORMAT = "lmtailor-knowledge-base"
VERSION = 1
MODES = ("hybrid", "bm25", "dense")
_CANDIDATES = 50  # each ranking's depth before fusion


def index_text(chunk: Chunk) -> str:
    """What BM25 and the embedder see of a chunk: its heading path, then its text (a short section's words are
    often in its title only)."""
    return f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text


def bm25_tokens(text: str) -> list[str]:
    """Lowercased word tokens: what BM25 indexes and queries."""
    from lmtailor.baselines import words

    return words(text) or [""]


class _BM25:
    """BM25 through bm25s (stored beside the chunks), or rank-bm25 (rebuilt on open) where bm25s is missing."""

    def __init__(self, index: Any, library: str) -> None:
        self.index, self.library = index, library

    @classmethod
    def build(cls, texts: Sequence[str]) -> _BM25:
        corpus = [bm25_tokens(t) for t in texts]
        try:
            import bm25s
        except ImportError:
            from rank_bm25 import BM25Okapi

            return cls(BM25Okapi(corpus), "rank-bm25")
        index = bm25s.BM25()
        index.index(corpus, show_progress=False)
        return cls(index, "bm25s")

    def save(self, folder: Path) -> None:
        if self.library == "bm25s":
            self.index.save(str(folder / "bm25"), show_progress=False)

    @classmethod
    def load(cls, folder: Path, texts: Sequence[str], library: str) -> _BM25:
        if library == "bm25s" and (folder / "bm25").is_dir():
            try:
                import bm25s

                return cls(bm25s.BM25.load(str(folder / "bm25"), show_progress=False), "bm25s")
            except ImportError:
                pass
        return cls.build(texts)

    def scores(self, query: str) -> np.ndarray:
        return np.asarray(self.index.get_scores(bm25_tokens(query)), dtype=np.float32)


@dataclass
class Hit:
    """One search result: the chunk, its score under the ranking asked for, and its rank (1 = best)."""

    chunk: Chunk
    score: float
    rank: int


class KnowledgeBase:
    """Chunks, their BM25 index and (unless BM25-only) their embeddings."""

    def __init__(self, path: Path, manifest: dict[str, Any], chunks: list[Chunk], vectors: np.ndarray | None,
                 bm25: _BM25, embedder: Any = None) -> None:
        self.path, self.manifest, self.chunks, self.vectors, self.bm25 = path, manifest, chunks, vectors, bm25
        self._embedder = embedder

    # ---- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, embedder: str | None = None) -> KnowledgeBase:
        """Open a base; `embedder`, when given, must be the one it was built with.

        Raises:
            ConfigError: not a knowledge base, a newer format, or an embedder that does not match the manifest.
        """
        folder = Path(path)
        manifest = read_manifest(folder)
        chunks = _read_chunks(folder / "chunks.parquet")
        want = manifest.get("embedder")
        vectors = None
        if want:
            from safetensors.numpy import load_file

            vectors = load_file(str(folder / "vectors.safetensors"))["vectors"]
            if vectors.shape != (len(chunks), want["dim"]):
                raise ConfigError(f"{folder}: vectors.safetensors holds {vectors.shape}, the manifest says "
                                  f"{len(chunks)} chunks of dimension {want['dim']}", "rebuild the base")
        if embedder is not None and want is None:
            raise ConfigError(f"{folder} was built without an embedder (BM25 only); cannot search it with {embedder}",
                              "drop --embedder, or rebuild the base with one")
        kb = cls(folder, manifest, chunks, vectors, _BM25.load(folder, [index_text(c) for c in chunks],
                                                               manifest["bm25"]["library"]))
        if embedder is not None:
            kb._embedder = _matching(embedder, manifest, folder)
        return kb

    @property
    def embedder(self) -> Any:
        """The base's embedder, loaded on first use and checked against the manifest."""
        if self._embedder is None:
            info = self.manifest.get("embedder")
            if not info:
                raise ConfigError(f"{self.path} has no dense index (built BM25 only)", "search with --mode bm25")
            self._embedder = _matching(info["name"], self.manifest, self.path)
        return self._embedder

    # ---- search ----------------------------------------------------------------------------------------------
    def ranking(self, query: str, mode: str = "hybrid", depth: int = _CANDIDATES) -> list[tuple[int, float]]:
        """(chunk index, score) best first, at most `depth` of them (hybrid: of the fused candidates)."""
        if mode not in MODES:
            raise ConfigError(f"search mode {mode!r}", f"allowed values are {', '.join(MODES)}")
        if not self.chunks:
            return []
        if mode == "hybrid" and self.vectors is None:
            mode = "bm25"  # a BM25-only base: hybrid is what it has
        if mode == "bm25":
            return _top(self.bm25.scores(query), depth, positive=True)
        if mode == "dense":
            return _top(self._dense(query), depth)
        lists = [[i for i, _ in _top(self.bm25.scores(query), depth, positive=True)],
                 [i for i, _ in _top(self._dense(query), depth)]]
        return rrf(lists)[:depth]

    def _dense(self, query: str) -> np.ndarray:
        assert self.vectors is not None
        q = self.embedder.encode([query])[0]  # (D,)
        return self.vectors @ q  # (N,)

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The k best chunks for `query`."""
        return [Hit(self.chunks[i], s, r + 1)
                for r, (i, s) in enumerate(self.ranking(query, mode, max(k, _CANDIDATES))[:k])]


def _top(scores: np.ndarray, n: int, positive: bool = False) -> list[tuple[int, float]]:
    """Indices of the n largest scores, best first (ties: lower index first); BM25 drops zero scores."""
    order = np.argsort(-scores, kind="stable")[:n]
    return [(int(i), float(scores[i])) for i in order if not positive or scores[i] > 0]


def _matching(name: str, manifest: dict[str, Any], folder: Path) -> Any:
    from lmtailor.knowledge.embed import Embedder

    emb = Embedder(name)
    want = manifest["embedder"]
    if emb.digest != want["digest"] or emb.dim != want["dim"]:
        raise ConfigError(f"{folder} was built with embedder {want['name']} (weights {want['digest']}, dimension "
                          f"{want['dim']}), not {emb.name} (weights {emb.digest}, dimension {emb.dim})",
                          f"search it with the embedder it was built with, or rebuild it: lmtailor kb build ... "
                          f"--embedder {emb.name}")
    return emb


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a base, checked.

    Raises:
        ConfigError: not a knowledge base or a newer format.
    """
    f = folder / "manifest.json"
    if not f.is_file():
        raise ConfigError(f"{folder} is not a knowledge base (no manifest.json)", "build one: lmtailor kb build DOCS "
                          f"--out {folder}")
    manifest = json.loads(f.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > VERSION:
        raise ConfigError(f"{f}: format {manifest.get('format')} version {manifest.get('version')}",
                          f"this lmtailor reads {FORMAT} up to version {VERSION}")
    return manifest


def _read_chunks(path: Path) -> list[Chunk]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pylist()
    return [Chunk(**row) for row in table]


def _write(folder: Path, manifest: dict[str, Any], chunks: list[Chunk], vectors: np.ndarray | None,
           bm25: _BM25) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = list(Chunk.__dataclass_fields__)
    table = pa.table({f: [getattr(c, f) for c in chunks] for f in fields}) if chunks else pa.table(
        {f: pa.array([], type=pa.string() if f in ("id", "text", "source", "heading") else pa.int64())
         for f in fields})
    pq.write_table(table, folder / "chunks.parquet")
    if vectors is not None:
        from safetensors.numpy import save_file

        save_file({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(folder / "vectors.safetensors"),
                  metadata={"embedder": manifest["embedder"]["name"], "digest": manifest["embedder"]["digest"]})
    bm25.save(folder)
    atomic_write_json(folder / "manifest.json", manifest)


# ---- building --------------------------------------------------------------------------------------------------
def build_kb(sources: Sequence[str], out: str | Path, embedder: str | None = "all-minilm-l6-v2",
             max_tokens: int = 200, overlap: int = 40, progress: bool = True, force: bool = False) -> str:
    """`lmtailor kb build`: chunk the documents of `sources`, index them, write the base to `out`.

    Args:
        sources: files, folders, data files or catalog:NAME.
        out: the base's folder, written atomically; an existing one is an error unless `force` (then it is kept as
            NAME.bak-<time>, see lmtailor.outputs).
        embedder: bundled name or sentence-transformers folder; None (or "none") for a BM25-only base.
        max_tokens: chunk size, in the embedder's tokens (words for a BM25-only base).
        overlap: tokens shared by consecutive windows of a long paragraph.

    Returns:
        A short report: chunks, duplicates dropped, tokens, sources, timings.
    """
    t0 = time.perf_counter()
    folder = check_output(out, force, folder=True, inputs=existing(*sources))
    emb = None
    if embedder and embedder != "none":
        from lmtailor.knowledge.embed import Embedder

        emb = Embedder(embedder)
        if max_tokens > emb.max_length - 2:
            raise ConfigError(f"--max-tokens {max_tokens} exceeds the embedder's window ({emb.max_length} tokens "
                              "with 2 special tokens)", f"use at most {emb.max_length - 2}")
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "embedder": asdict(emb.info) if emb is not None else None,
        "chunking": {"unit": "embedder tokens" if emb is not None else "words", "max_tokens": max_tokens,
                     "overlap": overlap, "structure": "Markdown/reST headings, then paragraphs; identical chunks once"},
        "bm25": {"library": "", "tokens": "lowercased \\w+ words"},
        "sources": [], "chunks": 0, "duplicates_dropped": 0,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return _update(folder, manifest, [], None, sources, emb, progress, t0, verb="built", force=force)


def add_to_kb(path: str | Path, sources: Sequence[str], progress: bool = True) -> str:
    """`lmtailor kb add`: chunk and embed only the new documents; the stored vectors are kept."""
    t0 = time.perf_counter()
    kb = KnowledgeBase.open(path)
    emb = kb.embedder if kb.manifest.get("embedder") else None
    return _update(kb.path, kb.manifest, kb.chunks, kb.vectors, sources, emb, progress, t0, verb="added to")


def _update(folder: Path, manifest: dict[str, Any], old: list[Chunk], old_vectors: np.ndarray | None,
            sources: Sequence[str], emb: Any, progress: bool, t0: float, verb: str, force: bool | None = None) -> str:
    """Chunk, embed and index `sources` on top of `old`, then write the base to `folder` in one rename: `force`
    None updates the base in place (kb add), else `folder` is a new output (kb build, see build_kb)."""
    from tqdm.auto import tqdm

    if not sources:
        raise ConfigError("no documents given", "name files, folders or catalog:NAME to index")
    chunking = manifest["chunking"]
    offsets = emb.offsets if emb is not None else word_offsets
    docs = [d for s in sources for d in read_documents(s)]
    new, dropped = chunk_documents(docs, offsets, chunking["max_tokens"], chunking["overlap"],
                                   seen={c.id for c in old})
    if not old and not new:
        raise ConfigError(f"{', '.join(sources)}: no text to index", "give .md/.rst/.txt files or text data")
    t_chunk = time.perf_counter() - t0
    vectors = None
    if emb is not None:
        with tqdm(total=len(new), desc="embedding chunks", unit="chunk", disable=not progress) as bar:
            fresh = (emb.encode([index_text(c) for c in new], progress=bar) if new
                     else np.zeros((0, emb.dim), np.float32))
        vectors = fresh if old_vectors is None else np.concatenate([old_vectors, fresh])
    t_embed = time.perf_counter() - t0 - t_chunk
    chunks = old + new
    bm25 = _BM25.build([index_text(c) for c in chunks])
    manifest = {**manifest, "bm25": {**manifest["bm25"], "library": bm25.library},
                "sources": list(dict.fromkeys([*manifest["sources"], *map(str, sources)])),
                "chunks": len(chunks), "duplicates_dropped": manifest["duplicates_dropped"] + dropped,
                "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    with atomic_dir(folder) if force is None else staged_folder(folder, force) as tmp:
        _write(tmp, manifest, chunks, vectors, bm25)
    tokens = sum(c.n_tokens for c in new)
    return (f"{verb} {folder}: {len(new)} new chunks from {len(docs)} documents ({tokens} {chunking['unit']}, "
            f"{dropped} duplicate chunks dropped), {len(chunks)} in all; BM25 ({bm25.library})"
            + (f" + dense ({emb.name}, {emb.dim} dimensions)" if emb is not None else ", no dense index")
            + f"; chunking {t_chunk:.1f}s, embedding {t_embed:.1f}s, total {time.perf_counter() - t0:.1f}s")


def format_hits(hits: Sequence[Hit], width: int = 300) -> str:
    """`kb search` output: rank, score, source:lines, heading, then the passage (cut at `width` characters)."""
    lines = []
    for h in hits:
        c = h.chunk
        text = " ".join(c.text.split())
        lines.append(f"{h.rank}. [{h.score:.4f}] {c.source}:{c.lines}" + (f"  ({c.heading})" if c.heading else ""))
        lines.append("   " + (text[:width] + " ..." if len(text) > width else text))
    return "\n".join(lines) if lines else "no passage matches"


def search_kb(path: str | Path, query: str, k: int = 5, mode: str = "hybrid", embedder: str | None = None) -> str:
    """`lmtailor kb search`: the k best passages with scores, source files and lines, and the search time."""
    kb = KnowledgeBase.open(path, embedder)
    if mode != "bm25" and kb.vectors is not None:
        kb.embedder  # noqa: B018  # loaded before the clock starts: the time shown is the search's own
    t0 = time.perf_counter()
    hits = kb.search(query, k, mode)
    ms = (time.perf_counter() - t0) * 1000
    return format_hits(hits) + f"\n({mode} search over {len(kb.chunks)} chunks: {ms:.1f} ms)"
