"""Retrieved passages into a conversation: the one function every path (training, evaluation, generate, chat,
serve) uses, so the messages, and therefore the prompt the renderer (render.py) makes of them, are the same bytes
everywhere.

The query is the last user turn as the user wrote it. Passages are the k best chunks of the knowledge base (BM25,
dense or hybrid), best first, as many as fit `token_budget` (counted in the tokens the base was chunked with), each
written through `template`; the block goes before or after the request in that user turn, or into the system
message. The passages used are returned as sources: {n, source, lines, heading, score}.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtailor.config import RetrievalSettings
from lmtailor.errors import ConfigError
from lmtailor.knowledge.base import Hit, KnowledgeBase

Messages = list[dict[str, str]]

_KBS: dict[tuple[str, float], KnowledgeBase] = {}  # opened bases, by folder and manifest time


def open_kb(path: str) -> KnowledgeBase:
    """A knowledge base, opened once per process (a server and a training run search it many times)."""
    folder = Path(path)
    manifest = folder / "manifest.json"
    key = (str(folder.resolve()), manifest.stat().st_mtime if manifest.is_file() else 0.0)
    if key not in _KBS:
        _KBS[key] = KnowledgeBase.open(folder)
    return _KBS[key]


def within_budget(hits: Sequence[Hit], budget: int) -> list[Hit]:
    """The hits, best first, while their tokens fit the budget (a passage that does not fit is skipped, a shorter
    one after it may still fit)."""
    out, used = [], 0
    for h in hits:
        if used + h.chunk.n_tokens <= budget:
            out.append(h)
            used += h.chunk.n_tokens
    return out


def passage_block(hits: Sequence[Hit], settings: RetrievalSettings) -> str:
    """The passages as text: the intro line, then each passage through the template, numbered from 1."""
    parts = []
    for n, h in enumerate(hits, start=1):
        c = h.chunk
        try:
            parts.append(settings.template.format(n=n, source=c.source, lines=c.lines, heading=c.heading,
                                                  text=c.text))
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"retrieval.template {settings.template!r}: {e}",
                              "fields are {n} {source} {lines} {heading} {text}; write {{ and }} for braces") from None
    return f"{settings.intro}\n\n" + "\n\n".join(parts) if parts else ""


def sources(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    return [{"n": n, "source": h.chunk.source, "lines": h.chunk.lines, "heading": h.chunk.heading,
             "score": round(h.score, 6)} for n, h in enumerate(hits, start=1)]


def last_user(messages: Messages) -> int | None:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return users[-1] if users else None


def with_passages(messages: Messages, hits: Sequence[Hit], settings: RetrievalSettings) -> Messages:
    """A copy of the conversation with the passages placed as `settings.position` says (no passages: unchanged)."""
    out = [dict(m) for m in messages]
    block = passage_block(hits, settings)
    user = last_user(out)
    if not block or user is None:
        return out
    if settings.position == "system":
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
        return out
    request = out[user]["content"]
    out[user]["content"] = (f"{block}\n\n{settings.question}{request}" if settings.position == "before"
                            else f"{settings.question}{request}\n\n{block}")
    return out


class KBRetrieval:
    """The retrieval of a `retrieval:` section, applied to prompts: `with_sources(prompt) -> (prompt, sources)`.

    A prompt is a string (one user turn) or a conversation; what is searched is its last user turn.
    """

    def __init__(self, settings: RetrievalSettings, kb: KnowledgeBase | None = None) -> None:
        if kb is None and not settings.kb:
            raise ConfigError("retrieval.kb is not set", "name a knowledge base folder (lmtailor kb build)")
        self.settings = settings
        self.kb = kb if kb is not None else open_kb(str(settings.kb))

    def hits(self, query: str) -> list[Hit]:
        s = self.settings
        found = self.kb.search(query, k=s.k, mode=s.mode)
        return within_budget(found, s.token_budget)

    def with_sources(self, prompt: str | Messages) -> tuple[str | Messages, list[dict[str, Any]]]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        user = last_user(messages)
        if user is None:
            return prompt, []
        hits = self.hits(messages[user]["content"])
        out = with_passages(messages, hits, self.settings)
        if isinstance(prompt, str) and len(out) == 1:
            return out[0]["content"], sources(hits)
        return out, sources(hits)

    def __call__(self, prompt: str | Messages) -> str | Messages:
        return self.with_sources(prompt)[0]
