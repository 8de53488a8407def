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
        return _eval(tree[1], dot, root, scope)[tree[2]]
    if kind == "name":
        name = tree[1]
        if name.startswith("."):
            val = dot
            for part in name[1:].split("."):
                val = val[part] if part else val
            return val
        if name.startswith("$"):
            return scope[name]
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
    if fname == "len":
        return len(vals[0])
    raise AssertionError(f"unknown function {fname}")


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
                if not items:
                    block(dot, scope, False)
                for i, item in enumerate(items):
                    pos = start
                    text, ended = block(item, {**scope, m.group(1): i, m.group(2): item}, emit)
                    assert ended == "end"
                    out.append(text)
            else:
                val = _eval(_parse_expr(_tokens(action), 0)[0], dot, data, scope) if emit else ""
                out.append(str(val) if emit else "")
        return "".join(out), ""

    text, _ = block(data, {"$": data}, True)
    return text


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
