"""From-scratch pretraining throughput: a ~10M-parameter llama-style decoder at context 512, fp32 on CPU.

Measures training tokens/s, peak RSS, and achieved FLOP/s, counting 6·N per token for the matrix products
(N = parameters used in a product per token: all but the embedding lookup, the tied head counted once) plus
6·layers·context·hidden for attention (Kaplan et al. 2020), as a fraction of an fp32 matmul peak measured here
with the same threads (the best of square GEMMs of a few sizes).

The step is lmtailor's: the `clm` loss module (head on target positions), AdamW, gradient clipping, full rows of
`context` tokens (packed pretraining blocks). Token ids are random: the cost of a step does not depend on them.

    python benchmarks/pretrain_throughput.py            # 12 timed steps -> benchmarks/results/pretrain_throughput.json
    python benchmarks/pretrain_throughput.py --quick    # 3 steps, writes nothing unless --out

Target: achieved / peak >= 0.60.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "pretrain_throughput.json"
TARGET = 0.60


def matmul_peak(seconds: float = 1.0) -> dict[str, Any]:
    """Best fp32 GEMM rate over a few square sizes (FLOP/s = 2·n³ per product)."""
    best: dict[str, Any] = {"flops": 0.0}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            reps += 1
        rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
        if rate > best["flops"]:
            best = {"flops": rate, "n": n}
    return best


def build(layers: int, hidden: int, heads: int, context: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32 * round(8 * hidden / 3 / 32),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=context, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def run(steps: int, rows: int, layers: int, hidden: int, heads: int, context: int, vocab: int) -> dict[str, Any]:
    from lmtailor.objectives.causal import CausalLMLoss
    from lmtailor.pretrain.scratch import matmul_params, training_flops_per_token

    model = build(layers, hidden, heads, context, vocab)
    model.train()
    loss_module = CausalLMLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, context + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:].clone(),
             "position_ids": torch.arange(context).expand(rows, -1)}

    def step() -> float:
        loss, n = loss_module(**batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach() / n)

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    per_step = sorted(times)[len(times) // 2]  # median: other processes share these cores
    tokens_per_s = rows * context / per_step
    flops_token = training_flops_per_token(model, layers, context, hidden)
    return {
        "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model),
        "layers": layers, "hidden": hidden, "heads": heads, "context": context, "vocab": vocab, "rows": rows,
        "steps": steps, "step_seconds_median": per_step, "step_seconds_all": times,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops_token, "achieved_flops": tokens_per_s * flops_token,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=8, help="rows of `context` tokens per step")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="3 steps, no results file unless --out")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = 3 if a.quick else a.steps
    peak = matmul_peak()
    result = run(steps, a.rows, a.layers, a.hidden, a.heads, a.context, a.vocab)
    peak_after = matmul_peak()  # bracket the run: the cores are shared, so the peak is taken twice
    peak_flops = max(peak["flops"], peak_after["flops"])
    result.update(
        peak_matmul_flops=peak_flops, peak_matmul_n=peak["n"], fraction_of_peak=result["achieved_flops"] / peak_flops,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, torch_threads=torch.get_num_threads(),
        torch=torch.__version__, python=sys.version.split()[0], machine=platform.machine(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), target=TARGET,
    )
    print(f"{result['params'] / 1e6:.1f}M-parameter decoder, context {a.context}, {a.rows} rows/step, "
          f"{result['torch_threads']} threads")
    print(f"tokens/s          {result['tokens_per_s']:.0f}")
    print(f"peak RSS          {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"FLOPs/token       {result['flops_per_token'] / 1e6:.1f} M (6N + attention)")
    print(f"achieved          {result['achieved_flops'] / 1e9:.1f} GFLOP/s")
    print(f"fp32 matmul peak  {peak_flops / 1e9:.1f} GFLOP/s (n={peak['n']})")
    print(f"fraction of peak  {result['fraction_of_peak']:.0%} (target {TARGET:.0%})")
    out = a.out or (None if a.quick else str(DEFAULT_OUT))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
