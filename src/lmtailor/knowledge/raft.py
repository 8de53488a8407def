"""Retrieval-aware training data (after RAFT, Zhang et al. 2024): every chat example's last request gets passages
from the knowledge base, placed by the same function serving uses (knowledge.prompt.with_passages).

Training examples: the gold passage is the passage that best matches the reference answer (it contains the
answer, else BM25 on the answer ranks it first). In a share `gold_absent` of the examples (chosen by the seed) the
gold passage is taken out and only distractors remain, so the model learns to answer without support too; in the
others the gold passage is put among the retrieved ones when retrieval missed it (`gold_forced`), so the model
learns to find it among distractors. Validation and test examples get plain retrieval, exactly what generate, chat
and serve will show, so evaluation measures the system as served.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lmtailor.config import RetrievalSettings
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.knowledge.base import Hit, KnowledgeBase
from lmtailor.knowledge.prompt import KBRetrieval, last_user, sources, with_passages, within_budget

_GOLD_DEPTH = 20  # BM25 candidates on the answer among which one containing the answer is preferred


def gold_index(kb: KnowledgeBase, answer: str) -> int | None:
    """The chunk that best supports `answer`: the best BM25 match on the answer that contains it, else the best
    BM25 match; None when nothing shares a word with it."""
    ranked = kb.ranking(answer, "bm25", _GOLD_DEPTH)
    flat = " ".join(answer.split())
    for i, _ in ranked:
        if flat and flat in " ".join(kb.chunks[i].text.split()):
            return i
    return ranked[0][0] if ranked else None


def _request_and_answer(ex: Example) -> tuple[str, str]:
    from lmtailor.data.retrieve import query

    assert ex.messages is not None
    answer = next(m["content"] for m in reversed(ex.messages) if m["role"] == "assistant")
    return query(ex), answer


def _augmented(ex: Example, hits: list[Hit], settings: RetrievalSettings, request: str) -> Example:
    assert ex.messages is not None
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    before = [dict(m) for m in ex.messages[:last]]
    user = last_user(before)
    assert user is not None
    before[user]["content"] = request  # the request as written, also when data.retrieved_examples added shots
    messages = with_passages(before, hits, settings) + [dict(m) for m in ex.messages[last:]]
    return Example(messages=messages, source=ex.source,
                   meta={**ex.meta, "query": request, "passages": sources(hits)})


def training_hits(retrieval: KBRetrieval, request: str, answer: str, rng: random.Random
                  ) -> tuple[list[Hit], bool | None]:
    """The passages of one training example (see the module docstring), and whether the gold passage is among
    them (None: no passage shares a word with the answer)."""
    s, kb = retrieval.settings, retrieval.kb
    found = kb.search(request, k=s.k + 1, mode=s.mode)
    gold = gold_index(kb, answer)
    if gold is None:
        return within_budget(found[:s.k], s.token_budget), None
    gold_id = kb.chunks[gold].id
    if rng.random() < s.gold_absent:
        hits = _fill([h for h in found if h.chunk.id != gold_id][:s.k], s.k, kb, rng, gold_id)
    else:
        hits = _fill(found[:s.k], s.k, kb, rng, gold_id)
        if s.gold_forced and all(h.chunk.id != gold_id for h in hits):
            hits = hits[:s.k - 1]
            hits.insert(rng.randrange(len(hits) + 1), Hit(kb.chunks[gold], 0.0, 0))
    # the gold passage must survive the budget when it is meant to be there: it goes in first
    chosen = within_budget(sorted(hits, key=lambda h: h.chunk.id != gold_id), s.token_budget)
    hits = [h for h in hits if any(h is c for c in chosen)]
    return hits, any(h.chunk.id == gold_id for h in hits)


def _fill(hits: list[Hit], k: int, kb: KnowledgeBase, rng: random.Random, gold_id: str) -> list[Hit]:
    """Up to k passages: when retrieval found fewer, random chunks join as distractors (as in RAFT)."""
    taken = {h.chunk.id for h in hits} | {gold_id}
    pool = [c for c in kb.chunks if c.id not in taken]
    extra = rng.sample(pool, min(len(pool), k - len(hits))) if len(hits) < k else []
    return hits + [Hit(c, 0.0, 0) for c in extra]


def with_kb_passages(train: Sequence[Example], held: Sequence[Sequence[Example]], settings: RetrievalSettings,
                     seed: int = 0) -> tuple[list[Example], list[list[Example]], dict[str, Any]]:
    """Training examples with RAFT passages, held-out splits with plain retrieval (see the module docstring).

    Returns:
        (training examples, held-out splits, statistics: training examples with the gold passage shown / without /
        with no gold passage found)

    Raises:
        ConfigError: an example is not a chat with an answer, or the knowledge base cannot be opened.
    """
    for ex in [*train, *(e for split in held for e in split)]:
        if ex.messages is None or not any(m["role"] == "assistant" for m in ex.messages):
            raise ConfigError(f"{ex.source or 'an example'}: retrieval.kb needs chat-shaped examples with an answer",
                              "unset retrieval.kb for text or labeled data")
    retrieval = KBRetrieval(settings)
    rng = random.Random(seed)
    out_train: list[Example] = []
    stats = {"raft_gold_shown": 0, "raft_gold_absent": 0, "raft_no_gold": 0}
    for ex in train:
        request, answer = _request_and_answer(ex)
        hits, gold = training_hits(retrieval, request, answer, rng)
        stats["raft_no_gold" if gold is None else "raft_gold_shown" if gold else "raft_gold_absent"] += 1
        out_train.append(_augmented(ex, hits, settings, request))
    out_held = []
    for split in held:
        requests = [_request_and_answer(ex)[0] for ex in split]
        out_held.append([_augmented(ex, retrieval.hits(r), settings, r) for ex, r in zip(split, requests, strict=True)])
    return out_train, out_held, stats
