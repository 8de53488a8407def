"""The in-memory shapes of data: `Example` (what every data format is converted to) and `Tokenized` (one rendered,
tokenized training sequence)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """A conversation (`messages`) or a raw text (`text`), plus where it came from.

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]; an assistant message that
        calls tools also has "tool_calls": the calls as canonical JSON text (`lmtailor.toolcalls`).
    tools: the OpenAI function tools the conversation offers (`lmtailor.toolcalls.check_tools`), or None.
    source: "file:line" of the record, used in error messages.
    meta: extra fields of the record (e.g. a label), kept for tasks that need them.
    """

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        assert (self.messages is None) != (self.text is None), "an Example is either chat or text"


IGNORE = -100


@dataclass
class Tokenized:
    """One training sequence. `labels[t]` is the token at t when supervised, else -100 (not yet shifted)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def n_supervised(self) -> int:
        # Targets are labels shifted left by one: the first label never counts.
        return sum(1 for x in self.labels[1:] if x != IGNORE)
