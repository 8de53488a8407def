"""An Ollama Modelfile beside an exported GGUF file: FROM, TEMPLATE (Go template), stop tokens, parameters.

    lmtailor export runs/x --format gguf --out x.gguf --ollama   ->  x.gguf + Modelfile
    ollama create x -f Modelfile

The TEMPLATE is derived from the tokenizer's own chat template by rendering probe conversations with it
(`go_template`), so Ollama writes the prompt text that `lmtailor.render` writes for training and serving:

- every message renders as prefix(role) + content + suffix(role); a suffix runs through the end-of-turn (EOS)
  token and the whitespace after it;
- the text before the first message when it is not a system message (a default system message some templates
  add, or a BOS token) is emitted only then;
- the generation prompt follows the last message.

Only the constructs `if`/`else if`/`else`/`end`, `range $i, $m := .Messages`, `.Role`, `.Content` and the
functions `eq`, `ne`, `not`, `or`, `index` are used (tests render the template with a small evaluator).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lmtailor.errors import ModelError
from lmtailor.io import atomic_file
from lmtailor.toolcalls import CLOSE, OPEN, ollama_function, template_handles_tools, tools_prompt

log = logging.getLogger(__name__)

_S, _U, _A, _U2 = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01"
_T = "\x01TOOL\x01"
_PROBE_FUNCTION: dict[str, Any] = {"name": "probe", "description": "", "parameters": {}}
_PROBE_TOOL: dict[str, Any] = {"type": "function", "function": _PROBE_FUNCTION}


def _render(tok: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))


def _split_turn_end(seg: str, eos: str, where: str) -> tuple[str, str]:
    """Split the text between two message contents into (suffix of the first, prefix of the second)."""
    cut = seg.find(eos)
    if cut < 0:
        raise ModelError(f"Ollama template: the chat template does not end a {where} turn with the EOS token "
                         f"{eos!r}, so lmtailor cannot translate it", "write the Modelfile's TEMPLATE by hand")
    end = cut + len(eos)
    end += len(seg[end:]) - len(seg[end:].lstrip(" \n"))
    return seg[:end], seg[end:]


def template_parts(tok: Any) -> dict[str, str]:
    """Prefixes and suffixes per role, the default head and the generation prompt, from probe renders."""
    eos = tok.eos_token
    if not eos:
        raise ModelError("Ollama template: the tokenizer has no EOS token")
    full = _render(tok, [{"role": "system", "content": _S}, {"role": "user", "content": _U},
                         {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}], gen=True)
    marks = [full.find(m) for m in (_S, _U, _A, _U2)]
    if min(marks) < 0 or marks != sorted(marks):
        raise ModelError("Ollama template: the chat template does not render every message's content in order",
                         "write the Modelfile's TEMPLATE by hand")
    seg = [full[:marks[0]], full[marks[0] + len(_S):marks[1]], full[marks[1] + len(_U):marks[2]],
           full[marks[2] + len(_A):marks[3]], full[marks[3] + len(_U2):]]
    system_suffix, user_prefix = _split_turn_end(seg[1], eos, "system")
    user_suffix, assistant_prefix = _split_turn_end(seg[2], eos, "user")
    assistant_suffix, user_prefix_2 = _split_turn_end(seg[3], eos, "assistant")
    if user_prefix_2 != user_prefix or not seg[4].startswith(user_suffix):
        raise ModelError("Ollama template: the chat template renders the same role differently by position",
                         "write the Modelfile's TEMPLATE by hand")
    only_user = _render(tok, [{"role": "user", "content": _U}], gen=True)
    head = only_user[:only_user.find(_U)]
    if not head.endswith(user_prefix):
        raise ModelError("Ollama template: cannot find the user prefix in a one-message render")
    return {"system_prefix": seg[0], "system_suffix": system_suffix, "user_prefix": user_prefix,
            "user_suffix": user_suffix, "assistant_prefix": assistant_prefix, "assistant_suffix": assistant_suffix,
            "default_head": head[: len(head) - len(user_prefix)], "generation": seg[4][len(user_suffix):]}


def tool_parts(tok: Any, p: dict[str, str]) -> dict[str, str] | None:
    """Prefix and suffix of a `tool` message (the result of a call), or None when the template cannot render one."""
    from jinja2 import TemplateError

    try:
        full = _render(tok, [{"role": "user", "content": _U}, {"role": "assistant", "content": _A},
                             {"role": "tool", "content": _T}, {"role": "user", "content": _U2}], gen=True)
    except (TemplateError, ValueError):
        return None
    marks = [full.find(m) for m in (_A, _T, _U2)]
    if min(marks) < 0 or marks != sorted(marks):
        return None
    assistant_suffix, tool_prefix = _split_turn_end(full[marks[0] + len(_A):marks[1]], tok.eos_token, "assistant")
    tool_suffix, user_prefix = _split_turn_end(full[marks[1] + len(_T):marks[2]], tok.eos_token, "tool")
    if assistant_suffix != p["assistant_suffix"] or user_prefix != p["user_prefix"]:
        return None
    return {"tool_prefix": tool_prefix, "tool_suffix": tool_suffix}


def _call(c: str) -> str:
    """One call as `lmtailor.toolcalls.format_call` writes it; `c` is the Go expression of a template tool call."""
    return (_lit(OPEN + '\n{"name": "') + "{{ " + c + ".Function.Name }}" + '", "arguments": '
            + "{{ " + c + ".Function.Arguments }}" + _lit("}\n" + CLOSE))


def _tools_offer() -> str:
    """`lmtailor.toolcalls.tools_prompt` in Go: one JSON line per tool (Ollama marshals its function the way
    `ollama_function` writes it), then the calling convention."""
    head, _, tail = tools_prompt([_PROBE_TOOL]).partition(ollama_function(_PROBE_FUNCTION))
    return (_lit(head) + "{{ range $j, $t := $.Tools }}{{ if $j }}\n{{ end }}{{ json $t.Function }}{{ end }}"
            + _lit(tail))


def _lit(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise ModelError(f"Ollama template: literal text {text!r} holds template delimiters")
    return text


def go_template(tok: Any) -> str:
    """The chat template in Ollama's Go template language (one line of actions; literal text kept exactly).

    With tools (a chat template without tool support of its own, so lmtailor folds them in, see
    `lmtailor.toolcalls`): `.Tools` are offered in the first system message (or one made for them), an assistant
    message's `.ToolCalls` follow its content as <tool_call> blocks, and `tool` messages (call results) render
    as the chat template renders that role. The first call is written outside the loop over the others, so that
    the first text under `if .ToolCalls` is the <tool_call> tag, which Ollama reads to parse calls back out.
    """
    p = template_parts(tok)
    tools = not template_handles_tools(tok)
    if not tools:
        log.warning("Ollama template: the chat template renders tools itself; the Modelfile's TEMPLATE leaves "
                    "tools out (write its tool part by hand)")
    tool = tool_parts(tok, p) if tools else None
    system_head = _lit(p["system_prefix"]) + _tools_offer() + _lit(p["system_suffix"])
    head = ('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
            + ("{{ if .Tools }}" + system_head + "{{ else }}" + _lit(p["default_head"]) + "{{ end }}"
               if tools else _lit(p["default_head"])) + "{{ end }}")
    offer = "{{ if and (eq $i 0) $.Tools }}" + _lit("\n\n") + _tools_offer() + "{{ end }}" if tools else ""
    calls = ("{{ if and .Content $m.ToolCalls }}\n{{ end }}{{ if .ToolCalls }}" + _call("(index .ToolCalls 0)")
             + "{{ range $j, $c := slice .ToolCalls 1 }}\n" + _call("$c") + "{{ end }}{{ end }}" if tools else "")
    tool_branch = ('{{ else if eq .Role "tool" }}' + _lit(tool["tool_prefix"]) + "{{ .Content }}"
                   + _lit(tool["tool_suffix"]) if tool else "")
    return (
        head + "{{ range $i, $m := .Messages }}"
        + '{{ if eq .Role "system" }}' + _lit(p["system_prefix"]) + "{{ .Content }}" + offer
        + _lit(p["system_suffix"])
        + '{{ else if eq .Role "user" }}' + _lit(p["user_prefix"]) + "{{ .Content }}" + _lit(p["user_suffix"])
        + '{{ else if eq .Role "assistant" }}' + _lit(p["assistant_prefix"]) + "{{ .Content }}" + calls
        + _lit(p["assistant_suffix"]) + tool_branch + "{{ end }}{{ end }}" + _lit(p["generation"])
    )


def _quote(text: str) -> str:
    if '"""' in text:
        raise ModelError('Ollama Modelfile: text holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tok: Any, system_prompt: str | None = None, num_ctx: int = 2048,
              temperature: float = 0.0) -> str:
    """The Modelfile text: FROM the GGUF file (relative, beside it), TEMPLATE, stops, parameters, SYSTEM."""
    stops = [s for s in dict.fromkeys([tok.eos_token, *_turn_markers(tok)]) if s]
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote(go_template(tok))}"]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER num_ctx {num_ctx}"]
    if system_prompt:
        lines.append(f"SYSTEM {_quote(system_prompt)}")
    return "\n".join(lines) + "\n"


def _turn_markers(tok: Any) -> list[str]:
    """Special tokens that open a turn (e.g. <|im_start|>): a model that writes one has finished its answer."""
    text = _render(tok, [{"role": "user", "content": _U}], gen=True)
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    found = [t for t in dict.fromkeys([*tok.all_special_tokens, *added]) if t in text and t != tok.eos_token]
    return [t for t in found if re.search(r"start|begin|header", t)]


def write_modelfile(gguf_path: str | Path, tok: Any, system_prompt: str | None = None,
                    num_ctx: int = 2048) -> Path:
    """Write `Modelfile` beside `gguf_path` (atomically) and return its path."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / "Modelfile"
    text = modelfile(gguf_path.name, tok, system_prompt, num_ctx)
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
