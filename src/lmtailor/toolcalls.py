"""Tool calling: the tools a conversation offers, the calls an assistant makes, and how both become text.

Data (chat format): a record may carry `tools`, a list of OpenAI function tools
(`{"type": "function", "function": {"name", "description", "parameters"}}`); an assistant message may carry
`tool_calls` (`[{"type": "function", "function": {"name", "arguments"}}]`, arguments an object or its JSON text)
and a `tool` message holds a tool's result.

Rendering: a chat template that handles tools itself (it mentions `tools` and `tool_calls`) gets them as
transformers passes them; for any other template the conversation is folded into plain messages first
(`plain_messages`): the tool list goes into the system message with the calling convention, and every call is
written into its assistant message as

    <tool_call>
    {"name": "run_shell", "arguments": {"command": "ls -la"}}
    </tool_call>

Parsing (the documented rule, `parse_tool_calls`): every complete `<tool_call>...</tool_call>` block of the
model's answer whose body is a JSON object with a `name` among the offered tools and `arguments` that are a JSON
object (or a string holding one) is a call; the text outside the blocks is the content. A block that is not
closed (a cut answer), not JSON, or names an unknown tool is not a call and stays in the content as written.
"""

from __future__ import annotations

import json
import re
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class ToolSpecError(ValueError):
    """A tools list or a tool call that does not have the OpenAI shape; the message names the field."""


def check_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """Validate an OpenAI tools list; returns it normalized (type "function", parameters present)."""
    if not isinstance(tools, list) or not tools:
        raise ToolSpecError(f"{where}: must be a non-empty list of function tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolSpecError(f"{at}: must be an object with type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolSpecError(f"{at}.function: must be an object with name, description, parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ToolSpecError(f"{at}.function.name: must be 1-64 letters, digits, _ . or -; got {name!r}")
        if name in seen:
            raise ToolSpecError(f"{at}.function.name: '{name}' is listed twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolSpecError(f"{at}.function.parameters: must be a JSON schema object")
        out.append({"type": "function", "function": {"name": name, "description": str(fn.get("description", "")),
                                                     "parameters": params}})
    return out


def check_calls(calls: Any, names: set[str] | None, where: str) -> list[dict[str, Any]]:
    """Validate an assistant message's tool_calls; arguments become JSON objects."""
    if not isinstance(calls, list) or not calls:
        raise ToolSpecError(f"{where}: must be a non-empty list of calls")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolSpecError(f"{at}.function.name: is missing")
        if names is not None and fn["name"] not in names:
            raise ToolSpecError(f"{at}.function.name: '{fn['name']}' is not in the record's tools "
                                f"({', '.join(sorted(names))})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise ToolSpecError(f"{at}.function.arguments: is not valid JSON") from None
        if not isinstance(args, dict):
            raise ToolSpecError(f"{at}.function.arguments: must be a JSON object")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def template_handles_tools(tok: Any) -> bool:
    template = getattr(tok, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that offers `tools` and states the calling convention."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False, sort_keys=True) for t in tools)
    return ("You can call these tools:\n<tools>\n" + listing + "\n</tools>\n"
            "To call a tool, answer with " + OPEN + "\n{\"name\": <tool name>, \"arguments\": <JSON object>}\n"
            + CLOSE)


def format_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    args = fn["arguments"] if isinstance(fn["arguments"], dict) else json.loads(fn["arguments"])
    return OPEN + "\n" + json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False) + "\n" + CLOSE


def plain_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Fold tools and tool calls into role/content messages for a template that knows nothing of tools."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = "\n".join(format_call(c) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": m["role"], "content": content})
    if tools:
        offer = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{offer}"}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Split a model's answer into (content, tool calls) by the rule in this module's docstring.

    Calls come back in OpenAI's response shape: {"id", "type": "function", "function": {"name", "arguments"}}
    with arguments as JSON text. The content keeps every block that is not a valid call, as written.
    """
    names = {t["function"]["name"] for t in tools} if tools else None
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _one_call(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{len(calls)}", "type": "function",
                      "function": {"name": call[0], "arguments": json.dumps(call[1], ensure_ascii=False)}})
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return content, calls


def _one_call(body: str, names: set[str] | None) -> tuple[str, dict[str, Any]] | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], args
