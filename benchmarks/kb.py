"""Knowledge base on the Python documentation (`catalog:python-docs`, 497 reST pages, ~11 MB): build time and memory,
query latency (p50/p95) of BM25, dense and hybrid search at k=5, recall@5 and MRR on a labeled query set written
for this benchmark, bm25s against rank-bm25 on the same chunks in the same run, and the wall time of a whole
`lmtailor kb search` command (process start, opening the base and the embedder included).

    python benchmarks/kb.py                     # every page (dense embedding dominates: ~15k chunks)
    python benchmarks/kb.py --pages 60          # the labeled pages plus others up to 60 pages
    python benchmarks/kb.py --embedder none     # BM25 only (seconds): latency, recall, bm25s vs rank-bm25

Labels are page-level: a query's passage is relevant when it comes from the page that answers it. Timings are
wall-clock on whatever else the machine runs; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "kb.json"

# (query, page that answers it): written for this benchmark from the page titles and contents of the 3.11 docs
QUERIES = [
    ("parse a JSON string into a Python dictionary", "library/json.rst"),
    ("extract all members of a tar archive", "library/tarfile.rst"),
    ("read a ZIP file and list the names of its members", "library/zipfile.rst"),
    ("match a regular expression at the start of a string", "library/re.rst"),
    ("run an external command and capture its output", "library/subprocess.rst"),
    ("parse command line options and arguments", "library/argparse.rst"),
    ("format a datetime as a string with strftime", "library/datetime.rst"),
    ("create a temporary directory that is removed automatically", "library/tempfile.rst"),
    ("copy a whole directory tree", "library/shutil.rst"),
    ("count hashable items with a dictionary subclass", "library/collections.rst"),
    ("read rows from a CSV file", "library/csv.rst"),
    ("compute the SHA-256 digest of some bytes", "library/hashlib.rst"),
    ("serialize Python objects to bytes with pickle", "library/pickle.rst"),
    ("connect to a SQLite database and execute a query", "library/sqlite3.rst"),
    ("write log messages to a file with a level", "library/logging.rst"),
    ("run coroutines concurrently with an event loop", "library/asyncio-task.rst"),
    ("start a pool of worker processes", "library/multiprocessing.rst"),
    ("object-oriented filesystem paths", "library/pathlib.rst"),
    ("decorator that caches the results of a function", "library/functools.rst"),
    ("infinite iterators and combinatoric generators like permutations", "library/itertools.rst"),
    ("define a class with automatically generated __init__ and __repr__", "library/dataclasses.rst"),
    ("generate random numbers and shuffle a list", "library/random.rst"),
    ("write unit tests with assertions in a TestCase", "library/unittest.rst"),
    ("what does the with statement do and context managers", "reference/compound_stmts.rst"),
]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.proc, self.start, self.peak, self.stop = psutil.Process(), 0, 0, threading.Event()
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def grew_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def pages(limit: int | None, work: Path) -> Path:
    """The python-docs pages as .rst files (the labeled pages first, then others up to `limit`)."""
    from lmtailor.data.validate import load_examples

    docs = load_examples("catalog:python-docs")
    labeled = {p for _, p in QUERIES}
    chosen = [d for d in docs if d.meta["file"] in labeled] + [d for d in docs if d.meta["file"] not in labeled]
    folder = work / "python-docs"
    for d in chosen[:limit] if limit else chosen:
        f = folder / d.meta["file"]
        f.parent.mkdir(parents=True, exist_ok=True)
        assert d.text is not None
        f.write_text(d.text)
    return folder


def percentiles(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def latency(search: Any, queries: list[str], repeats: int = 3) -> dict[str, float]:
    search(queries[0])  # warm-up (loads what is loaded lazily)
    times = []
    for _ in range(repeats):
        for q in queries:
            t0 = time.perf_counter()
            search(q)
            times.append(time.perf_counter() - t0)
    return percentiles(times)


def bm25_libraries(kb: Any, labels: list[dict[str, Any]], queries: list[str]) -> dict[str, Any]:
    """bm25s and rank-bm25 on the same chunk texts and tokens: index time, latency, recall@5, top-5 agreement."""
    import bm25s
    from rank_bm25 import BM25Okapi

    from lmtailor.knowledge.base import bm25_tokens, index_text
    from lmtailor.knowledge.metrics import relevant

    corpus = [bm25_tokens(index_text(c)) for c in kb.chunks]
    out: dict[str, Any] = {}
    tops: dict[str, list[list[int]]] = {}
    for name in ("bm25s", "rank-bm25"):
        t0 = time.perf_counter()
        if name == "bm25s":
            index = bm25s.BM25()
            index.index(corpus, show_progress=False)
        else:
            index = BM25Okapi(corpus)
        build = time.perf_counter() - t0

        def top5(q: str, index: Any = index) -> list[int]:
            return [int(i) for i in np.argsort(-np.asarray(index.get_scores(bm25_tokens(q))), kind="stable")[:5]]

        tops[name] = [top5(q) for q in queries]
        hits = [any(relevant(kb.chunks[i], lab) for i in top) for lab, top in zip(labels, tops[name], strict=True)]
        out[name] = {"index_s": round(build, 2), **latency(top5, queries), "recall@5": round(float(np.mean(hits)), 3)}
    agree = [len(set(a) & set(b)) / 5 for a, b in zip(tops["bm25s"], tops["rank-bm25"], strict=True)]
    out["top5_overlap"] = round(float(np.mean(agree)), 3)
    return out


def cli_search(kb_dir: Path, queries: list[str], modes: tuple[str, ...]) -> dict[str, float]:
    """Wall seconds of one `lmtailor kb search KB QUERY --mode M` command, end to end (a fresh process: start,
    open the base, load the embedder for dense/hybrid, search, print), median over the queries."""
    import subprocess
    import sys

    out = {}
    for mode in modes:
        times = []
        for q in queries:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lmtailor", "kb", "search", str(kb_dir), q, "-k", "5", "--mode",
                            mode], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        out[mode] = round(float(np.median(times)), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=None, help="at most this many pages (default: all 497)")
    ap.add_argument("--embedder", default="all-minilm-l6-v2", help="or none: BM25 only")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    from lmtailor.knowledge.base import KnowledgeBase, build_kb
    from lmtailor.knowledge.metrics import retrieval_metrics

    result: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                                         "(shared with other jobs: timings are noisy, ratios within the run hold)",
                              "embedder": a.embedder}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = pages(a.pages, work)
        files = list(docs.rglob("*.rst"))
        result["pages"] = len(files)
        result["megabytes"] = round(sum(f.stat().st_size for f in files) / 1e6, 2)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            report = build_kb([str(docs)], work / "kb-bm25", embedder=None, progress=False)
            result["build_bm25_only"] = {"seconds": round(time.perf_counter() - t0, 1), "rss_growth_mb": mem.grew_mb,
                                         "peak_rss_mb": mem.peak_mb}
        print(report)
        dense = a.embedder != "none"
        if dense:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                report = build_kb([str(docs)], work / "kb", embedder=a.embedder, progress=True)
                result["build_hybrid"] = {"seconds": round(time.perf_counter() - t0, 1), "report": report}
            result["build_hybrid"].update(rss_growth_mb=mem.grew_mb, peak_rss_mb=mem.peak_mb)
            print(report)
        kb_dir = work / ("kb" if dense else "kb-bm25")
        kb = KnowledgeBase.open(kb_dir)
        modes = ("bm25", "dense", "hybrid") if dense else ("bm25",)
        result["chunks"] = len(kb.chunks)
        result["disk_mb"] = round(sum(f.stat().st_size for f in kb_dir.rglob("*") if f.is_file()) / 1e6, 2)
        have = {str(f.relative_to(docs)) for f in files}
        labels = [{"query": q, "source": p} for q, p in QUERIES if p in have]
        queries = [lab["query"] for lab in labels]
        result["queries"] = len(labels)
        result["latency_k5"] = {mode: latency(lambda q, mode=mode: kb.search(q, 5, mode), queries)
                                for mode in modes}
        result["quality"] = retrieval_metrics(kb, labels, k=5, modes=modes)
        result["bm25_libraries"] = bm25_libraries(kb, labels, queries)
        result["cli_kb_search_s"] = cli_search(kb_dir, queries[:3], modes)
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # steadier than wall time on a shared host
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "build_hybrid"}, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
