"""Tool calling through the chat API: check `tools`/`tool_choice`, pass calls in, parse calls out.

The model sees the tools as `lmtailor.render` renders them (the chat template's own tool support, or the
<tool_call> convention of `lmtailor.toolcalls`); its answer is split into content and `tool_calls` by
`lmtailor.toolcalls.parse_tool_calls` (finish_reason "tool_calls" when it made at least one valid call).
"""

from __future__ import annotations

import json
from typing import Any

from lmtailor.serve.schemas import APIError
from lmtailor.toolcalls import ToolSpecError, check_calls, check_tools, parse_tool_calls


def request_tools(tools: list[Any] | None, tool_choice: Any, stream: bool) -> list[dict[str, Any]] | None:
    """The tools the model is offered (None: none), or a 400 for a bad list or an unsupported choice."""
    if tool_choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice must be 'auto' or 'none' (forcing a call is not supported)",
                       "unsupported_parameter", "tool_choice")
    if not tools or tool_choice == "none":
        return None
    if stream:
        raise APIError(400, "streaming is not supported together with tools; send stream=false",
                       "unsupported_parameter", "stream")
    try:
        return check_tools(tools)
    except ToolSpecError as e:
        raise APIError(400, str(e), "invalid_tools", "tools") from None


def message_calls(calls: list[Any] | None, where: str) -> str | None:
    """An assistant message's tool_calls as the canonical JSON text the renderer reads (None: no calls)."""
    if not calls:
        return None
    try:
        return json.dumps(check_calls(calls, None, where), ensure_ascii=False, sort_keys=True)
    except ToolSpecError as e:
        raise APIError(400, str(e), "invalid_messages", "messages") from None


def answer(text: str, reason: str, tools: list[dict[str, Any]] | None) -> tuple[dict[str, Any], str]:
    """The assistant message of a choice and its finish_reason."""
    if not tools:
        return {"role": "assistant", "content": text}, reason
    content, calls = parse_tool_calls(text, tools)
    if not calls:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"
