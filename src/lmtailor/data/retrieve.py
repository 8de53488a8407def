"""Worked examples retrieved into each prompt (`data.retrieved_examples: k`).

Each chat example's last request gets the k training examples whose requests are most similar to it (BM25 over
lowercased words, `rank-bm25`), shown as request/answer pairs before it. A training example never retrieves
itself, so the model learns to use similar solved examples rather than to copy its own answer; validation and test
examples retrieve from the training set only, which is exactly what the nearest-answer baseline may use. The
original request stays in `meta["query"]`, so baselines and reports see the data as it was.

The model then answers with the closest solved examples in view: it can copy the nearest answer where that is right
and edit it where the request differs, which a fine-tuned model without them has to recall from its weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.toolcalls import answer_text

INTRO = "Similar requests with their answers:"
OUTRO = "Now answer this request the same way:"


def _turns(ex: Example) -> tuple[int, int]:
    """(index of the last assistant turn, index of the user turn before it)."""
    assert ex.messages is not None
    answer = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    request = max(i for i, m in enumerate(ex.messages[:answer]) if m["role"] == "user")
    return answer, request


def query(ex: Example) -> str:
    """The example's own last request (before any retrieved examples were added)."""
    if "query" in ex.meta:
        return str(ex.meta["query"])
    assert ex.messages is not None
    return ex.messages[_turns(ex)[1]]["content"]


def answer_of(message: dict[str, str]) -> str:
    """An assistant turn as a shown answer: its content, and each tool call as its <tool_call> block."""
    calls = message.get("tool_calls")
    return answer_text(message.get("content") or "", json.loads(calls) if calls else None)


def retrieval_prompt(request: str, shots: Sequence[tuple[str, str]]) -> str:
    """The request with its retrieved (request, answer) pairs before it, least similar first."""
    blocks = "\n\n".join(f"Request: {q}\nAnswer: {a}" for q, a in shots)
    return f"{INTRO}\n\n{blocks}\n\n{OUTRO}\n{request}" if shots else request


class Retriever:
    """BM25 over the training requests; `nearest(text, k, skip)` gives (request, answer) pairs, least similar
    first (the nearest sits next to the request it helps)."""

    def __init__(self, train: Sequence[Example]) -> None:
        from rank_bm25 import BM25Okapi

        from lmtailor.baselines import words

        self._words = words
        self.pairs: list[tuple[str, str]] = []
        for ex in train:
            answer, request = _turns(ex)
            assert ex.messages is not None
            self.pairs.append((query(ex), answer_of(ex.messages[answer])))
        self.index = BM25Okapi([words(q) or [""] for q, _ in self.pairs]) if self.pairs else None

    def nearest(self, text: str, k: int, skip: int | None = None, skip_same: bool = False
                ) -> list[tuple[str, str]]:
        """The k pairs nearest to `text`; `skip` leaves out one training index, `skip_same` every pair whose
        request is `text` itself (a training request asked again must not be shown its own answer)."""
        if self.index is None or k <= 0:
            return []
        scores = np.asarray(self.index.get_scores(self._words(text)), dtype=float)
        if skip is not None:
            scores[skip] = -np.inf
        if skip_same:
            own = " ".join(text.split())
            for i, (request, _) in enumerate(self.pairs):
                if " ".join(request.split()) == own:
                    scores[i] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.pairs[i] for i in reversed(top) if np.isfinite(scores[i])]


def _augmented(ex: Example, shots: list[tuple[str, str]]) -> Example:
    assert ex.messages is not None
    _, request = _turns(ex)
    messages = [dict(m) for m in ex.messages]
    own = query(ex)
    messages[request]["content"] = retrieval_prompt(own, shots)
    meta = {**ex.meta, "query": own}
    if shots:  # the pair nearest to the request, for the reports
        meta["nearest"] = list(shots[-1])
    return Example(messages=messages, source=ex.source, meta=meta)


def with_retrieved(train: Sequence[Example], held: Sequence[Sequence[Example]], k: int
                   ) -> tuple[list[Example], list[list[Example]]]:
    """Training examples with k retrieved from the other training examples, and each held-out split with k from the
    training set.

    Raises:
        ConfigError: an example is not a chat with an assistant answer (text or labeled records).
    """
    for ex in [*train, *(e for split in held for e in split)]:
        if ex.messages is None or not any(m["role"] == "assistant" for m in ex.messages):
            raise ConfigError(f"{ex.source or 'an example'}: data.retrieved_examples needs chat-shaped examples with "
                              "an answer (alpaca, chat, sharegpt, prompt_completion or paired records)",
                              "set data.retrieved_examples: 0 for text or labeled data")
    retriever = Retriever(train)
    out_train = [_augmented(ex, retriever.nearest(query(ex), k, skip=i)) for i, ex in enumerate(train)]
    out_held = [[_augmented(ex, retriever.nearest(query(ex), k)) for ex in split] for split in held]
    return out_train, out_held


class RunRetrieval:
    """The retrieval a run was trained with, applied to new prompts (generate, chat, serve): a prompt's last user
    turn gets its k most similar training examples, exactly as in training."""

    def __init__(self, retriever: Retriever, k: int) -> None:
        self.retriever, self.k = retriever, k

    def augment(self, examples: Sequence[Example]) -> list[Example]:
        """Held-out examples (`lmtailor eval` data) with their k nearest training pairs, as training's held-out
        splits got them (`with_retrieved`); text and labeled records pass through."""
        return [_augmented(ex, self.retriever.nearest(query(ex), self.k))
                if ex.messages is not None and any(m["role"] == "assistant" for m in ex.messages) else ex
                for ex in examples]

    def with_sources(self, prompt: str | list[dict[str, str]]) -> tuple[str | list[dict[str, str]], None]:
        """The prompt with its retrieved examples, and None: examples cite no documents (see KBRetrieval)."""
        return self(prompt), None

    def __call__(self, prompt: str | list[dict[str, str]], training_request: bool = False
                 ) -> str | list[dict[str, str]]:
        """`training_request`: the request may be one of the run's own training requests (`pairs make` answering
        the training data): its own pair is left out, as training left it out, so the answer is not shown."""
        if isinstance(prompt, str):
            return retrieval_prompt(prompt, self.retriever.nearest(prompt, self.k, skip_same=training_request))
        users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
        if not users:
            return prompt
        out = [dict(m) for m in prompt]
        text = out[users[-1]]["content"]
        out[users[-1]]["content"] = retrieval_prompt(
            text, self.retriever.nearest(text, self.k, skip_same=training_request))
        return out
