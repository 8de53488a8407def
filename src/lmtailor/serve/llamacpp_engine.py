"""Serving engines beside torch: llama.cpp (each target exported to GGUF once, cached) and vLLM (GPU only).

One API for every engine: the routes, limits, stop strings, repetition stop, streaming and usage are the ones of
`lmtailor.serve.app`; only the decoding of a batch differs. The llama.cpp engine is given the token ids that
`lmtailor.render.prompt_ids` makes (the ids training put before each assistant turn), never text that llama.cpp
would re-tokenize, and decodes all rows of a batch together, one llama.cpp sequence per row, one `llama_decode`
per step (`lmtailor.serve.llamabatch`).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtailor import llamacpp
from lmtailor.errors import ConfigError
from lmtailor.io import cache_dir
from lmtailor.serve.engine import Engine, Job, _Rows
from lmtailor.serve.llamabatch import BatchedLlama
from lmtailor.serve.models import Slot

log = logging.getLogger(__name__)

ENGINES = ("torch", "llama.cpp", "vllm")
ENGINE_HELP = ("decoding engine: torch (transformers, batched), llama.cpp (the run exported to GGUF, "
               "see --gguf-type), vllm (NVIDIA GPU only)")
DEFAULT_GGUF_TYPE = "q8_0"
# The engine `lmtailor serve` uses on a CPU machine when --engine is not given: whichever of "torch" and
# "llama.cpp" benchmarks/serve_load.py (--only engines) measures faster at equal quality; its "decisions" section
# names it. This one constant flips the default (README, "Serving engines", states it).
CPU_DEFAULT_ENGINE = "torch"


def default_engine(speedup: str = "none") -> str:
    """The engine when none is named: CPU_DEFAULT_ENGINE on a CPU machine, torch with a CUDA GPU.

    A torch speed-up (--speedup other than none) asks for the torch engine; llama.cpp falls back to torch where
    llama-cpp-python is not installed (said in the log).
    """
    if speedup != "none" or torch.cuda.is_available():
        return "torch"
    if CPU_DEFAULT_ENGINE == "llama.cpp" and not llamacpp.available():
        log.warning("llama-cpp-python is not installed: serving with the torch engine (%s)", llamacpp.INSTALL_HINT)
        return "torch"
    return CPU_DEFAULT_ENGINE



def check_engine(engine: str) -> None:
    """Refuse an unknown engine, and vLLM where it cannot run.

    Raises:
        ConfigError: the engine is unknown, or vllm without a CUDA GPU or without the vllm package.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown serving engine '{engine}'", f"choose one of: {', '.join(ENGINES)}")
    if engine == "vllm":
        if not torch.cuda.is_available():
            raise ConfigError("--engine vllm needs an NVIDIA GPU with CUDA, and this machine has none",
                              "use --engine torch or --engine llama.cpp on CPU")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("--engine vllm: the vllm package is not installed",
                              "pip install vllm on the GPU machine, or use --engine torch") from None
        raise ConfigError("--engine vllm is not wired in this version of lmtailor",
                          "export the run with `lmtailor export RUN --format merged` and start `vllm serve` on "
                          "that folder")


def gguf_for(target: str, gguf_type: str = DEFAULT_GGUF_TYPE) -> tuple[Path, Any, Any]:
    """The cached GGUF export of a run or model (made on first use) and its HF tokenizer and Run."""
    from transformers import AutoTokenizer

    from lmtailor.ggufwrite import write_gguf_file
    from lmtailor.models import prepare_tokenizer, unwrap_peft
    from lmtailor.runs import Run

    run = Run.open(target)
    folder = cache_dir("gguf", f"{run.name}-{_digest(run)}")
    path = folder / f"model-{gguf_type}.gguf"
    if not path.is_file() or not (folder / "tokenizer_config.json").is_file():
        log.warning("exporting %s to %s for llama.cpp (once)", target, path)
        model, tok = run.load(merge=True)
        write_gguf_file(unwrap_peft(model).eval(), tok, path, gguf_type, name=run.name)
        tok.save_pretrained(folder)
        del model
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    return path, tok, run


def _digest(run: Any) -> str:
    """Names the export after what it was made from: the model folder's files (name, size, mtime)."""
    h = hashlib.sha256(str(run.model_dir or run.target).encode())
    folder = Path(run.model_dir) if run.model_dir else None
    if folder is not None and folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(run.base_model).encode())
    return h.hexdigest()[:16]


