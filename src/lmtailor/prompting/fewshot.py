"""Few-shot example selection: registered strategies, and a token budget that drops whole examples.

A strategy is built once per pool and then asked, per query, for pool indices in order of preference. random and
balanced pick the same examples for every query (so all prompts of a run share one prefix, which the scorer
computes once); nearest picks per query by BM25 similarity of the input fields.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any, Protocol

from lmtailor.errors import ConfigError
from lmtailor.prompting.task import Item, PromptTask, build_messages
from lmtailor.render import prompt_ids


class Selector(Protocol):
    def __call__(self, query: Item, k: int) -> list[int]: ...


SelectorFactory = Callable[[list[Item], PromptTask, int], Selector]
SELECTORS: dict[str, SelectorFactory] = {}


def register_selector(name: str, factory: SelectorFactory) -> None:
    """Make `few_shot.strategy: NAME` available. factory(pool, task, seed) -> selector(query, k) -> indices.

    Raises:
        ValueError: the name is taken or not a lowercase identifier, or factory is not callable.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"selector name must be lowercase letters, digits, - or _: {name!r}")
    if name in SELECTORS:
        raise ValueError(f"selector {name!r} is already registered")
    if not callable(factory):
        raise ValueError(f"selector {name!r}: factory must be callable")
    SELECTORS[name] = factory


def make_selector(name: str, pool: list[Item], task: PromptTask, seed: int = 0) -> Selector:
    if name not in SELECTORS:
        raise ConfigError(f"config key 'few_shot.strategy': unknown strategy {name!r}",
                          f"allowed values are {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name](pool, task, seed)


def input_text(task: PromptTask, item: Item) -> str:
    return "\n".join(str(item.fields.get(name, "")) for name in task.inputs)


def _not_query(pool: list[Item], task: PromptTask, query: Item, order: list[int], k: int) -> list[int]:
    # A pool that contains the query itself would show the model the answer.
    q = input_text(task, query)
    return [i for i in order if input_text(task, pool[i]) != q][:k]


def _random(pool: list[Item], task: PromptTask, seed: int) -> Selector:
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)

    def select(query: Item, k: int) -> list[int]:
        return _not_query(pool, task, query, order, k)
    return select


def _balanced(pool: list[Item], task: PromptTask, seed: int) -> Selector:
    """Labels take turns (in the task's label order), each label's examples in a seeded random order."""
    if task.output.labels is None:
        raise ConfigError("few_shot.strategy 'balanced' needs a labeled task (output.labels)",
                          "use random or nearest for free-text tasks")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {name: [] for name in task.output.labels}
    for i, item in enumerate(pool):
        by_label[item.reference(task)].append(i)
    for idx in by_label.values():
        rng.shuffle(idx)
    order: list[int] = []
    for turn in range(max((len(v) for v in by_label.values()), default=0)):
        order += [idx[turn] for idx in by_label.values() if turn < len(idx)]

    def select(query: Item, k: int) -> list[int]:
        return _not_query(pool, task, query, order, k)
    return select


_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _nearest(pool: list[Item], task: PromptTask, seed: int) -> Selector:
    """BM25 (Okapi) over the words of the input fields; the most similar example first."""
    from rank_bm25 import BM25Okapi

    docs = [_words(input_text(task, item)) or ["<empty>"] for item in pool]
    bm25 = BM25Okapi(docs)

    def select(query: Item, k: int) -> list[int]:
        scores = bm25.get_scores(_words(input_text(task, query)))
        order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
        return _not_query(pool, task, query, order, k)
    return select


register_selector("random", _random)
register_selector("balanced", _balanced)
register_selector("nearest", _nearest)


def fit_demos(task: PromptTask, template: str, demos: list[Item], query: Item, tok: Any, max_tokens: int,
              order: str = "selected") -> tuple[list[Item], list[int]]:
    """Drop the least preferred examples until the whole prompt fits max_tokens; then order them.

    Args:
        demos: examples in order of preference (most preferred first).
        order: "selected" keeps that order; "reversed" puts the most preferred example last, by the query.

    Returns:
        (the examples kept, in prompt order; the prompt's token ids). An example is never cut in the middle;
        if even the query alone exceeds the budget, the prompt has no examples (and is not truncated).
    """
    kept = list(demos)
    while True:
        shown = kept if order == "selected" else kept[::-1]
        ids = prompt_ids(tok, build_messages(task, template, shown, query))
        if len(ids) <= max_tokens or not kept:
            return shown, ids
        kept.pop()
