"""Decoding: greedy or sampled, batched, with stop strings and the repetition stop, through the same renderer as
training."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from lmtailor.config import GenerationSettings
from lmtailor.data.retrieve import RunRetrieval
from lmtailor.render import prompt_ids

Prompt = str | list[dict[str, str]]


def as_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """A bare string becomes one user turn; a message list passes through."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


# ---- the repetition stop -----------------------------------------------------------------------------------
# Greedy answers of small tuned models loop ("apparmor -r -o -r -o -r -o ..."). Every decoding path (generate,
# stream, the --speedup fast path, the server engine) applies one rule to the token ids of the answer (never the
# prompt): an answer whose tail is `repeats` consecutive copies of one n-gram of at most LOOP_MAX_NGRAM tokens,
# the copies covering at least LOOP_MIN_TOKENS tokens, has ended; it keeps its text up to the end of the first
# copy of that repeated stretch. The token floor leaves short legitimate repeats alone (`a a`, `-v -v -v`, `../../`):
# a 1-token n-gram needs 12 copies, a 2-token one 6, a 3-token one 4. benchmarks/looping.py chose the numbers
# (GenerationSettings.stop_repeats says why 3 copies); floors of 6 to 16 tokens scored the same there, and 12
# costs about one token per answer over 6 for the margin.
LOOP_MAX_NGRAM = 16
LOOP_MIN_TOKENS = 12


def _loop_periods(ids: Sequence[int], repeats: int, end: int) -> list[int]:
    """The n-gram lengths n for which ids[:end] ends in `repeats` copies of one n-gram (>= LOOP_MIN_TOKENS)."""
    found = []
    for n in range(1, LOOP_MAX_NGRAM + 1):
        need = max(repeats * n, LOOP_MIN_TOKENS)  # grows with n
        if need > end:
            break
        if ids[end - need + n:end] == ids[end - need:end - n]:  # the last `need` tokens have period n
            found.append(n)
    return found


def ends_in_loop(ids: Sequence[int], repeats: int) -> bool:
    """Whether an answer being decoded has just completed a loop: the check made after every new token."""
    if repeats < 2:
        return False
    tail = list(ids[-max(repeats * LOOP_MAX_NGRAM, LOOP_MIN_TOKENS):])  # the rule never looks further back
    return bool(_loop_periods(tail, repeats, len(tail)))


def _periodic_from(ids: Sequence[int], n: int, end: int) -> int:
    """Earliest start s such that ids[s:end] has period n."""
    s = end - n
    while s > 0 and ids[s - 1] == ids[s - 1 + n]:
        s -= 1
    return s


def loop_cut(ids: Sequence[int], repeats: int) -> int:
    """How many tokens of an answer to keep: up to the end of the first copy of its first loop, or all of them.

    Args:
        ids: the answer's token ids (without the prompt).
        repeats: copies in a row that make a loop (see the rule above); below 2 nothing is cut.

    Returns:
        The length of the kept prefix: the answer is scanned token by token, as decoding saw it, and at the first
        length where the rule holds the cut falls after the first copy of the repeated stretch.
    """
    if repeats < 2:
        return len(ids)
    ids = list(ids)
    for end in range(LOOP_MIN_TOKENS, len(ids) + 1):
        periods = _loop_periods(ids, repeats, end)
        if periods:
            return min(_periodic_from(ids, n, end) + n for n in periods)
    return len(ids)


def loop_safe(ids: Sequence[int], repeats: int) -> int:
    """How many leading tokens of an answer still being decoded no later loop cut can remove.

    Streaming shows only these, so that what a client has seen is never taken back: a cut keeps ids[:s + n]
    where ids[s:] has period n, and s can be no earlier than where the current tail's period-n stretch starts.
    Outside a repeated stretch this is len(ids): nothing is held back.
    """
    if repeats < 2:
        return len(ids)
    ids = list(ids)
    return min((_periodic_from(ids, n, len(ids)) + n for n in range(1, min(LOOP_MAX_NGRAM, len(ids)) + 1)),
               default=len(ids))


def repeat_stops(start: int, repeats: int) -> StoppingCriteriaList:
    """The `stopping_criteria` of a `generate` call whose answers start at column `start` (empty when off)."""
    return StoppingCriteriaList([RepeatStop(start, repeats)] if repeats >= 2 else [])


