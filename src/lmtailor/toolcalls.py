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
    {"name": "run_shell", "arguments": {"command":"ls -la"}}
    </tool_call>

(the arguments and the offered functions as Go's encoding/json writes them, `go_json` and `ollama_function`, so
that an Ollama Modelfile's TEMPLATE renders the same text: `lmtailor.ollama`).

Parsing (the documented rule, `parse_tool_calls`): every complete `<tool_call>...</tool_call>` block of the
model's answer whose body is a JSON object with a `name` among the offered tools and `arguments` that are a JSON
object (or a string holding one) is a call; the text outside the blocks is the content. A block that is not
closed (a cut answer), not JSON, or names an unknown tool is not a call and stays in the content as written.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
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


def go_json(value: Any) -> str:
    """`value` as JSON the way Go's encoding/json writes a decoded JSON value (what Ollama's templates print).

    Compact, object keys sorted, numbers as float64 (1.0 -> 1, 1e-07 -> 1e-7), and <, >, &, U+2028, U+2029
    escaped as \\u sequences; so the Modelfile's TEMPLATE and lmtailor's renderer write the same characters.
    """
    if isinstance(value, dict):
        return "{" + ",".join(go_json(str(k)) + ":" + go_json(value[k]) for k in sorted(value, key=str)) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).translate(_GO_ESCAPES)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return _go_float(float(value))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


_GO_ESCAPES = {ord(c): f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"}


def _go_float(f: float) -> str:
    """strconv.FormatFloat(f, 'f' or 'e', -1, 64) as encoding/json picks it: shortest digits that round-trip."""
    if f != f or f in (float("inf"), float("-inf")):
        raise TypeError("JSON has no NaN or infinity")
    if f == 0:
        return "0"
    if 1e-6 <= abs(f) < 1e21:
        text = format(Decimal(repr(f)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, exp = repr(f).split("e")
    return f"{mantissa}e{exp[0]}{exp[1:].lstrip('0') or '0'}"


def ollama_function(fn: dict[str, Any]) -> str:
    """A tool's function as Ollama's template data marshals it (api.Tool read from the request, then JSON).

    Field order and the kept schema keywords are Ollama's: name, description, parameters {type, $defs, items,
    required, properties}, each property {anyOf, type, items, description, enum, properties, required}; other
    JSON-schema keywords (default, minimum, ...) are not shown to the model, by lmtailor as by Ollama.
    """
    params = fn.get("parameters") or {}
    out = {"name": fn["name"], "description": str(fn.get("description", ""))}
    body = [f'"type":{go_json(str(params.get("type", "")))}']
    for key in ("$defs", "items"):
        if params.get(key) is not None:
            body.append(f"{go_json(key)}:{go_json(params[key])}")
    if params.get("required"):
        body.append(f'"required":{go_json(list(params["required"]))}')
    props = params.get("properties")
    body.append('"properties":' + ("null" if props is None else "{" + ",".join(
        f"{go_json(k)}:{_ollama_property(props[k])}" for k in sorted(props)) + "}"))
    return (f'{{"name":{go_json(out["name"])},"description":{go_json(out["description"])},'
            f'"parameters":{{{",".join(body)}}}}}')


def _ollama_property(prop: Any) -> str:
    """One api.ToolProperty: omitempty fields left out; nested properties keep their order (an ordered map)."""
    prop = prop if isinstance(prop, dict) else {}
    parts = []
    if prop.get("anyOf"):
        parts.append('"anyOf":[' + ",".join(_ollama_property(p) for p in prop["anyOf"]) + "]")
    kind = prop.get("type")
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    if kinds:
        parts.append('"type":' + go_json(kinds[0] if len(kinds) == 1 else kinds))
    if prop.get("items") is not None:
        parts.append('"items":' + go_json(prop["items"]))
    if prop.get("description"):
        parts.append('"description":' + go_json(str(prop["description"])))
    if prop.get("enum"):
        parts.append('"enum":' + go_json(list(prop["enum"])))
    if isinstance(prop.get("properties"), dict):
        parts.append('"properties":{' + ",".join(f"{go_json(k)}:{_ollama_property(v)}"
                                                 for k, v in prop["properties"].items()) + "}")
    if prop.get("required"):
        parts.append('"required":' + go_json(list(prop["required"])))
    return "{" + ",".join(parts) + "}"


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that offers `tools` (one `ollama_function` line each) and states the calling convention."""
    listing = "\n".join(ollama_function(t["function"]) for t in tools)
    return ("You can call these tools:\n<tools>\n" + listing + "\n</tools>\n"
            "To call a tool, answer with " + OPEN + "\n{\"name\": <tool name>, \"arguments\": <JSON object>}\n"
            + CLOSE)


def format_call(call: dict[str, Any]) -> str:
    """One call as its <tool_call> block; the arguments as `go_json` writes them (as Ollama's templates do)."""
    fn = call["function"]
    args = fn["arguments"] if isinstance(fn["arguments"], dict) else json.loads(fn["arguments"])
    return (OPEN + '\n{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ' + go_json(args)
            + "}\n" + CLOSE)


def answer_text(content: str, calls: list[dict[str, Any]] | None) -> str:
    """An assistant message as text: its content, then each call as a <tool_call> block (one per line)."""
    if not calls:
        return content
    blocks = "\n".join(format_call(c) for c in calls)
    return f"{content}\n{blocks}" if content else blocks


def plain_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Fold tools and tool calls into role/content messages for a template that knows nothing of tools."""
    out: list[dict[str, str]] = []
    for m in messages:
        out.append({"role": m["role"], "content": answer_text(m.get("content") or "", m.get("tool_calls"))})
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
