"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): a document's fused score is the sum over the
rankings of 1 / (k + its rank there). It needs no score calibration between BM25 and cosine similarity."""

from __future__ import annotations

from collections.abc import Sequence

RRF_K = 60  # the constant of the original paper; it damps the weight of the very first ranks


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings (each a list of ids, best first) into (id, fused score), best first; ties keep the order in
    which ids first appear (the first ranking's order wins)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])