def load_llamacpp_slots(targets: list[str], gguf_type: str = DEFAULT_GGUF_TYPE, threads: int = 0,
                        n_ctx: int = 4096, seqs: int = 8) -> dict[str, Slot]:
    """One slot per target, its model a `BatchedLlama` on the target's GGUF export: `seqs` sequences (the
    server's max_batch_size) of up to `n_ctx` tokens each, decoded together."""
    from lmtailor.generate import retrieval_for

    if not targets:
        raise ConfigError("no model to serve", "give at least one run folder, model folder or model name")
    slots: dict[str, Slot] = {}
    for target in targets:
        path, tok, run = gguf_for(target, gguf_type)
        llm = BatchedLlama(path, seqs=seqs, positions=n_ctx, threads=threads)
        positions = llm.n_ctx()
        name, i = run.name, 2
        while name in slots:
            name, i = f"{run.name}-{i}", i + 1
        slots[name] = Slot(name, llm, tok, run.system_prompt, max_positions=positions,
                           retrieval=retrieval_for(run.config))
    return slots


class LlamaCppEngine(Engine):
    """The batching engine of `lmtailor.serve.engine` with llama.cpp decoding every row of a batch together.

    Each step is ONE `llama_decode` (`BatchedLlama.decode`): the next token of every decoding row plus prompt
    chunks of rows being prefilled, each row its own llama.cpp sequence. A row that finishes frees its sequence
    (KV cells and id) at once; with one worker (the CPU default) queued requests for the same model then join
    the running batch (continuous batching), unless a request for another model is waiting. A new row first
    shares the KV cells of its prompt's start with the last prompt prefilled (`BatchedLlama.reuse`: chat prompts
    share the system turn) and prefills only the rest; prefill is about 40% of the CPU of a short answer at 8
    rows (benchmarks/results/llamabatch_cpu.json), and decoding gains from batching, prefill hardly. Sampling is done
    here on each row's logits, with HF's rules (`_pick`): greedy is the argmax, so a row decodes the same tokens
    alone or in a batch up to llama.cpp's float rounding (tests/test_serve_llamacpp.py).
    """

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        slot = batch[0].slot
        waiting = deque(_Row.of(job, i, slot.tok, self.stats) for job in batch for i in range(len(job.prompts)))
        self.stats["batches"] += 1
        self.stats["rows"] += len(waiting)
        active: list[_Row] = []
        llm: Any
        with slot.active() as llm:
            try:
                while waiting or active:
                    while waiting and (len(active) < self.limits.max_batch_size or not active):
                        row = waiting[0]
                        if row.job.cancelled.is_set() or time.monotonic() > row.job.deadline:
                            waiting.popleft().stopper(torch.empty((1, 0), dtype=torch.long), torch.empty(0))
                            continue
                        seq = llm.reserve(row.cells)
                        if seq is None:
                            break
                        row.seq = seq
                        row.fed = llm.reuse(seq, row.prompt)  # the prompt's start cached from an earlier row
                        active.append(waiting.popleft())
                    self.stats["max_rows"] = max(self.stats["max_rows"], len(active) + len(waiting))
                    if not active:
                        continue
                    self._step(llm, slot, active)
                    active = [row for row in active if row.seq >= 0]
                    room = min(self.limits.max_batch_size, llm.seqs) - len(active) - len(waiting)
                    for job in self._join(slot, room):
                        batch.append(job)  # _run_guarded reports a failure to every job of `batch`
                        waiting.extend(_Row.of(job, i, slot.tok, self.stats) for i in range(len(job.prompts)))
                        self.stats["rows"] += len(job.prompts)
            finally:
                for row in active:
                    if row.seq >= 0:  # a failed step: free what the rows still hold
                        llm.release(row.seq, row.cells)

    def _step(self, llm: Any, slot: Any, active: list[_Row]) -> None:
        """One llama_decode for every active row; rows with logits get their next token and may finish."""
        parts: list[tuple[int, list[int], bool]] = []
        prefilled: list[_Row] = []  # rows whose prompt this step completes
        budget = llm.n_batch - sum(1 for row in active if row.fed == len(row.prompt))
        for row in active:
            if row.fed < len(row.prompt):  # prefill: as much of the prompt as the batch has room for
                if budget <= 0:
                    parts.append((row.seq, [], False))
                    continue
                chunk = row.prompt[row.fed: row.fed + budget]
                budget -= len(chunk)
                row.fed += len(chunk)
                parts.append((row.seq, chunk, row.fed == len(row.prompt)))
                if row.fed == len(row.prompt):
                    prefilled.append(row)
            else:
                parts.append((row.seq, [row.ids[-1]], True))
        outs = llm.decode(parts)
        if prefilled:  # the prefix cache keeps the last prompt prefilled, for the next rows (BatchedLlama.reuse)
            llm.remember(prefilled[-1].seq)
        for row, logits in zip(active, outs, strict=True):
            if logits is None:
                continue
            row.ids.append(_pick(logits, row, slot.tok.eos_token_id))
            done = bool(row.stopper(torch.tensor([row.ids]), torch.empty(0))[0])
            if not done and (len(row.ids) >= row.job.max_tokens
                             or len(row.prompt) + len(row.ids) >= slot.max_positions):
                row.stopper.finish_rest([row.ids])
                done = True
            if done:
                llm.release(row.seq, row.cells)
                row.seq = -1

    def _join(self, slot: Slot, room: int) -> list[Job]:
        """Queued jobs for `slot` that fit in `room` rows, oldest first, stopping at the first that cannot join.

        Only with one worker: the scheduler thread then waits for this worker and does not touch the queue.
        """
        if room <= 0 or self.limits.workers != 1 or self._stopped:
            return []
        taken: list[Job] = []
        pending = list(self._held)
        self._held.clear()
        while room > 0:
            if pending:
                job: Job | None = pending.pop(0)
            else:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
            if job is None:  # shutdown: leave it for the scheduler
                self._queue.put(None)
                break
            if job.slot.name != slot.name or len(job.prompts) > room:
                pending.insert(0, job)
                break
            if self._usable(job):
                with self._lock:
                    self._waiting -= 1
                self._running.add(job)
                taken.append(job)
                room -= len(job.prompts)
        self._held.extend(pending)
        return taken