class RepeatStop(StoppingCriteria):
    """Ends each row whose answer (columns from `start` on) has just completed a loop (see `loop_cut`).

    Returns one bool per row, so a looping row stops while the others of its batch decode on (transformers pads
    a finished row from then on; `generate` cuts the row's text with `loop_cut`).
    """

    def __init__(self, start: int, repeats: int) -> None:
        self.start, self.repeats = start, repeats
        self.window = max(repeats * LOOP_MAX_NGRAM, LOOP_MIN_TOKENS)  # the rule never looks further back

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, self.start:][:, -self.window:].tolist()  # (B, <= window)
        done = [ends_in_loop(row, self.repeats) for row in tail]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _gen_kwargs(tok: Any, s: GenerationSettings) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_new_tokens": s.max_new_tokens,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "repetition_penalty": s.repetition_penalty,
    }
    if s.temperature > 0:
        kw.update(do_sample=True, temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if s.stop:
        kw.update(stop_strings=list(s.stop), tokenizer=tok)
    return kw


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
def generate(model: Any, tok: Any, prompts: Sequence[Prompt], settings: GenerationSettings | None = None,
             system: str | None = None, progress: bool = False, desc: str = "generating", raw: bool = False,
             tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[str]:
    """Answer each prompt; returns the new text only (special tokens removed, cut at stop strings).

    With `raw`, string prompts are continued as plain text (no chat template), as for a pretrained-only model.
    `tools` gives per prompt the tools it offers (rendered as training rendered them; None: none).
    """
    s = settings or GenerationSettings()
    if raw:
        encoded = [list(tok(str(p), add_special_tokens=True)["input_ids"]) for p in prompts]
    else:
        offered = list(tools) if tools is not None else [None] * len(prompts)
        encoded = [prompt_ids(tok, as_messages(p, system), t) for p, t in zip(prompts, offered, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress, unit="prompt", leave=False)
    for start in range(0, len(order), s.batch_size):
        idx = order[start:start + s.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row ends where its answer begins
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             stopping_criteria=repeat_stops(width, s.stop_repeats),
                             **_gen_kwargs(tok, s))
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            text = tok.decode(new[:loop_cut(_until_eos(new, tok.eos_token_id), s.stop_repeats)],
                              skip_special_tokens=True)
            out[i] = cut_at_stop(text, s.stop).strip()
        bar.update(len(idx))
    bar.close()
    return out


def _until_eos(ids: list[int], eos: int | list[int] | None) -> list[int]:
    """The answer's tokens before its first EOS (what follows is padding, never a loop)."""
    ends = {eos} if isinstance(eos, int) else set(eos or [])
    return next((ids[:k] for k, t in enumerate(ids) if t in ends), ids)


class _TokenQueue:
    """A `generate` streamer that hands the new token ids of one row to another thread (None at the end)."""

    def __init__(self) -> None:
        self.items: queue.Queue[int | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.items.put(int(t))

    def end(self) -> None:
        self.items.put(None)


def stream(model: Any, tok: Any, messages: list[dict[str, str]], settings: GenerationSettings | None = None
           ) -> Iterator[str]:
    """Yield the answer to one conversation piece by piece as it is decoded.

    The pieces join to `generate`'s answer: text that a loop cut or a stop string may still remove is held back
    until decoding shows it stays (see `loop_safe`).
    """
    s = settings or GenerationSettings()
    ids = torch.tensor([prompt_ids(tok, messages)], device=next(model.parameters()).device)
    tokens = _TokenQueue()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=tokens,
                  stopping_criteria=repeat_stops(ids.shape[1], s.stop_repeats),
                  **_gen_kwargs(tok, s))

    def work() -> None:
        try:
            torch.inference_mode()(model.generate)(**kwargs)
        finally:
            tokens.end()  # also when generate raised, so the reader below never waits forever

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    eos = tok.eos_token_id
    ends = {eos} if isinstance(eos, int) else set(eos or [])
    new: list[int] = []
    sent = ""
    while (t := tokens.items.get()) is not None and t not in ends:
        new.append(t)
        text = tok.decode(new[:loop_safe(new, s.stop_repeats)], skip_special_tokens=True).rstrip("\ufffd")
        if s.stop and cut_at_stop(text, s.stop) != text:
            break  # the final text below ends before the stop string
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent):]
            sent = text
    worker.join()
    text = cut_at_stop(tok.decode(new[:loop_cut(new, s.stop_repeats)], skip_special_tokens=True), s.stop)
    if len(text) > len(sent) and text.startswith(sent):
        yield text[len(sent):]


def retrieval_for(config: dict[str, Any], kb: str | None = None) -> Any:
    """The retrieval a run trained with, or None: knowledge-base passages (its `retrieval:` section, or `kb` given
    here with that section's other settings), or retrieved training examples (data.retrieved_examples: the pool
    is its training split, read and scrubbed the way training read it). Both have `with_sources(prompt)`.

    Raises:
        ConfigError: a bad retrieval section, or a knowledge base that cannot be opened.
    """
    section = dict(config.get("retrieval") or {})
    if kb:
        section["kb"] = kb
    if section.get("kb"):
        from pydantic import ValidationError

        from lmtailor.config import RetrievalSettings, explain
        from lmtailor.knowledge.prompt import KBRetrieval

        try:
            settings = RetrievalSettings.model_validate(section)
        except ValidationError as e:
            raise explain(e, "the run's config.yaml", RetrievalSettings, prefix="retrieval") from None
        return KBRetrieval(settings)
    if not (config.get("data") or {}).get("retrieved_examples"):
        return None
    from lmtailor.config import build_config
    from lmtailor.crypto import use_keys
    from lmtailor.data.retrieve import Retriever
    from lmtailor.data.validate import load_datasets

    cfg = build_config(config, "the run's config.yaml")
    with use_keys(cfg.privacy.key_source()):  # the training data may be encrypted
        train, _, _ = load_datasets(cfg.data)
    if cfg.privacy.scrub:
        from lmtailor.privacy.scrub import scan_options, scrub_for_run

        train, _, _ = scrub_for_run(train, [], cfg.privacy.mode, cfg.privacy.salt_env, cfg.privacy.ner,
                                    options=scan_options(cfg.privacy))
    return RunRetrieval(Retriever([ex for ex in train if ex.messages is not None]), cfg.data.retrieved_examples or 0)


def answer(target: str, prompts: Sequence[str], settings: GenerationSettings, system: str | None = None,
           compare: bool = False, raw: bool = False, speedup: str = "none", kb: str | None = None
           ) -> list[dict[str, str]]:
    """Answer prompts with a run or model; with `compare`, also with its base model (adapter off).

    `speedup` is a CPU decoding speed-up (see `lmtailor.fastdecode.speed_up`), applied to both models.
    `kb` is a knowledge base whose passages go into each prompt (the run's `retrieval:` settings, else defaults).
    Returns one {label: answer} dict per prompt; labels are "tuned" and "base" when comparing, and "sources"
    lists the passages shown when a knowledge base was searched.
    """
    from lmtailor.fastdecode import speed_up
    from lmtailor.models import load_pretrained
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load()
    system = system or run.system_prompt
    rag = retrieval_for(run.config, kb)
    cited: list[Any] = [None] * len(prompts)
    shown: list[Prompt] = list(prompts)
    if rag is not None and not raw:  # the run trained with retrieved examples or passages in its prompts
        shown = []
        for i, p in enumerate(prompts):
            augmented, cited[i] = rag.with_sources(as_messages(p, system))
            shown.append(augmented)
    if compare and run.adapter and speedup == "none":
        with model.disable_adapter():  # type: ignore[operator]  # the base for free: same weights, adapter off
            base = generate(model, tok, shown, settings, system=system, raw=raw)
    elif compare:
        base_model = speed_up(load_pretrained(run.base_model, run.auto_class).eval(), speedup)
        base = generate(base_model, tok, shown, settings, system=system, raw=raw)
        del base_model
    tuned = generate(speed_up(model, speedup), tok, shown, settings, system=system, raw=raw)
    out = [{"answer": t} for t in tuned] if not compare else [
        {"base": b, "tuned": t} for b, t in zip(base, tuned, strict=False)]
    for row, found in zip(out, cited, strict=True):
        if found is not None:
            row["sources"] = "; ".join(f"[{c['n']}] {c['source']}:{c['lines']}" for c in found) or "(no passage)"
    return out


def chat_loop(target: str, settings: GenerationSettings, system: str | None = None, speedup: str = "none",
              kb: str | None = None) -> None:
    """Interactive chat on stdin/stdout; the whole conversation goes through the chat template each turn."""
    from lmtailor.fastdecode import speed_up
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load()
    model = speed_up(model, speedup)
    system = system or run.system_prompt
    rag = retrieval_for(run.config, kb)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {run.name} (empty line or Ctrl-D to quit, /reset to start over)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            return
        if line == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        reply = ""
        shown, cited = (messages, None) if rag is None else rag.with_sources(messages)  # history: the user's words
        for piece in stream(model, tok, shown if isinstance(shown, list) else messages, settings):
            reply += piece
            print(piece, end="", flush=True)
        print()
        if cited:
            print("sources: " + "; ".join(f"[{c['n']}] {c['source']}:{c['lines']}" for c in cited))
        messages.append({"role": "assistant", "content": reply.strip()})
