"""Record formats: which fields a record has, and how it becomes an `Example`.

Formats live in a registry; `register_format` adds one. `detect_format` picks a format from the
fields of a record. A conversion raises `FieldError(field, message)` for a missing field or a value
of the wrong type; empty strings are accepted here and dropped later by `clean_examples`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lmtailor.data.example import Example
from lmtailor.data.sources import json_kind as kind
from lmtailor.errors import DataError
from lmtailor.toolcalls import ToolSpecError, check_calls, check_tools

Converter = Callable[[dict[str, Any], str], Example]
ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


class FieldError(DataError):
    """One field of a record is missing or wrong, e.g. `messages[2].role`: `must be one of ...`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class Format:
    """A registered record format: its name, the fields that identify it, and its converter."""

    name: str
    fields: frozenset[str]
    convert: Converter
    detect: bool = True


_BUILTIN: dict[str, Format] = {}
_CUSTOM: dict[str, Format] = {}
_registering_builtins = False  # True only while this module registers its own formats


def register_format(name: str, fields: Iterable[str], convert: Converter, *, detect: bool = True) -> Format:
    """Add a record format.

    Formats registered by users are tried by `detect_format` before the built-in ones, in the
    order they were registered, since whoever registers a format means their own records.

    Args:
        name: short name used in configs (`data.format`); must be new.
        fields: the required field names; a record with all of them is in this format.
        convert: `convert(record, source) -> Example`; raise `FieldError` for a bad field.
        detect: whether `detect_format` may pick this format.

    Returns:
        The registered `Format`.

    Raises:
        ValueError: the name is taken or empty, `fields` is empty or not strings, or `convert`
            is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"format name must be a non-empty string; got {name!r}")
    if name in _BUILTIN or name in _CUSTOM:
        raise ValueError(f"a format named '{name}' is already registered")
    if isinstance(fields, str):
        raise ValueError(f"fields must be a collection of field names, not the string {fields!r}")
    field_set = frozenset(fields)
    if not field_set or not all(isinstance(f, str) and f for f in field_set):
        raise ValueError(f"fields must be non-empty field names; got {sorted(map(repr, field_set))}")
    if not callable(convert):
        raise ValueError(f"convert must be callable; got {type(convert).__name__}")
    fmt = Format(name, field_set, convert, detect)
    (_BUILTIN if _registering_builtins else _CUSTOM)[name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a user-registered format (built-in ones stay); a no-op if it is not registered."""
    _CUSTOM.pop(name, None)


def format_names() -> list[str]:
    """Every registered format, in detection order."""
    return [*_CUSTOM, *_BUILTIN]


def get_format(name: str) -> Format:
    """The format called `name`.

    Raises:
        DataError: no format has that name (the message lists the known ones).
    """
    fmt = _CUSTOM.get(name) or _BUILTIN.get(name)
    if fmt is None:
        raise DataError(f"unknown data format '{name}'", hint="known formats: " + ", ".join(format_names()))
    return fmt


def _describe_formats() -> str:
    return "; ".join(f"{f.name} ({', '.join(sorted(f.fields))})" for f in (*_CUSTOM.values(), *_BUILTIN.values()))


def detect_format(record: dict[str, Any]) -> str:
    """Name of the first format (in detection order) whose required fields the record has all of.

    Raises:
        DataError: no format matches; the message names the fields found and the formats known.
    """
    keys = set(record)
    for fmt in (*_CUSTOM.values(), *_BUILTIN.values()):
        if fmt.detect and fmt.fields <= keys:
            return fmt.name
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise DataError(f"cannot tell the record format from its fields ({found})",
                    hint=f"known formats: {_describe_formats()}; rename the fields or set data.format")


def convert_record(record: dict[str, Any], fmt: str, source: str, system_prompt: str | None = None) -> Example:
    """Convert one record with format `fmt`; add `system_prompt` to a conversation without a system turn.

    Raises:
        FieldError: a field is missing or has the wrong type.
        DataError: `fmt` is not a registered format.
    """
    example = get_format(fmt).convert(record, source)
    if system_prompt and example.messages is not None and \
            not (example.messages and example.messages[0]["role"] == "system"):
        example.messages.insert(0, {"role": "system", "content": system_prompt})
    return example


# --- helpers for converters ------------------------------------------------------------------------

def require_str(record: dict[str, Any], key: str, field: str | None = None) -> str:
    """`record[key]`, which must be present and a string (possibly empty)."""
    field = field or key
    if key not in record:
        raise FieldError(field, "is missing")
    value = record[key]
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string; got {kind(value)}")
    return value


def optional_str(record: dict[str, Any], key: str) -> str | None:
    """`record[key]` if present and not null/blank; it must then be a string."""
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(key, f"must be a string; got {kind(value)}")
    return value if value.strip() else None


