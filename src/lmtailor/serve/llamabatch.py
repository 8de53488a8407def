"""llama.cpp decoding many sequences at once: one `llama_decode` call per step for every row of a batch.

A `BatchedLlama` owns a llama.cpp model and one context whose KV cache holds up to `seqs` sequences in one
unified buffer (`kv_unified`: every sequence may grow to `positions` tokens, cells freed by one are reused by
another). A step hands llama.cpp a `llama_batch` whose tokens carry different sequence ids: the next token of
every decoding row and prompt chunks of rows being prefilled, so the weights are read once per step for all rows.
One more sequence, the prefix cache, keeps the KV cells of the last prompt prefilled: a new row whose prompt starts
the same way (chat prompts share the template's system turn) gets those cells shared into its sequence
(`llama_memory_seq_cp`, no copy in a unified cache) and prefills only the rest, as llama.cpp's own server and
llama-cpp-python's `Llama.generate` reuse the common prefix of consecutive prompts. A prefix's cells depend only on
its tokens (causal attention), so the row decodes what it would from a full prefill, up to the float rounding of
llama.cpp's kernels at another batch shape.
Only the llama-cpp-python low-level API (`llama_cpp` module) is used; `lmtailor.llamacpp` imports it lazily.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from lmtailor import llamacpp
from lmtailor.errors import ModelError

# Cells of the shared KV cache: positions x seqs, but no more than this unless one sequence needs more (a
# sequence still gets `positions`; the engine admits a row only while the cells its prompt and max_tokens need
# are free, see `BatchedLlama.reserve`).
MAX_CELLS = 16384


class BatchedLlama:
    """A llama.cpp model and a context decoding up to `seqs` sequences together.

    Args:
        path: the GGUF file.
        seqs: sequences decoded together (the server's max_batch_size).
        positions: the longest sequence (prompt + answer) in tokens.
        threads: CPU threads; 0: one per core.
        n_batch: tokens per `llama_decode` call (prompt chunks of rows being prefilled fill what decoding leaves).
        context: other `llama_context_params` fields to set (name -> value), e.g. {"flash_attn_type": 0}.
        prefix_cache: keep the last prompt prefilled for the next rows (`reuse`); off: every prompt is prefilled whole.

    Raises:
        ModelError: llama-cpp-python missing, or llama.cpp refuses the file or the context.
    """

    def __init__(self, path: str | Path, seqs: int = 8, positions: int = 4096, threads: int = 0,
                 n_batch: int = 512, context: dict[str, Any] | None = None, prefix_cache: bool = True) -> None:
        lib = llamacpp.llama_cpp()
        self.lib = lib
        self.path = Path(path)
        seqs = max(1, min(int(seqs), int(lib.llama_max_parallel_sequences()) - 1))  # and one: the prefix cache
        threads = threads or max(1, os.cpu_count() or 1)
        quiet = logging.getLogger("llama-cpp-python")  # llama-cpp-python's C log callback prints at this level
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        lib.llama_backend_init()
        model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not model:
            raise ModelError(f"llama.cpp cannot load {path}")
        params = lib.llama_context_default_params()
        cells = max(positions, min(positions * seqs, MAX_CELLS))
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = seqs + 1
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        for key, value in (context or {}).items():
            setattr(params, key, value)
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise ModelError(f"llama.cpp cannot make a context of {cells} cells for {seqs} sequences on {path}")
        batch = lib.llama_batch_init(n_batch, 0, 1)
        self._finalizer = weakref.finalize(self, _free, lib, model, ctx, batch)
        self.model, self.ctx, self.batch = model, ctx, batch
        self.memory = lib.llama_get_memory(ctx)
        self.seqs, self.n_batch, self.threads = seqs, n_batch, threads
        self.cells = int(lib.llama_n_ctx(ctx))
        self.positions = min(positions, self.cells)
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        self.free = list(range(seqs))  # sequence ids not in use, lowest first
        self.reserved = 0  # KV cells promised to the sequences in use and held by the prefix cache
        self.cache_seq = seqs  # the prefix cache's sequence id
        self.cached: list[int] = []  # the tokens whose KV cells the prefix cache holds
        self.prefix_cache = prefix_cache
        self.fed: dict[int, list[int]] = {s: [] for s in range(seqs)}  # tokens in each sequence's KV cache
        self.last: list[int] = []  # the tokens the last released sequence held (what llama.cpp evaluated)
        # CPU seconds of the calling thread inside llama_decode and the tokens decoded (benchmarks read these; with
        # one thread llama.cpp computes on the calling thread, so this is all of its work)
        self.decode_cpu_s = 0.0
        self.decoded_tokens = 0

    def n_ctx(self) -> int:
        return self.positions

    def reserve(self, cells: int) -> int | None:
        """A free sequence id with `cells` KV cells promised to it, or None while none is free or cells are short."""
        cells = min(cells, self.positions)
        if self.free and self.reserved + cells > self.cells:
            self.forget()  # the prefix cache gives way to a row
        if not self.free or self.reserved + cells > self.cells:
            return None
        self.reserved += cells
        seq = self.free.pop(0)
        self.fed[seq] = []
        return seq

    def release(self, seq: int, cells: int) -> None:
        """Free a sequence: its KV cells (llama_memory_seq_rm), its id and the cells promised to it."""
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.last, self.fed[seq] = self.fed[seq], []
        self.reserved -= min(cells, self.positions)
        self.free.append(seq)
        self.free.sort()

    def reuse(self, seq: int, prompt: list[int]) -> int:
        """Share into `seq` (just reserved, empty) the cached KV cells of the longest common prefix of `prompt` and
        the prefix cache, leaving at least the prompt's last token to feed (its logits are needed).

        Returns:
            The prompt tokens `seq` now holds (feed it prompt[n:]); 0 when nothing is shared.
        """
        n, limit = 0, min(len(prompt) - 1, len(self.cached))
        while n < limit and prompt[n] == self.cached[n]:
            n += 1
        if n:
            self.lib.llama_memory_seq_cp(self.memory, self.cache_seq, seq, 0, n)
            self.fed[seq] = list(prompt[:n])
        return n

    def remember(self, seq: int) -> None:
        """Make the prefix cache hold what `seq` holds now (a prompt just prefilled): its cells, shared."""
        tokens = self.fed[seq]
        if not self.prefix_cache or not tokens or tokens == self.cached:
            return
        if self.reserved - len(self.cached) + len(tokens) > self.cells:  # rows come first
            return
        self.forget()
        self.lib.llama_memory_seq_cp(self.memory, seq, self.cache_seq, -1, -1)
        self.cached = list(tokens)
        self.reserved += len(tokens)

    def forget(self) -> None:
        """Empty the prefix cache (its cells are freed where no row shares them)."""
        if self.cached:
            self.lib.llama_memory_seq_rm(self.memory, self.cache_seq, -1, -1)
            self.reserved -= len(self.cached)
            self.cached = []

    def decode(self, parts: list[tuple[int, list[int], bool]]) -> list[np.ndarray | None]:
        """One `llama_decode` over every part: (sequence id, tokens that follow what it holds, want logits).

        Returns:
            Per part, the logits after its last token ((V,) float32, a copy) where asked, else None.

        Raises:
            ModelError: more than n_batch tokens, or llama.cpp failed (1: no room left in the KV cache).
        """
        b = self.batch
        n = 0
        where: list[int | None] = []
        for seq, tokens, want in parts:
            start = len(self.fed[seq])
            if n + len(tokens) > self.n_batch:
                raise ModelError(f"llama.cpp batch overflow: {n + len(tokens)} tokens > n_batch {self.n_batch}")
            for k, token in enumerate(tokens):
                b.token[n] = token
                b.pos[n] = start + k
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = 0
                n += 1
            if want and tokens:
                b.logits[n - 1] = 1
            where.append(n - 1 if want and tokens else None)
        if n == 0:
            return [None] * len(parts)
        b.n_tokens = n
        c0 = time.thread_time()
        rc = self.lib.llama_decode(self.ctx, b)
        self.decode_cpu_s += time.thread_time() - c0
        self.decoded_tokens += n
        if rc != 0:
            raise ModelError(f"llama_decode failed with code {rc} ({n} tokens, {len(parts)} sequences)"
                             + (": no room left in the KV cache" if rc == 1 else ""))
        for seq, tokens, _want in parts:
            self.fed[seq].extend(tokens)
        out: list[np.ndarray | None] = []
        for i in where:
            if i is None:
                out.append(None)
                continue
            ptr = self.lib.llama_get_logits_ith(self.ctx, i)
            out.append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                             shape=(self.n_vocab,)).copy())
        return out

    def close(self) -> None:
        self._finalizer()


def _free(lib: Any, model: Any, ctx: Any, batch: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


__all__ = ["MAX_CELLS", "BatchedLlama"]
