"""Where the batched llama.cpp engine spends CPU: CPU seconds per prompt token and per generated token.

Measures `lmtailor.serve.llamabatch.BatchedLlama` on the bundled model's GGUF export in one process, configurations
interleaved and repeated, so that other load on a shared machine hits all alike. The clock is this process's CPU
time (`time.process_time`), not wall time: on a shared machine wall time measures the neighbours. Every
configuration decodes with `--threads` llama.cpp threads (1: CPU time is then the work itself; with more, OpenMP
threads that spin while waiting also count).

Per configuration and repetition: S sequences (each of --seqs) get a --prompt-token prompt each, all prefilled in one
`llama_decode` call (CPU per prompt token), then --steps decoding steps of one token per sequence, one call per step
(CPU per generated token). The batching gain is CPU per token at S=1 over CPU per token at S=8.

Configurations (`CONFIGS`): the engine as it was (16384 KV cells, flash attention auto), fewer cells, flash
attention off, each GGUF type (q8_0, q4_k_m, and f16, q4_0 where --types names them: exported on first use).

    python benchmarks/llamabatch_cpu.py [--reps 3] [--types q8_0,q4_k_m,q4_0,f16] [--threads 1]
                                        [--configs base,cells2048,...] [--seqs 1,8] [--steps 24]

Writes benchmarks/results/llamabatch_cpu.json (medians over the repetitions) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "smollm2-135m-instruct"

# name -> (GGUF type or None for each of --types, BatchedLlama keyword arguments)
CONFIGS: dict[str, dict[str, Any]] = {
    "cells2048": {"positions": 512, "context": {"n_ctx": 2048}},
    "fa_off": {"positions": 512, "context": {"n_ctx": 2048, "flash_attn_type": 0}},
    "fa_on": {"positions": 512, "context": {"n_ctx": 2048, "flash_attn_type": 1}},
    "engine": {"positions": 4096},  # what load_llamacpp_slots builds today
}


def _prompt(seq: int, n: int) -> list[int]:
    rng = np.random.default_rng(seq)
    return [int(t) for t in rng.integers(200, 40000, n)]


def measure(llm: Any, seqs: int, prompt: int, steps: int) -> dict[str, float]:
    """CPU seconds per prompt token (one call for all prompts) and per generated token (one call per step)."""
    ids = [llm.reserve(prompt + steps) for _ in range(seqs)]
    assert all(s is not None for s in ids)
    c0 = time.process_time()
    first = llm.decode([(s, _prompt(s, prompt), True) for s in ids])
    c1 = time.process_time()
    last = [int(x.argmax()) for x in first]
    for _ in range(steps):
        out = llm.decode([(s, [t], True) for s, t in zip(ids, last, strict=True)])
        last = [int(x.argmax()) for x in out]
    c2 = time.process_time()
    for s in ids:
        llm.release(s, prompt + steps)
    return {"prefill_cpu_ms_per_token": 1000 * (c1 - c0) / (seqs * prompt),
            "decode_cpu_ms_per_token": 1000 * (c2 - c1) / (seqs * steps)}


def main() -> None:
    from lmtailor.serve.llamabatch import BatchedLlama
    from lmtailor.serve.llamacpp_engine import gguf_for

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--types", default="q8_0,q4_k_m")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--type-configs", default="engine", help="configurations run for every type (others: first type)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seqs", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "llamabatch_cpu.json"))
    a = p.parse_args()
    types = a.types.split(",")
    seqs = [int(s) for s in a.seqs.split(",")]
    plan: list[tuple[str, str]] = []
    for name in a.configs.split(","):
        for kind in (types if name in a.type_configs.split(",") else types[:1]):
            plan.append((name, kind))
    paths = {kind: gguf_for(a.model, kind)[0] for kind in types}
    llms = {(name, kind): BatchedLlama(paths[kind], seqs=max(seqs), threads=a.threads, **CONFIGS[name])
            for name, kind in plan}
    for llm in llms.values():  # warm up (first calls allocate)
        measure(llm, max(seqs), 8, 2)
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    t0 = time.time()
    for rep in range(a.reps):
        for key, llm in llms.items():
            for s in seqs:
                runs.setdefault((*key, s), []).append(measure(llm, s, a.prompt_tokens, a.steps))
        print(f"rep {rep + 1}/{a.reps} done, {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for (name, kind, s), rs in runs.items():
        row = {"config": name, "gguf": kind, "seqs": s, "cells": llms[(name, kind)].cells,
               **{k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}}
        one = runs.get((name, kind, 1))
        if one and s > 1:
            row["decode_batching_gain"] = round(statistics.median(r["decode_cpu_ms_per_token"] for r in one)
                                                / row["decode_cpu_ms_per_token"], 2)
        rows.append(row)
        print(f"  {name:12} {kind:7} seqs {s}: prefill {row['prefill_cpu_ms_per_token']:6.2f} cpu-ms/token  "
              f"decode {row['decode_cpu_ms_per_token']:6.2f} cpu-ms/token"
              + (f"  gain x{row['decode_batching_gain']}" if "decode_batching_gain" in row else ""), flush=True)
    result = {"model": a.model, "threads": a.threads, "reps": a.reps, "prompt_tokens": a.prompt_tokens,
              "steps": a.steps, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "note": "CPU time of this process (medians over interleaved repetitions) on a shared machine",
              "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