def extra_fields(record: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    """The fields of a record that a converter did not use, kept as `Example.meta`."""
    used = set(used)
    return {k: v for k, v in record.items() if k not in used}


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI-style content parts: keep the text ones, joined.
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
        texts = []
        for j, part in enumerate(value):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise FieldError(f"{field}[{j}]", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise FieldError(field, f"must be a string; got {kind(value)}")


def _turns(record: dict[str, Any], key: str, role_key: str, text_key: str, need_assistant: bool = True,
           tools: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """Validate a list of turns (`messages` or ShareGPT `conversations`) into chat messages.

    An assistant turn may carry `tool_calls` (then its text may be missing); a `tool` turn needs the record to
    offer tools.
    """
    if key not in record:
        raise FieldError(key, "is missing")
    turns = record[key]
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        # A list stored as a JSON string, as CSV and TSV files must.
        try:
            turns = json.loads(turns)
        except (ValueError, RecursionError):
            raise FieldError(key, "is a string that is not a valid JSON list") from None
    if not isinstance(turns, list):
        raise FieldError(key, f"must be a list of {{{role_key}, {text_key}}} objects; got {kind(turns)}")
    if not turns:
        raise FieldError(key, "is empty")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise FieldError(where, f"must be an object with {role_key} and {text_key}; got {kind(turn)}")
        if role_key not in turn:
            raise FieldError(f"{where}.{role_key}", "is missing")
        raw_role = turn[role_key]
        if not isinstance(raw_role, str):
            raise FieldError(f"{where}.{role_key}", f"must be a string; got {kind(raw_role)}")
        role = raw_role.strip().lower()
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise FieldError(f"{where}.{role_key}", f"must be one of {', '.join(ROLES)}; got {raw_role!r}")
        if role == "system" and i > 0:
            raise FieldError(f"{where}.{role_key}", "a system message may only come first")
        if role == "tool" and tools is None:
            raise FieldError(f"{where}.{role_key}", "a tool message needs the record's `tools` list")
        calls = turn.get("tool_calls")
        if calls is not None and role != "assistant":
            raise FieldError(f"{where}.tool_calls", "only an assistant message may call tools")
        if text_key not in turn and calls is None:
            raise FieldError(f"{where}.{text_key}", "is missing")
        message = {"role": role, "content": _content(turn.get(text_key) or "", f"{where}.{text_key}")}
        if calls is not None:
            names = {t["function"]["name"] for t in tools} if tools is not None else None
            try:
                message["tool_calls"] = json.dumps(check_calls(calls, names, f"{where}.tool_calls"),
                                                   ensure_ascii=False, sort_keys=True)
            except ToolSpecError as e:
                field, _, why = str(e).partition(": ")
                raise FieldError(field, why) from None
        messages.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise FieldError(key, "must contain at least one assistant turn")
    return messages


def _with_system(system: str | None, *turns: dict[str, str]) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *turns]


# --- built-in formats --------------------------------------------------------------------------------

def _chat(record: dict[str, Any], source: str) -> Example:
    tools = None
    if record.get("tools") is not None:
        try:
            tools = check_tools(record["tools"])
        except ToolSpecError as e:
            field, _, why = str(e).partition(": ")
            raise FieldError(field, why) from None
    return Example(messages=_turns(record, "messages", "role", "content", tools=tools), source=source,
                   meta=extra_fields(record, ["messages", "tools"]), tools=tools)


def _sharegpt(record: dict[str, Any], source: str) -> Example:
    return Example(messages=_turns(record, "conversations", "from", "value"), source=source,
                   meta=extra_fields(record, ["conversations"]))


def _alpaca(record: dict[str, Any], source: str) -> Example:
    instruction = require_str(record, "instruction")
    output = require_str(record, "output")
    extra = optional_str(record, "input")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = _with_system(optional_str(record, "system"), {"role": "user", "content": user},
                            {"role": "assistant", "content": output})
    return Example(messages=messages, source=source,
                   meta=extra_fields(record, ["instruction", "input", "output", "system"]))


# The tool of the `shell_tool` format (configs/tools-shell.yaml): one shell command, run by the caller.
SHELL_TOOL = {"type": "function", "function": {
    "name": "run_shell", "description": "Run one shell command and return its output",
    "parameters": {"type": "object", "properties": {"command": {"type": "string", "description": "the command"}},
                   "required": ["command"]}}}


def _shell_tool(record: dict[str, Any], source: str) -> Example:
    """An instruction/output pair whose output is a shell command, as a call of run_shell(command=output)."""
    instruction, command = require_str(record, "instruction"), require_str(record, "output")
    call = json.dumps([{"type": "function", "function": {"name": "run_shell", "arguments": {"command": command}}}],
                      ensure_ascii=False, sort_keys=True)
    messages = [{"role": "user", "content": instruction},
                {"role": "assistant", "content": "", "tool_calls": call}]
    return Example(messages=messages, source=source, tools=[SHELL_TOOL],
                   meta=extra_fields(record, ["instruction", "input", "output", "system"]))


def _prompt_completion(record: dict[str, Any], source: str) -> Example:
    messages = [{"role": "user", "content": require_str(record, "prompt")},
                {"role": "assistant", "content": require_str(record, "completion")}]
    return Example(messages=messages, source=source, meta=extra_fields(record, ["prompt", "completion"]))


def _paired(record: dict[str, Any], source: str) -> Example:
    src, tgt = require_str(record, "source"), require_str(record, "target")
    return Example(messages=[{"role": "user", "content": src}, {"role": "assistant", "content": tgt}],
                   source=source, meta={**extra_fields(record, []), "source": src, "target": tgt})


def _labeled(record: dict[str, Any], source: str) -> Example:
    text = require_str(record, "text")
    if "label" not in record:
        raise FieldError("label", "is missing")
    label = record["label"]
    if not isinstance(label, str | int | float | bool):
        raise FieldError("label", f"must be a string or a number; got {kind(label)}")
    if isinstance(label, str) and not label.strip():
        raise FieldError("label", "is empty")
    return Example(text=text, source=source, meta={**extra_fields(record, ["text"]), "label": label})


def _text(record: dict[str, Any], source: str) -> Example:
    return Example(text=require_str(record, "text"), source=source, meta=extra_fields(record, ["text"]))


# --- preference formats: a prompt (or a `messages` history), then answers -----------------------------------
# The Example holds the prompt plus the chosen (or only) answer as `messages`, so the one renderer renders it and
# sft can train on it too; the rejected answer's turns sit in meta["rejected"], the KTO label in meta["desirable"].

def _prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation before the answer: `prompt` (a string, or a list of turns) or `messages`; it ends with a
    user turn."""
    if "messages" in record:
        history = _turns(record, "messages", "role", "content", need_assistant=False)
        key = "messages"
    elif isinstance(record.get("prompt"), list):
        history = _turns(record, "prompt", "role", "content", need_assistant=False)
        key = "prompt"
    else:
        return [{"role": "user", "content": require_str(record, "prompt")}]
    if history[-1]["role"] != "user":
        raise FieldError(f"{key}[{len(history) - 1}].role", "the last turn before the answer must be user")
    return history


def _answer(record: dict[str, Any], key: str) -> list[dict[str, str]]:
    """An answer: a string (one assistant turn) or a list of assistant turns."""
    if key not in record:
        raise FieldError(key, "is missing")
    if isinstance(record[key], str) and not record[key].lstrip().startswith("["):
        text = record[key].strip()
        if not text:
            raise FieldError(key, "is empty")
        return [{"role": "assistant", "content": text}]
    turns = _turns(record, key, "role", "content", need_assistant=False)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            raise FieldError(f"{key}[{i}].role", f"an answer holds assistant turns only; got {turn['role']!r}")
    if not turns[-1]["content"].strip():
        raise FieldError(f"{key}[{len(turns) - 1}].content", "is empty")
    return [{**t, "content": t["content"].strip()} for t in turns]


def _preference(record: dict[str, Any], source: str) -> Example:
    history = _prompt(record)
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    return Example(messages=history + chosen, source=source,
                   meta={**extra_fields(record, ["prompt", "messages", "chosen", "rejected"]), "rejected": rejected})


def _unpaired(record: dict[str, Any], source: str) -> Example:
    history = _prompt(record)
    answer = _answer(record, "completion")
    if "label" not in record:
        raise FieldError("label", "is missing")
    label = record["label"]
    if not isinstance(label, bool):
        raise FieldError("label", f"must be true (a desirable completion) or false; got {kind(label)} {label!r}")
    return Example(messages=history + answer, source=source,
                   meta={**extra_fields(record, ["prompt", "messages", "completion", "label"]), "desirable": label})


_registering_builtins = True
# preference formats first: their records also carry the fields of chat / prompt_completion / labeled
register_format("preference", {"chosen", "rejected"}, _preference)
register_format("unpaired", {"completion", "label"}, _unpaired)
register_format("chat", {"messages"}, _chat)
register_format("sharegpt", {"conversations"}, _sharegpt)
register_format("alpaca", {"instruction", "output"}, _alpaca)
register_format("prompt_completion", {"prompt", "completion"}, _prompt_completion)
register_format("paired", {"source", "target"}, _paired)
register_format("labeled", {"text", "label"}, _labeled)
register_format("text", {"text"}, _text)
register_format("shell_tool", {"instruction", "output"}, _shell_tool, detect=False)
_registering_builtins = False