@dataclass(eq=False)
class _Row:
    """One row of a llama.cpp batch: its prompt, its llama.cpp sequence, what it has decoded, its stopper."""

    job: Job
    i: int
    prompt: list[int]
    stopper: _Rows
    gen: torch.Generator
    seq: int = -1  # llama.cpp sequence id while it holds one
    fed: int = 0  # prompt tokens in the KV cache
    ids: list[int] = field(default_factory=list)  # generated tokens

    @classmethod
    def of(cls, job: Job, i: int, tok: Any, stats: dict[str, int]) -> _Row:
        gen = torch.Generator()
        if job.sampling.seed is not None:
            gen.manual_seed((job.sampling.seed + i) % 2**64)  # row i of a request: the same draws alone or in any batch
        else:
            gen.seed()
        return cls(job, i, list(job.prompts[i]), _Rows([(job, i)], 0, tok, tok.eos_token_id, stats), gen)

    @property
    def cells(self) -> int:
        return len(self.prompt) + self.job.max_tokens


def _pick(logits: np.ndarray, row: _Row, eos: int | None) -> int:
    """The next token from one row's logits (V,), as HF `generate` picks it in the torch engine: repetition
    penalty, EOS masked for ignore_eos, then the argmax (greedy) or temperature, top-k, top-p and a draw."""
    s = row.job.sampling
    x = torch.from_numpy(logits)
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(row.prompt + row.ids, dtype=torch.long)
        v = x[seen]
        x[seen] = torch.where(v < 0, v * s.repetition_penalty, v / s.repetition_penalty)
    if s.ignore_eos and eos is not None:
        x[eos] = -torch.inf
    if s.temperature <= 0:
        return int(x.argmax())
    x = x / s.temperature
    if s.top_k:
        kth = torch.topk(x, min(s.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, -torch.inf)
    if s.top_p < 1.0:
        order = torch.argsort(x)  # ascending
        cum = torch.softmax(x[order], -1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[-1] = False  # keep at least the most likely token
        x[order[drop]] = -torch.inf
    return int(torch.multinomial(torch.softmax(x, -1), 1, generator=row.gen))


def engine_class(engine: str) -> type[Engine]:
    return LlamaCppEngine if engine == "llama.cpp" else Engine


__all__ = ["CPU_DEFAULT_ENGINE", "ENGINES", "LlamaCppEngine", "check_engine", "default_engine", "engine_class",
           "gguf_for", "load_llamacpp_slots"]
