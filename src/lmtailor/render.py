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


def clip_messages(tok: Any, messages: list[dict[str, str]], max_tokens: int, keep: str = "head"
                  ) -> list[dict[str, str]]:
    """The messages that can hold the first (keep="head") or last (keep="tail") `max_tokens` tokens of a rendered
    conversation: contents are cut to the clip bound (see CLIP_MARGIN_TOKENS) counted from that end, and messages
    wholly past it are dropped, keeping the turn structure around the cut. The pieces a conversation renders to are
    tokenized one by one, so the kept end's tokens equal those of the whole conversation; a conversation within the
    bound is returned as it is."""
    budget = (max_tokens + CLIP_MARGIN_TOKENS) * longest_token(tok)
    if sum(len(m["content"]) for m in messages) <= budget:
        return messages
    order = list(messages) if keep == "head" else list(reversed(messages))
    out: list[dict[str, str]] = []
    used = 0
    for m in order:
        if used >= budget:  # past the bound: only a turn the cut one needs to render as a prompt/answer pair
            if keep == "head" and out[-1]["role"] != "assistant" and m["role"] == "assistant":
                out.append({**m, "content": ""})
            if keep == "head":
                continue
            break
        room = budget - used
        content = m["content"]
        if len(content) > room:
            content = content[:room] if keep == "head" else content[len(content) - room:]
        out.append({**m, "content": content})
        used += len(content)
    if keep == "head":
        return out
    out.reverse()
    if out[0]["role"] == "assistant":  # a conversation does not start with an answer
        out.insert(0, {"role": "user", "content": ""})
    return out


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
    if ex.text is not None:  # every chunk is kept: a long document is tokenized in windows (encode_long)
        ids = encode_long(tok, ex.text, add_special_tokens=True) + [tok.eos_token_id]
        step = max_length
        return [Tokenized(ids[i:i + step], ids[i:i + step], ex.source) for i in range(0, len(ids), step)
                if len(ids[i:i + step]) > 1]
    assert ex.messages is not None
    # What lies past the clip bound is cut off anyway: work (rendering, tokenizing) is bounded by max_length.
    messages = clip_messages(tok, ex.messages, max_length)
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, is_output in _pieces(tok, messages, ex.tools):
        if len(input_ids) >= max_length:
            break
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


# ---- long documents ---------------------------------------------------------------------------------------------
STREAM_CHARS = 1 << 16  # a text longer than this is tokenized in windows of this many characters
SYNC_TOKENS = 8  # tokens two overlapping windows must agree on (same ids, same offsets) to be joined there


def encode_long(tok: Any, text: str, add_special_tokens: bool = False, window: int | None = None) -> list[int]:
    """`tok(text)["input_ids"]` of a document of any length, tokenized in windows of about `window` characters,
    so a huge document costs memory in proportion to its tokens, not to one tokenizer call over all of it.

    Consecutive windows overlap by half; they are joined at the first token boundary past the start of the later
    one where both give the same SYNC_TOKENS tokens (ids and character offsets) before the earlier one's last
    CLIP_MARGIN_TOKENS tokens. Where no such place exists (or the tokenizer gives no offsets), the document is
    tokenized in one call, as before.
    """
    window = window or STREAM_CHARS
    if len(text) <= window or not getattr(tok, "is_fast", False):
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    margin = CLIP_MARGIN_TOKENS * longest_token(tok)
    window = max(window, 4 * margin)
    body: list[int] = []
    start, cur = 0, _window_tokens(tok, text, 0, window)
    while start + window < len(text):
        half = start + window // 2
        nxt_start = next((a for a, _, _ in cur if a >= half), None)
        nxt = _window_tokens(tok, text, nxt_start, window) if nxt_start is not None else []
        cut = _join_at(cur, nxt, start + window - margin)
        if cut is None:
            return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
        body += [t for a, _, t in cur if a < cut]
        start, cur = int(nxt_start or 0), [x for x in nxt if x[0] >= cut]
    body += [t for _, _, t in cur]
    if not add_special_tokens:
        return body
    head, tail = _special_ends(tok)
    return head + body + tail


def _window_tokens(tok: Any, text: str, start: int, window: int) -> list[tuple[int, int, int]]:
    """(start, end, id) of the tokens of text[start:start + window], offsets in `text`."""
    enc = tok(text[start:start + window], add_special_tokens=False, return_offsets_mapping=True)
    return [(start + a, start + b, t) for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def _join_at(cur: list[tuple[int, int, int]], nxt: list[tuple[int, int, int]], safe: int) -> int | None:
    """The first offset (past nxt's first token) where cur and nxt agree on SYNC_TOKENS tokens ending by `safe`."""
    where = {a: i for i, (a, _, _) in enumerate(cur)}
    for j in range(1, len(nxt) - SYNC_TOKENS):
        i = where.get(nxt[j][0])
        if i is None:
            continue
        if cur[i + SYNC_TOKENS - 1:i + SYNC_TOKENS] and cur[i + SYNC_TOKENS - 1][1] > safe:
            return None
        if cur[i:i + SYNC_TOKENS] == nxt[j:j + SYNC_TOKENS]:
            return nxt[j][0]
    return None


def _special_ends(tok: Any) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a text's own (e.g. BOS; CLS and SEP)."""
    bare = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return [], []
