"""The Ollama Modelfile: its TEMPLATE, rendered by a small Go-template evaluator of the constructs it uses,
writes exactly the prompt text of lmtailor's renderer for several conversations and chat templates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from conftest import CORPUS

# ---- a small evaluator of the Go template constructs the Modelfile uses ------------------------------------------

_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|\$?\.?[A-Za-z_][A-Za-z0-9_.]*|\$|\d+)')


def _parse_expr(tokens: list[str], pos: int) -> tuple[Any, int]:
    """One operand or a call: returns (tree, next position)."""
    items = []
    while pos < len(tokens) and tokens[pos] != ")":
        item, pos = _operand(tokens, pos)
        items.append(item)
    return (items[0] if len(items) == 1 else ("call", items)), pos


def _operand(tokens: list[str], pos: int) -> tuple[Any, int]:
    tok = tokens[pos]
    if tok == "(":
        inner, pos = _parse_expr(tokens, pos + 1)
        assert tokens[pos] == ")"
        pos += 1
        while pos < len(tokens) and tokens[pos].startswith(".") and tokens[pos - 1] == ")":
            inner, pos = ("field", inner, tokens[pos][1:]), pos + 1
        return inner, pos
    if tok.startswith('"'):
        return ("lit", tok[1:-1].encode().decode("unicode_escape")), pos + 1
    if tok.isdigit():
        return ("lit", int(tok)), pos + 1
    return ("name", tok), pos + 1


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot read {text[pos:]!r}"
        out.append(m.group(1))
        pos = m.end()
    return out


def _eval(tree: Any, dot: Any, root: Any, scope: dict[str, Any]) -> Any:
    kind = tree[0]
    if kind == "lit":
        return tree[1]
    if kind == "field":
        return _fields(_eval(tree[1], dot, root, scope), tree[2])
    if kind == "name":
        name = tree[1]
        if name.startswith("."):
            return _fields(dot, name[1:])
        if name.startswith("$"):
            var, _, rest = name.partition(".")
            return _fields(scope[var], rest)
        return name  # a function name
    fn, *args = tree[1]
    fname = fn[1]
    vals = [_eval(a, dot, root, scope) for a in args]
    if fname == "eq":
        return vals[0] == vals[1]
    if fname == "ne":
        return vals[0] != vals[1]
    if fname == "not":
        return not vals[0]
    if fname == "or":
        return next((v for v in vals if v), vals[-1])
    if fname == "and":
        return all(vals)
    if fname == "index":
        return vals[0][vals[1]]
    if fname == "slice":
        return vals[0][vals[1]:]
    if fname == "json":
        return go_marshal(vals[0])
    if fname == "len":
        return len(vals[0])
    raise AssertionError(f"unknown function {fname}")


def _fields(val: Any, chain: str) -> Any:
    for part in chain.split("."):  # Ollama parses with missingkey=zero: a missing key reads as nil
        val = val.get(part) if part else val
    return val


def render_go(template: str, data: dict[str, Any]) -> str:
    parts = re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL)
    pos = 0

    def block(dot: Any, scope: dict[str, Any], emit: bool) -> tuple[str, str]:
        """Render until else/end; returns (text, the action that ended the block)."""
        nonlocal pos
        out = []
        while pos < len(parts):
            part = parts[pos]
            pos += 1
            if not part.startswith("{{"):
                out.append(part if emit else "")
                continue
            action = part[2:-2].strip()
            assert not part.startswith("{{-") and not part.endswith("-}}"), "no whitespace trimming emitted"
            if action == "end" or action == "else" or action.startswith("else if "):
                return "".join(out), action
            if action.startswith("if "):
                cond: str | None = action[3:]
                taken = False
                while True:  # if / else if ... / else (cond None) / end
                    ok = emit and not taken and (cond is None or bool(
                        _eval(_parse_expr(_tokens(cond), 0)[0], dot, data, scope)))
                    text, ended = block(dot, scope, ok)
                    if ok:
                        out.append(text)
                        taken = True
                    if ended == "end":
                        break
                    cond = ended[len("else if "):] if ended.startswith("else if ") else None
            elif action.startswith("range "):
                m = re.fullmatch(r"range (\$\w+), (\$\w+) := (.+)", action)
                assert m, action
                items = _eval(_parse_expr(_tokens(m.group(3)), 0)[0], dot, data, scope) if emit else []
                start = pos
                items = items or []
                if not items:
                    block(dot, scope, False)
                for i, item in enumerate(items):
                    pos = start
                    text, ended = block(item, {**scope, m.group(1): i, m.group(2): item}, emit)
                    assert ended == "end"
                    out.append(text)
            else:
                val = _eval(_parse_expr(_tokens(action), 0)[0], dot, data, scope) if emit else ""
                out.append(go_print(val) if emit else "")
        return "".join(out), ""

    text, _ = block(data, {"$": data}, True)
    assert pos == len(parts), "unbalanced template"
    return text


# ---- Ollama's template data (template/template.go, api/types.go), marshaled the way Go's encoding/json does -----

class GoStruct(dict):  # type: ignore[type-arg]
    """A Go struct: fields by Go name for the template; JSON by (Go name, JSON name, omitempty) in field order."""

    def __init__(self, layout: list[tuple[str, str, bool]], **values: Any) -> None:
        super().__init__(values)
        self.layout = layout


class GoMap(dict):  # type: ignore[type-arg]
    """A Go map (keys sorted in JSON); printed by the template through its String() method (nil map: {})."""


class OrderedMap(dict):  # type: ignore[type-arg]
    """Ollama's orderedmap: JSON in insertion order."""


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == 0 and not isinstance(v, bool) or (isinstance(v, list | dict) and not v)


