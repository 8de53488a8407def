"""Decoding: greedy or sampled, batched, with stop strings, through the same renderer as training."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lmtailor.config import GenerationSettings
from lmtailor.render import prompt_ids

Prompt = str | list[dict[str, str]]


def as_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """A bare string becomes one user turn; a message list passes through."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


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
             system: str | None = None, progress: bool = False, desc: str = "generating", raw: bool = False
             ) -> list[str]:
    """Answer each prompt; returns the new text only (special tokens removed, cut at stop strings).

    With `raw`, string prompts are continued as plain text (no chat template), as for a pretrained-only model.
    """
    s = settings or GenerationSettings()
    if raw:
        encoded = [list(tok(str(p), add_special_tokens=True)["input_ids"]) for p in prompts]
    else:
        encoded = [prompt_ids(tok, as_messages(p, system)) for p in prompts]
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
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **_gen_kwargs(tok, s))
        for r, i in enumerate(idx):
            text = tok.decode(gen[r, width:], skip_special_tokens=True)
            out[i] = cut_at_stop(text, s.stop).strip()
        bar.update(len(idx))
    bar.close()
    return out


def stream(model: Any, tok: Any, messages: list[dict[str, str]], settings: GenerationSettings | None = None
           ) -> Iterator[str]:
    """Yield the answer to one conversation piece by piece as it is decoded."""
    from transformers import TextIteratorStreamer

    s = settings or GenerationSettings()
    ids = torch.tensor([prompt_ids(tok, messages)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **_gen_kwargs(tok, s))
    worker = threading.Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs), daemon=True)
    worker.start()
    emitted = ""
    for piece in streamer:
        emitted += piece
        if s.stop and cut_at_stop(emitted, s.stop) != emitted:
            tail = cut_at_stop(emitted, s.stop)[len(emitted) - len(piece):]
            if tail:
                yield tail
            break
        yield piece
    worker.join()


def answer(target: str, prompts: Sequence[str], settings: GenerationSettings, system: str | None = None,
           compare: bool = False, raw: bool = False, speedup: str = "none") -> list[dict[str, str]]:
    """Answer prompts with a run or model; with `compare`, also with its base model (adapter off).

    `speedup` is a CPU decoding speed-up (see `lmtailor.fastdecode.speed_up`), applied to both models.
    Returns one {label: answer} dict per prompt; labels are "tuned" and "base" when comparing.
    """
    from lmtailor.fastdecode import speed_up
    from lmtailor.models import load_pretrained
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load()
    system = system or run.system_prompt
    if compare and run.adapter and speedup == "none":
        with model.disable_adapter():  # type: ignore[operator]  # the base for free: same weights, adapter off
            base = generate(model, tok, prompts, settings, system=system, raw=raw)
    elif compare:
        base_model = speed_up(load_pretrained(run.base_model, run.auto_class).eval(), speedup)
        base = generate(base_model, tok, prompts, settings, system=system, raw=raw)
        del base_model
    tuned = generate(speed_up(model, speedup), tok, prompts, settings, system=system, raw=raw)
    if not compare:
        return [{"answer": t} for t in tuned]
    return [{"base": b, "tuned": t} for b, t in zip(base, tuned, strict=False)]


def chat_loop(target: str, settings: GenerationSettings, system: str | None = None, speedup: str = "none") -> None:
    """Interactive chat on stdin/stdout; the whole conversation goes through the chat template each turn."""
    from lmtailor.fastdecode import speed_up
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load()
    model = speed_up(model, speedup)
    system = system or run.system_prompt
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
        for piece in stream(model, tok, messages, settings):
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
