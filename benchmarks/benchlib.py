"""Pieces the benchmarks share: one side per subprocess (so peak RSS is that side's alone), repeats in alternating
order, a step clock for HF trainers, the machine's matmul peaks, and the quickstart's held-out shell questions that
the demonstrations are judged on.

Imported by the benchmark scripts, which run as `python benchmarks/<name>.py` (this folder is then on sys.path).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports kilobytes, macOS bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_side(script: str, side: str, args: list[str], threads: int | None = None) -> dict[str, Any]:
    """Run `script --side side ARGS` in a fresh interpreter; returns the result dict it writes."""
    env = dict(os.environ)
    if threads:
        # Set before torch starts its thread pool; on a busy shared machine 1 thread avoids OpenMP spin stalls.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    try:
        cmd = [sys.executable, script, "--side", side, *args, "--result", result_path]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
        result: dict[str, Any] = json.loads(Path(result_path).read_text())
        result["process_seconds"] = time.perf_counter() - t0
        return result
    finally:
        os.unlink(result_path)


def alternate(repeats: int, sides: list[str], run: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """`repeats` rounds of every side; round r starts with side r (mod the sides), so every side runs first once
    in len(sides) rounds (two sides: ab, ba, ab, ...)."""
    rounds = []
    for rep in range(repeats):
        k = rep % len(sides)
        order = sides[k:] + sides[:k]
        rnd: dict[str, Any] = {"order": order}
        for side in order:
            rnd[side] = run(side, rep)
        rounds.append(rnd)
    return rounds


def median(values: Any) -> float:
    return float(statistics.median(list(values)))


def step_clock() -> Any:
    """A transformers TrainerCallback that records elapsed seconds after each step and the logged losses."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.t0 = self.t1 = 0.0
            self.step_elapsed: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step_elapsed.append(time.perf_counter() - self.t0)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t1 = time.perf_counter()

    return StepClock()


def steady_seconds_per_step(step_elapsed: list[float]) -> float | None:
    """Seconds per step without the first one (allocator and thread-pool warm-up hit every side)."""
    if len(step_elapsed) < 3:
        return None
    return (step_elapsed[-1] - step_elapsed[0]) / (len(step_elapsed) - 1)


def matmul_gflops(dtype_name: str, n: int = 2048, budget_s: float = 3.0) -> float:
    """Best GFLOP/s of an n x n matmul in this dtype with torch's threads (a few tries within `budget_s`)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t0 = time.perf_counter()
    torch.mm(a, b)  # warm-up (packing routines, thread pool)
    best = time.perf_counter() - t0
    spent = best
    for _ in range(5):
        if spent > budget_s:
            break
        t = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best / 1e9


def linear_shapes(config: Any) -> list[tuple[int, int, int]]:
    """(in, out, count) of a llama-style decoder's linear layers over all its layers (attention's four projections,
    the gated MLP's three), from its transformers config."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return [(h, heads * d, layers), (h, kv * d, 2 * layers), (heads * d, h, layers), (h, inter, 2 * layers),
            (inter, h, layers)]