def go_marshal(v: Any) -> str:
    if isinstance(v, GoStruct):
        return "{" + ",".join(f'"{j}":{go_marshal(v[g])}' for g, j, omit in v.layout
                              if not (omit and _empty(v[g]))) + "}"
    if isinstance(v, OrderedMap):
        return "{" + ",".join(f"{go_marshal(k)}:{go_marshal(x)}" for k, x in v.items()) + "}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{go_marshal(k)}:{go_marshal(v[k])}" for k in sorted(v)) + "}"
    if isinstance(v, list):
        return "[" + ",".join(go_marshal(x) for x in v) + "]"
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int | float):  # a decoded JSON number is a float64: integral values print without a point
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e21 else repr(float(v))
    out = ['"']
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ch in "<>&\u2028\u2029":  # HTML-safe escaping is on in json.Marshal
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def go_print(v: Any) -> str:
    """What the template prints for a value: a Stringer's String(), else the value."""
    if isinstance(v, GoMap):
        return go_marshal(v) if v else "{}"
    return str(v)


PROPERTY = [("AnyOf", "anyOf", True), ("Type", "type", True), ("Items", "items", True),
            ("Description", "description", True), ("Enum", "enum", True), ("Properties", "properties", True),
            ("Required", "required", True)]


def _property(p: dict[str, Any]) -> GoStruct:
    kind = p.get("type")
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    return GoStruct(PROPERTY, AnyOf=[_property(x) for x in p.get("anyOf", [])],
                    Type=(kinds[0] if len(kinds) == 1 else kinds), Items=p.get("items"),
                    Description=p.get("description", ""), Enum=p.get("enum", []),
                    Properties=OrderedMap((k, _property(x)) for k, x in p["properties"].items())
                    if "properties" in p else None, Required=p.get("required", []))


