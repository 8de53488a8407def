"""The generation engine: a bounded queue, dynamic batching and per-row stopping, streaming and cancellation.

Requests wait in a queue (bounded: a full queue is refused, never piled up). A scheduler thread takes the
oldest request, waits `batch_window_ms` for others with the same model and sampling settings, and hands the
group to a worker as ONE batched `generate` (left padding, KV cache). Each row stops on its own: EOS (through
HF), its stop strings, the repetition stop of `lmtailor.generate` (a loop ends the row, its text keeps the first
copy), its max_tokens, its client going away, or its deadline. Text reaches the request as deltas while the batch
decodes, so streaming and non-streaming requests share batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lmtailor.config import GenerationSettings
from lmtailor.errors import ConfigError
from lmtailor.generate import ends_in_loop, loop_cut, loop_safe
from lmtailor.serve.models import Slot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Server caps. Every one protects the machine from a single client."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # cap on a request's max_tokens
    default_max_tokens: int = 256
    max_n: int = 8
    max_batch_size: int = 8  # rows decoded together in one forward pass
    batch_window_ms: float = 15.0  # how long the oldest request waits for company
    max_queue: int = 64  # requests waiting; one more is answered 429
    workers: int = 1  # generations running at once (each may be a batch); CPU: 1
    timeout_s: float = 300.0  # per request, queueing included
    static_cache: bool = False  # preallocated KV cache; measured no faster on CPU without torch.compile
    torch_threads: int = 0  # intra-op threads for decoding; 0 keeps torch's default (one per core)
    max_body_bytes: int = 4 * 2**20  # a larger request body is answered 413 (serve/guard.py)
    read_timeout_s: float = 30.0  # a request must arrive whole this long after its connection opens (slowloris)

    def __post_init__(self) -> None:
        """A limit out of range is a ConfigError naming its `serve` flag (or field) and the allowed range."""
        ranges = {"max_prompt_tokens": (1, None), "max_tokens": (1, None), "default_max_tokens": (1, None),
                  "max_n": (1, None), "max_batch_size": (1, 4096), "batch_window_ms": (0, 60_000),
                  "max_queue": (1, 1_000_000), "workers": (1, 64), "timeout_s": (0.001, 7 * 86400),
                  "torch_threads": (0, 4096), "max_body_bytes": (1024, None), "read_timeout_s": (0.01, 3600)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not (low <= value and (high is None or value <= high)):  # also refuses NaN
                flag = LIMIT_FLAGS.get(name, name)
                raise ConfigError(f"{flag}: must be at least {low:g}" + (f" and at most {high:g}" if high else "")
                                  + f"; got {value!r}")


# The `lmtailor serve` flag of each limit it sets.
LIMIT_FLAGS = {"max_batch_size": "--max-batch-size", "max_queue": "--max-queue", "timeout_s": "--timeout",
               "torch_threads": "--threads"}


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


@dataclass(frozen=True)
class Sampling:
    """Settings that must be equal for requests to share a batch."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def gen_kwargs(self) -> dict[str, Any]:
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k or None, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                "repetition_penalty": self.repetition_penalty}


STOP_REPEATS = GenerationSettings().stop_repeats  # the same default repetition stop as `lmtailor generate`


@dataclass(eq=False)
class Job:
    """One API request: `n` rows with the same prompt (or one row per prompt of a batch completion)."""

    slot: Slot
    prompts: list[list[int]]  # one token list per row
    sampling: Sampling
    max_tokens: int
    stop: list[str]
    emit: Callable[[tuple], None]  # receives ("delta", row, text) / ("done", row, reason, n_tokens) / ("error", ...)
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_repeats: int = STOP_REPEATS  # the repetition stop (GenerationSettings.stop_repeats); 0: off

    def repeats(self) -> int:
        """The repetition stop in force: off for ignore_eos rows, which run to max_tokens by request."""
        return 0 if self.sampling.ignore_eos else self.stop_repeats

    def key(self) -> tuple:
        return (self.slot.name, self.sampling)