def step_matmul_gflops(shapes: list[tuple[int, int, int]], rows: int, dtype_name: str,
                       head: tuple[int, int, int] | None = None, budget_s: float = 0.5) -> float:
    """GFLOP/s of a frozen-weight training step's own matrix products, timed alone: for each (in, out, count)
    linear, the forward (rows x in) @ (in x out) and the input gradient (rows x out) @ (out x in), best of a few
    tries each; `head` = (in, out, rows) for the output head on its own rows. What a step made of nothing but its
    matrix products would reach at this width and row count, which small products keep below the 2048^2 peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    flops = seconds = 0.0
    products = [(k, n, c, rows) for k, n, c in shapes] + ([(head[0], head[1], 1, head[2])] if head else [])
    for k, n, count, m in products:
        if not m:
            continue
        for a, b in ((torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)),
                     (torch.randn(m, n).to(dtype), torch.randn(n, k).to(dtype))):
            torch.mm(a, b)  # warm-up: the kernel for this shape
            best, spent = float("inf"), 0.0
            while spent < budget_s or best == float("inf"):
                t = time.perf_counter()
                torch.mm(a, b)
                dt = time.perf_counter() - t
                best, spent = min(best, dt), spent + dt
            flops += 2 * m * k * n * count
            seconds += best * count
    return flops / seconds / 1e9


def machine_peaks() -> dict[str, Any]:
    """fp32 and bf16 2048^2 matmul GFLOP/s, and the CPU's bf16 matrix units (None: none found).

    Without bf16 units torch falls back to a scalar bf16 kernel (measured: 0.07 GFLOP/s on a 2-vCPU AMD EPYC, one
    2048^2 product would take minutes), so there the bf16 figure is of a 256^2 product.
    """
    from lmtailor.memory import cpu_bf16_units

    units = cpu_bf16_units()
    bf16_n = 2048 if units else 256
    return {"matmul_gflops_float32": matmul_gflops("float32"),
            "matmul_gflops_bfloat16": matmul_gflops("bfloat16", bf16_n), "bf16_matmul_size": bf16_n,
            "bf16_units": units}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def step_items(cfg: Any) -> tuple[Any, list[list[Any]]]:
    """The tokenizer and, per optimizer step, the prepared items lmtailor's loop feeds (the same code path)."""
    from lmtailor.loop import batch_at, item_lengths, plan_steps
    from lmtailor.objectives import get_objective
    from lmtailor.rundata import build_run_data

    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    ctx.tokenizer = objective.tokenizer(ctx)
    items = build_run_data(objective, ctx, write_audit=False).train_items
    per_epoch, total = plan_steps(cfg, len(items), 1)
    lengths = item_lengths(cfg, items)
    return ctx.tokenizer, [[items[i] for i in batch_at(s, per_epoch, len(items), cfg, 1, None, lengths)]
                           for s in range(total)]


def side_arguments(p: Any, steps: int, steps_help: str, unit: str, default_model: str, default_out: Path,
                   root: Path) -> None:
    """The options every side-by-side throughput script takes (argparse parser `p`)."""
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per side (default {steps}: {steps_help})")
    p.add_argument("--batch-size", type=int, default=8, help=f"{unit} per optimizer step (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every side, alternating order (default 3)")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 repeat: a smoke test (writes nothing unless --out)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="every side: fp32, or bf16 autocast over fp32 weights; auto = bf16 where the CPU has bf16 "
                   "matrix units (lmtailor's dtype auto), else fp32")
    p.add_argument("--base-model", default=default_model, help=f"model (default {default_model}; a tiny folder for "
                   "smoke tests)")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {default_out.relative_to(root)}; "
                   "none with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's choice)")


def settle_arguments(a: Any) -> Any:
    """--quick and --precision auto resolved: the parsed arguments, changed in place."""
    if a.quick:
        a.steps, a.repeats = 3, 1
    if a.precision == "auto":
        from lmtailor.memory import cpu_bf16_units

        a.precision = "bf16" if cpu_bf16_units() else "fp32"
    return a



def held_out_questions(work: Path, limit: int | None = None, nearest: bool = False) -> tuple[Path, list[Any]]:
    """The quickstart recipe's held-out split (catalog:shell-commands, val_size 60, split_seed 0: the 60 questions
    every demonstration is judged on), or its first `limit`, written as chats to `work`/held_out.jsonl: that path
    and the examples. `nearest`: each question shows its nearest training pair, as the quickstart trains and
    judges; else the bare question."""
    from lmtailor.config import load_config
    from lmtailor.data.retrieve import with_retrieved
    from lmtailor.data.validate import load_datasets

    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"))
    train, val, _ = load_datasets(cfg.data)
    val = val[:limit] if limit else val
    if nearest:
        _, (val,) = with_retrieved(train, [val], cfg.data.retrieved_examples)
    path = work / "held_out.jsonl"
    path.write_text("".join(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n" for ex in val))
    return path, list(val)