def ollama_tools(tools: list[dict[str, Any]] | None) -> list[GoStruct] | None:
    """convertToolsForTemplate(api.Tools read from the request's JSON)."""
    if tools is None:
        return None
    out = []
    for t in tools:
        fn, params = t["function"], t["function"].get("parameters", {})
        props = params.get("properties")
        parameters = GoStruct([("Type", "type", False), ("Defs", "$defs", True), ("Items", "items", True),
                               ("Required", "required", True), ("Properties", "properties", False)],
                              Type=params.get("type", ""), Defs=params.get("$defs"), Items=params.get("items"),
                              Required=params.get("required", []),
                              Properties=None if props is None else GoMap((k, _property(v)) for k, v in props.items()))
        function = GoStruct([("Name", "name", False), ("Description", "description", False),
                             ("Parameters", "parameters", False)],
                            Name=fn["name"], Description=fn.get("description", ""), Parameters=parameters)
        out.append(GoStruct([("Type", "type", False), ("Items", "items", True), ("Function", "function", False)],
                            Type="function", Items=None, Function=function))
    return out


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """convertMessagesForTemplate: Role, Content, ToolCalls [{Function {Name, Arguments}}]."""
    out = []
    for m in messages:
        calls = [{"ID": "", "Function": {"Index": i, "Name": c["function"]["name"],
                                         "Arguments": GoMap(c["function"]["arguments"])}}
                 for i, c in enumerate(m.get("tool_calls") or [])]
        out.append({"Role": m["role"], "Content": m.get("content") or "", "ToolCalls": calls or None})
    return out


