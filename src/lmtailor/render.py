"""The one conversation renderer: training, evaluation, generation, chat and the server all go through it.

A conversation is rendered with the tokenizer's chat template piece by piece, so that:
- the prompt a generation sees is byte-for-byte the prefix training saw before that assistant turn;
- every assistant turn ends with the EOS / end-of-turn token and that token is supervised
  (a pad token equal to EOS is never used to mask labels: padding is masked by position, not by id);
- labels are -100 everywhere except assistant tokens, unless train_on_prompt.

Tools (`lmtailor.toolcalls`): a template that handles tools gets the tools list and the structured calls as
transformers passes them; any other template gets plain messages with the tools offered in the system message
and the calls written as <tool_call> blocks. Either way one function (`_template`) decides, for every path.

IGNORE (-100) and Tokenized live in data.example, beside Example, so that packing (data) needs no renderer.
"""

from __future__ import annotations

import json
from typing import Any

from lmtailor.data.example import IGNORE, Example, Tokenized
from lmtailor.errors import DataError, ModelError
from lmtailor.toolcalls import plain_messages, template_handles_tools

Tools = list[dict[str, Any]] | None

# Work per example is bounded by max_length, not by the record's size: before rendering and tokenizing, a text
# is cut to (max_length + CLIP_MARGIN_TOKENS) x (the vocabulary's longest token, in characters) characters. Its
# first max_length tokens all lie inside that prefix, since no token covers more characters than its own length,
# and CLIP_MARGIN_TOKENS keeps the cut's neighbourhood (a merge that might form differently there) far past them;
# so truncated results equal those of tokenizing the whole text. A text within the bound is not touched.
CLIP_MARGIN_TOKENS = 64
_LONGEST: dict[int, tuple[Any, int]] = {}  # id(tokenizer) -> (tokenizer, longest token in characters)


def longest_token(tok: Any) -> int:
    """Characters of the vocabulary's longest token string (byte-level tokens count one per byte), cached."""
    hit = _LONGEST.get(id(tok))
    if hit is None or hit[0] is not tok:
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        hit = (tok, max((len(t) for t in vocab), default=64))
        if len(_LONGEST) > 32:
            _LONGEST.clear()
        _LONGEST[id(tok)] = hit
    return max(hit[1], 1)


def clip_text(tok: Any, text: str, max_tokens: int) -> str:
    """`text` cut to the characters that can hold its first `max_tokens` tokens (see CLIP_MARGIN_TOKENS)."""
    budget = (max_tokens + CLIP_MARGIN_TOKENS) * longest_token(tok)
    return text if len(text) <= budget else text[:budget]


def _template(tok: Any, messages: list[dict[str, str]], gen: bool, tools: Tools = None) -> str:
    from jinja2 import TemplateError

    try:
        if not tools and not any(m.get("tool_calls") for m in messages):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        if template_handles_tools(tok):
            native = [{**m, "tool_calls": json.loads(m["tool_calls"])} if m.get("tool_calls") else m
                      for m in messages]
            return tok.apply_chat_template(native, tools=tools or None, tokenize=False, add_generation_prompt=gen)
        plain = plain_messages([{**m, "tool_calls": json.loads(m["tool_calls"])} if m.get("tool_calls") else m
                                for m in messages], tools)
        return tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen)
    except TemplateError as e:  # a damaged chat_template.jinja, or one that refuses this conversation
        where = getattr(tok, "name_or_path", "") or "the tokenizer"
        raise ModelError(f"{where}: its chat template fails on this conversation ({type(e).__name__}: {e})",
                         "restore the model folder's chat_template.jinja, or fix the conversation") from None


def render_prompt(tok: Any, messages: list[dict[str, str]], tools: Tools = None) -> str:
    """The text a model is given to write the next assistant turn."""
    return _template(tok, messages, gen=True, tools=tools)