class _Rows(StoppingCriteria):
    """Per-row stopping plus incremental text: called by `generate` after every decoding step.

    input_ids: (B, width + t). A row is finished by its stop strings, a loop (the repetition stop), max_tokens,
    its job being cancelled or past its deadline; on EOS, HF also marks the row finished and pads it from then on.
    A streamed row is sent only the text that no later loop cut or stop string can take back.
    """

    def __init__(self, rows: list[tuple[Job, int]], width: int, tok: Any, eos: int | None,
                 stats: dict[str, int]) -> None:
        self.rows, self.width, self.tok, self.eos, self.stats = rows, width, tok, eos, stats
        self.done = [False] * len(rows)
        self.sent = [""] * len(rows)  # text already emitted per row
        self.count = [0] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        now = time.monotonic()
        new = input_ids[:, self.width:].tolist()  # (B, t)
        for r, (job, _i) in enumerate(self.rows):
            if self.done[r]:
                continue
            ids = new[r]
            if self.eos is not None and ids and ids[-1] == self.eos:
                self._finish(r, ids[:-1], "stop", len(ids))
            elif job.cancelled.is_set():
                self._finish(r, ids, "cancelled", len(ids))
            elif now > job.deadline:
                self._finish(r, ids, "timeout", len(ids))
            elif ends_in_loop(ids, job.repeats()):
                self._finish(r, ids[:loop_cut(ids, job.repeats())], "stop", len(ids))
            else:
                text = self.tok.decode(ids, skip_special_tokens=True)
                cut = _first_stop(text, job.stop)
                if cut is not None:
                    self._finish(r, ids, "stop", len(ids), text[:cut])
                elif len(ids) >= job.max_tokens:
                    self._finish(r, ids, "length", len(ids), text)
                else:
                    safe = loop_safe(ids, job.repeats())
                    shown = text if safe == len(ids) else self.tok.decode(ids[:safe], skip_special_tokens=True)
                    self._send(r, _safe_prefix(shown, job.stop))
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _send(self, r: int, text: str) -> None:
        if len(text) > len(self.sent[r]) and text.startswith(self.sent[r]):
            job, i = self.rows[r]
            job.emit(("delta", i, text[len(self.sent[r]):]))
            self.sent[r] = text

    def _finish(self, r: int, ids: list[int], reason: str, n: int, text: str | None = None) -> None:
        if text is None:
            text = self.tok.decode(ids, skip_special_tokens=True)
            cut = _first_stop(text, self.rows[r][0].stop)
            text = text if cut is None else text[:cut]
        self._send(r, text)
        self.done[r] = True
        if reason in ("cancelled", "timeout"):
            self.stats[reason] += 1
        job, i = self.rows[r]
        job.emit(("done", i, reason, n))

    def finish_rest(self, new: list[list[int]]) -> None:
        """Rows still open when generate returned (EOS seen by HF, or max_new_tokens reached)."""
        for r in range(len(self.rows)):
            if self.done[r]:
                continue
            ids = new[r]
            repeats = self.rows[r][0].repeats()
            if self.eos is not None and self.eos in ids:
                k = ids.index(self.eos)
                self._finish(r, ids[:loop_cut(ids[:k], repeats)], "stop", k + 1)
            else:
                keep = loop_cut(ids, repeats)
                self._finish(r, ids[:keep], "stop" if keep < len(ids) else "length", len(ids))


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stop: list[str]) -> str:
    """The part of `text` that can be shown: no half UTF-8 character, no start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


class Engine:
    """Owns the queue, the scheduler thread and the worker threads."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # taken from the queue but not batchable with the current batch
        self._waiting = 0
        self._lock = threading.Lock()
        self._free = threading.Semaphore(limits.workers)
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="lmtailor-gen")
        self._thread = threading.Thread(target=self._schedule, name="lmtailor-scheduler", daemon=True)
        self._stopped = False
        self._running: set[Job] = set()
        if limits.torch_threads:
            # Small decode-step matmuls gain little from more threads, and lose a lot when another process
            # takes a core (threads wait on each other): see benchmarks/serve_load.py.
            torch.set_num_threads(limits.torch_threads)
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "cancelled": 0, "timeout": 0}
        self._thread.start()

    # ---- public ------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when max_queue jobs are already waiting."""
        with self._lock:
            if self._waiting >= self.limits.max_queue:
                raise QueueFull
            self._waiting += 1
        self._queue.put(job)

    def close(self) -> None:
        """Stop taking work, cancel what is queued or decoding, wait for the workers."""
        self._stopped = True
        for job in list(self._running) + list(self._held):
            job.cancelled.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    # ---- scheduler ---------------------------------------------------------------------------------------

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _schedule(self) -> None:
        while not self._stopped:
            self._free.acquire()  # wait for a worker: meanwhile requests gather in the queue
            first = self._next(None)
            if first is None:
                self._free.release()
                return
            if not self._usable(first):
                self._free.release()
                continue
            batch = self._gather(first)
            with self._lock:
                self._waiting -= len(batch)
            self._pool.submit(self._run_guarded, batch)

    def _usable(self, job: Job) -> bool:
        """Drop jobs whose client left or whose deadline passed while queued."""
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            with self._lock:
                self._waiting -= 1
            if not job.cancelled.is_set():
                job.emit(("error", 504, "the request timed out while waiting in the queue"))
            return False
        return True

    def _gather(self, first: Job) -> list[Job]:
        """`first` plus queued jobs with the same model and settings, up to max_batch_size rows."""
        batch, rows = [first], len(first.prompts)
        key = first.key()
        skipped: list[Job] = []
        pending = list(self._held)
        self._held.clear()
        end = time.monotonic() + self.limits.batch_window_ms / 1000
        while rows < self.limits.max_batch_size:
            if pending:
                job: Job | None = pending.pop(0)
            else:
                left = end - time.monotonic()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if job is None:  # shutdown: leave it for the scheduler loop
                self._queue.put(None)
                break
            if job.key() == key and rows + len(job.prompts) <= self.limits.max_batch_size and self._usable_peek(job):
                batch.append(job)
                rows += len(job.prompts)
            elif job.cancelled.is_set():
                with self._lock:
                    self._waiting -= 1
            else:
                skipped.append(job)
        self._held.extend(skipped + pending)
        return batch

    def _usable_peek(self, job: Job) -> bool:
        return not job.cancelled.is_set() and time.monotonic() <= job.deadline

    # ---- worker ------------------------------------------------------------------------------------------

    def _run_guarded(self, batch: list[Job]) -> None:
        self._running.update(batch)
        try:
            self._run(batch)
        except Exception as e:  # report to every client, keep serving
            log.exception("generation failed")
            for job in batch:
                job.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self._running.difference_update(batch)
            self._free.release()

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        slot = batch[0].slot
        tok = slot.tok
        rows = [(job, i) for job in batch for i in range(len(job.prompts))]
        prompts = [job.prompts[i] for job, i in rows]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's answer starts at column `width`
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        sampling = batch[0].sampling
        stopper = _Rows(rows, width, tok, tok.eos_token_id, self.stats)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        longest = max(job.max_tokens for job in batch)
        model: Any
        with slot.active() as model:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            device = next(model.parameters()).device
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                # ignore_eos: EOS is masked out of the logits, so rows run to their max_tokens (benchmarks)
                min_new_tokens=longest if sampling.ignore_eos else 0,
                pad_token_id=pad, eos_token_id=tok.eos_token_id,
                cache_implementation="static" if self.limits.static_cache else None,
                stopping_criteria=StoppingCriteriaList([stopper]), **sampling.gen_kwargs(),
            )
        stopper.finish_rest(out[:, width:].tolist())


class AsyncJob:
    """The asyncio side of a Job: events from the worker threads arrive on an asyncio.Queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple] = asyncio.Queue()

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)