# ---- tests --------------------------------------------------------------------------------------------------------

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Llama-3-like template: a BOS text, headers, and an end-of-turn token as EOS.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "list files"}],
    [{"role": "system", "content": "Answer with one shell command."}, {"role": "user", "content": "count lines"}],
    [{"role": "user", "content": "list files"}, {"role": "assistant", "content": "ls -la"},
     {"role": "user", "content": "and hidden ones?\nplease"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def _tok(template: str | None, eos: str = "<|im_end|>") -> Any:
    from lmtailor.models import prepare_tokenizer
    from lmtailor.tokenizers import CHAT_SPECIALS, train_bpe

    specials = [*CHAT_SPECIALS, "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train_bpe(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials, eos=eos)
    if template:
        tok.chat_template = template
    return prepare_tokenizer(tok)


@pytest.mark.parametrize("template,eos", [(None, "<|im_end|>"), (SMOLLM_TEMPLATE, "<|im_end|>"),
                                          (LLAMA3_TEMPLATE, "<|eot_id|>")])
def test_modelfile_template_renders_like_lmtailor(template: str | None, eos: str) -> None:
    from lmtailor.ollama import go_template
    from lmtailor.render import prompt_text

    tok = _tok(template, eos)
    go = go_template(tok)
    for messages in CONVERSATIONS:
        ollama_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]  # Ollama's api.Message
        assert render_go(go, {"Messages": ollama_messages}) == prompt_text(tok, messages), messages


SHELL = {"type": "function", "function": {
    "name": "run_shell", "description": "Run one shell command & return <its> output",
    "parameters": {"type": "object", "properties": {"command": {"type": "string", "description": "the command"}},
                   "required": ["command"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search.files", "description": "Find files",
    "parameters": {"type": "object", "required": ["pattern"], "properties": {
        "pattern": {"type": "string", "description": "glob, e.g. *.txt"},
        "limit": {"type": ["integer", "null"], "default": 10, "minimum": 1},
        "kind": {"type": "string", "enum": ["file", "dir"]},
        "where": {"type": "object", "properties": {"root": {"type": "string"}, "depth": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}}}}}}


def _call(name: str, **args: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": args}}


TOOL_CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ([{"role": "user", "content": "list files"}], [SHELL]),
    ([{"role": "system", "content": "Answer with one shell command."}, {"role": "user", "content": "count lines"}],
     [SHELL, SEARCH]),
    ([{"role": "user", "content": "list files"},
      {"role": "assistant", "tool_calls": [_call("run_shell", command="ls")]},
      {"role": "tool", "content": "a.txt\nb.txt"}, {"role": "assistant", "content": "Two files."},
      {"role": "user", "content": "and their sizes?"}], [SHELL]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "find text files, then count them"},
      {"role": "assistant", "content": "Looking.", "tool_calls": [
          _call("search.files", pattern="*.txt", limit=5, kind="file", where={"root": "/tmp", "depth": 2.0}),
          _call("run_shell", command="ls <dir> | wc -l && echo \"done\" – ok")]},
      {"role": "tool", "content": "a.txt"}, {"role": "tool", "content": "1"}, {"role": "user", "content": "thanks"}],
     [SHELL, SEARCH]),
    # calls in the history, no tools offered now
    ([{"role": "user", "content": "list files"},
      {"role": "assistant", "tool_calls": [_call("run_shell", command="ls")]},
      {"role": "tool", "content": "a.txt"}, {"role": "user", "content": "ok"}], None),
]


@pytest.mark.parametrize("template,eos", [(None, "<|im_end|>"), (SMOLLM_TEMPLATE, "<|im_end|>"),
                                          (LLAMA3_TEMPLATE, "<|eot_id|>")])
def test_modelfile_template_renders_tool_conversations_like_lmtailor(template: str | None, eos: str) -> None:
    """Tools offered, calls (one, several, with content, arguments that JSON-escape), tool results: Ollama's
    template data rendered by the Modelfile's TEMPLATE equals lmtailor's prompt text."""
    import json

    from lmtailor.ollama import go_template
    from lmtailor.render import prompt_text

    tok = _tok(template, eos)
    go = go_template(tok)
    for messages, tools in TOOL_CONVERSATIONS:
        ours = [{**m, "tool_calls": json.dumps(m["tool_calls"])} if m.get("tool_calls") else
                {"role": m["role"], "content": m["content"]} for m in messages]
        data = {"Messages": ollama_messages(messages), "Tools": ollama_tools(tools)}
        assert render_go(go, data) == prompt_text(tok, ours, tools), (messages, tools)


def test_modelfile_tool_call_tag_is_the_first_text_under_toolcalls() -> None:
    """Ollama parses calls back out with the first text under `if .ToolCalls`, cut at '{' (tools/template.go)."""
    from lmtailor.ollama import go_template

    go = go_template(_tok(SMOLLM_TEMPLATE))
    after = go.split("{{ if .ToolCalls }}", 1)[1]
    assert after.split("{", 1)[0].strip() == "<tool_call>"


def test_go_json_writes_what_go_encoding_json_writes() -> None:
    from lmtailor.toolcalls import go_json

    assert go_json({"b": 1.0, "a": "<a & b>", "c": [True, None, 0.5]}) == (
        '{"a":"\\u003ca \\u0026 b\\u003e","b":1,"c":[true,null,0.5]}')
    assert [go_json(x) for x in (1e-7, 1.5e-7, 1e20, 1e21, 123456789, -0.000001, 3)] == [
        "1e-7", "1.5e-7", "100000000000000000000", "1e+21", "123456789", "-0.000001", "3"]
    assert go_json("é\u2028\n\x01") == '"é\\u2028\\n\\u0001"'


def test_export_writes_modelfile_beside_gguf(tiny_model: Path, tmp_path: Path) -> None:
    from lmtailor.export import export_run

    out = tmp_path / "m.gguf"
    summary = export_run(tiny_model, "gguf", out, verify=False, ollama=True)
    modelfile = tmp_path / "Modelfile"
    assert summary["modelfile"] == str(modelfile)
    text = modelfile.read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert "PARAMETER temperature 0" in text and "PARAMETER num_ctx 512" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL)
    assert template and "{{ range $i, $m := .Messages }}" in template.group(1)


def test_modelfile_refuses_untranslatable_templates() -> None:
    from lmtailor.errors import ModelError
    from lmtailor.ollama import go_template

    # a template that never writes the EOS token at the end of a turn
    tok = _tok("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ModelError, match="EOS"):
        go_template(tok)
