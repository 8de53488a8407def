"""Retrieval quality on labeled queries: recall@k (share of queries with a relevant passage among the first k) and
MRR (mean of 1 / rank of the first relevant passage, 0 when none is in the ranking's first `depth`).

A labeled query file is JSON Lines, one query per line:

    {"query": "extract a tar.gz archive", "source": "tar.md", "line": 7}
    {"query": "list open ports", "contains": "ss -tulpn"}

A passage is relevant when every condition given holds: its source ends with `source`, its line span holds
`line`, its text contains `contains` (whitespace-insensitive).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtailor.errors import DataError
from lmtailor.knowledge.base import MODES, KnowledgeBase
from lmtailor.knowledge.chunk import Chunk


def read_queries(path: str | Path) -> list[dict[str, Any]]:
    """Labeled queries, checked.

    Raises:
        DataError: a line that is not JSON, lacks `query`, or has no condition (naming the file and line).
    """
    rows, problems = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{n}: not JSON ({e})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("query"), str):
            problems.append(f"{path}:{n}: query: missing or not a string")
        elif not any(k in row for k in ("source", "line", "contains")):
            problems.append(f"{path}:{n}: give at least one of source, line, contains")
        else:
            rows.append(row)
    if problems or not rows:
        raise DataError(f"{path}: {len(problems)} bad labeled queries" if problems else f"{path}: no queries",
                        "one JSON object per line: {\"query\": ..., \"source\"/\"line\"/\"contains\": ...}",
                        problems)
    return rows


def relevant(chunk: Chunk, label: dict[str, Any]) -> bool:
    if "source" in label and not chunk.source.endswith(str(label["source"])):
        return False
    if "line" in label and not chunk.start_line <= int(label["line"]) <= chunk.end_line:
        return False
    return "contains" not in label or " ".join(str(label["contains"]).split()) in " ".join(chunk.text.split())


def first_relevant(kb: KnowledgeBase, label: dict[str, Any], mode: str, depth: int) -> int | None:
    """1-based rank of the first relevant passage for the label's query, or None within `depth`."""
    for rank, (i, _) in enumerate(kb.ranking(label["query"], mode, depth), start=1):
        if relevant(kb.chunks[i], label):
            return rank
    return None


def retrieval_metrics(kb: KnowledgeBase, labels: Sequence[dict[str, Any]], k: int = 5,
                      modes: Sequence[str] = MODES, depth: int = 50) -> dict[str, dict[str, float]]:
    """{mode: {"recall@k", "mrr", "queries"}} for each ranking mode."""
    out = {}
    for mode in modes:
        ranks = [first_relevant(kb, row, mode, depth) for row in labels]
        out[mode] = {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / len(ranks),
                     "mrr": sum(1.0 / r for r in ranks if r is not None) / len(ranks), "queries": len(ranks)}
    return out


def evaluate_kb(path: str | Path, queries: str | Path, k: int = 5, modes: Sequence[str] = MODES) -> dict[str, Any]:
    """`lmtailor kb eval`: recall@k and MRR of each ranking mode on a labeled query file."""
    kb = KnowledgeBase.open(path)
    modes = [m for m in modes if m == "bm25" or kb.vectors is not None]
    return {"kb": str(path), "queries": str(queries), "k": k, **retrieval_metrics(kb, read_queries(queries), k, modes)}