def encode(tok: Any, text: str) -> list[int]:
    # Special tokens come from the template text itself; never let the tokenizer add its own.
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tok: Any, messages: list[dict[str, str]], tools: Tools = None) -> list[int]:
    """Token ids of the generation prompt: exactly the ids training puts before that assistant turn."""
    pieces = _pieces(tok, messages + [{"role": "assistant", "content": ""}], tools)
    last_output = max(i for i, (_, is_output) in enumerate(pieces) if is_output)
    return [t for piece, _ in pieces[:last_output] for t in encode(tok, piece)]


def prompt_text(tok: Any, messages: list[dict[str, str]], tools: Tools = None) -> str:
    """The prompt as text (the decoded form of prompt_ids)."""
    pieces = _pieces(tok, messages + [{"role": "assistant", "content": ""}], tools)
    last_output = max(i for i, (_, is_output) in enumerate(pieces) if is_output)
    return "".join(piece for piece, _ in pieces[:last_output])


def _pieces(tok: Any, messages: list[dict[str, str]], tools: Tools = None) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_output) pieces.

    The prompt piece before each assistant turn is the template's generation prompt; the output piece is the
    assistant content through the end-of-turn token. What the template writes after EOS (often a newline)
    starts the next prompt piece, since generation stops at EOS and never produces it.
    """
    eos = tok.eos_token
    pieces: list[tuple[str, bool]] = []
    done = ""  # text already assigned to pieces
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("the conversation starts with an assistant message",
                            "put a user (or system) message before the first assistant message")
        before = render_prompt(tok, messages[:i], tools)
        through = _template(tok, messages[: i + 1], gen=False, tools=tools)
        if not before.startswith(done) or not through.startswith(before):
            raise DataError(
                "the chat template does not render this conversation incrementally "
                "(the prompt before an assistant turn is not a prefix of the full conversation)",
                "put a user message before every assistant message, or use a tokenizer whose template does",
            )
        answer = through[len(before):]
        cut = answer.find(eos) if eos else -1
        if cut >= 0:
            out, rest = answer[: cut + len(eos)], answer[cut + len(eos):]
        else:
            out, rest = answer, ""
        pieces.append((before[len(done):], False))
        pieces.append((out, True))
        done = before + out
        if rest:
            pieces.append((rest, False))
            done += rest
    return pieces


def tokenize_example(tok: Any, ex: Example, max_length: int, train_on_prompt: bool = False) -> list[Tokenized]:
    """Render and tokenize one example.

    Chat examples give one sequence (truncated to max_length); raw text gives consecutive chunks of max_length
    tokens, each supervised on every token, ending with EOS.
    """
    if ex.text is not None:
        ids = list(tok(ex.text, add_special_tokens=True)["input_ids"]) + [tok.eos_token_id]
        step = max_length
        return [Tokenized(ids[i:i + step], ids[i:i + step], ex.source) for i in range(0, len(ids), step)
                if len(ids[i:i + step]) > 1]
    assert ex.messages is not None
    messages = ex.messages
    # A message longer than the clip bound alone fills max_length: what follows it is cut off anyway.
    if any(len(m["content"]) > max_length for m in messages):
        messages = [{**m, "content": clip_text(tok, m["content"], max_length)} for m in messages]
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, is_output in _pieces(tok, messages, ex.tools):
        ids = encode(tok, piece)
        if is_output and tok.eos_token and not piece.endswith(tok.eos_token):
            ids.append(tok.eos_token_id)  # templates that do not end turns with EOS still teach the model to stop
        input_ids += ids
        labels += ids if (is_output or train_on_prompt) else [IGNORE] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return [Tokenized(input_ids, labels, ex.source)]


def tokenize_all(tok: Any, examples: list[Example], max_length: int, train_on_prompt: bool = False
                 ) -> tuple[list[Tokenized], int]:
    """Tokenize many examples; returns the sequences and how many were dropped for having nothing to learn."""
    out: list[Tokenized] = []
    dropped = 0
    for ex in examples:
        for seq in tokenize_example(tok, ex, max_length, train_on_prompt):
            if seq.n_supervised == 0:
                dropped += 1
            else:
                out.append(seq)
    return out, dropped


def prompt_messages(ex: Example) -> tuple[list[dict[str, str]], str]:
    """Split a chat example into (messages before the last assistant turn, that turn's reference text)."""
    assert ex.messages is not None
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]
