"""Scaling: `lmtailor plan` against the measured peak memory of real CPU training steps at three model sizes, and
1 process vs 2 processes (DDP and FSDP) on the same global batch: tokens/s and peak memory per process.

Each memory measurement runs in its own process: it builds a llama model from a config (random weights), wraps it
in lmtailor's causal-LM loss and optimizer, runs 2 optimizer steps on random full-length rows (every position
supervised) and reports its peak resident memory (ru_maxrss) minus the resident memory before the model was built,
with glibc giving freed blocks back at once (release_memory). That is what `plan` estimates for a CPU run:
float32 weights and activations, no autocast copies, no CUDA reserve.

    python benchmarks/scaling.py            # writes benchmarks/results/scaling.json and prints the tables
    python benchmarks/scaling.py --quick    # the smallest size only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name -> llama config fields
    "21M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=16000),
    "81M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000),
    "41M": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=6, num_attention_heads=10,
                num_key_value_heads=5, vocab_size=24000),
}
CASES = [("full", False), ("full", True), ("lora", False), ("lora", True)]
SEQ, BATCH = 128, 4


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(size: str, method: str, ckpt: bool) -> dict[str, float]:
    """One measurement (run in a fresh process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtailor.config import load_config
    from lmtailor.loop import make_optimizer
    from lmtailor.memory import enable_gradient_checkpointing, release_freed_memory
    from lmtailor.models import add_lora
    from lmtailor.objectives.causal import CausalLMLoss

    release_freed_memory()  # as release_memory=true: freed blocks leave the resident set (what the plan counts)
    torch.manual_seed(0)
    cfg = load_config(None, [f"method={method}", "lora.r=16"])
    spec = {**SIZES[size], "tie_word_embeddings": True, "max_position_embeddings": SEQ}
    base = _rss()
    model = LlamaForCausalLM(LlamaConfig(**spec))
    if method == "lora":
        model = add_lora(model, 16, 32, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    if ckpt:
        enable_gradient_checkpointing(model)
    model.train()
    loss_module = CausalLMLoss(model)
    optimizer = make_optimizer(model, cfg)
    ids = torch.randint(0, spec["vocab_size"], (BATCH, SEQ))
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    t0 = time.perf_counter()
    for _ in range(2):
        loss, n = loss_module(input_ids=ids, targets=ids, position_ids=pos)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - base, "step_s": seconds}


def planned(size: str, method: str, ckpt: bool) -> float:
    from lmtailor.plan import estimate, shape_of

    shape = shape_of({**SIZES[size], "tie_word_embeddings": True})
    return estimate(shape, method, ckpt, SEQ, act_bytes=4, autocast_copy=False,
                    attention_matrix=True).peak(BATCH)


def memory_table(sizes: list[str]) -> list[dict[str, object]]:
    rows = []
    for size in sizes:
        for method, ckpt in CASES:
            out = subprocess.run([sys.executable, __file__, "--child", size, method, str(int(ckpt))],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            got = json.loads(out.stdout.strip().splitlines()[-1])
            plan = planned(size, method, ckpt)
            row = {"size": size, "method": method, "checkpointing": ckpt, "plan_mib": plan / 2**20,
                   "measured_mib": got["measured"] / 2**20, "error": plan / got["measured"] - 1,
                   "step_s": got["step_s"]}
            rows.append(row)
            print(f"{size:>5} {method:<5} ckpt={'yes' if ckpt else 'no ':<3} plan {row['plan_mib']:8.0f} MiB  "
                  f"measured {row['measured_mib']:8.0f} MiB  error {row['error']:+.1%}", flush=True)
    return rows


def plan_table(sizes: list[str]) -> list[dict[str, object]]:
    """The `plan` accuracy table. HOOK: when the plan-accuracy work (issue 15, i15c) lands a comparison function
    in lmtailor.plan (`accuracy_table(sizes) -> rows` with plan_mib/measured_mib/error), it is used; until then
    this script's own measurement above."""
    try:
        from lmtailor.plan import accuracy_table  # type: ignore[attr-defined]
    except ImportError:
        return memory_table(sizes)
    return accuracy_table(sizes)  # type: ignore[no-any-return]


def processes_table(quick: bool) -> list[dict[str, object]]:
    """1 process vs 2 (DDP, FSDP) on one recipe: tokens/s and peak memory per process."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import PAIRS, build_tiny  # the tests' tokenizer and model builder

    accelerate = Path(sys.executable).with_name("accelerate")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny(root / "model", layers=4, width=256)
        data = root / "d.jsonl"
        data.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n"
                                for i in range(20) for q, a in PAIRS))
        common = ["train", f"base_model={model}", f"data.path={data}", f"max_steps={4 if quick else 12}",
                  "batch_size=16", "method=full", "eval.before_after=false", "data.val_size=4", "--no-progress"]
        for name, launch in (("1 process", [sys.executable, "-m", "lmtailor"]),
                             ("2 processes DDP", [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                                                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                                                  "lmtailor"]),
                             ("2 processes FSDP", None)):
            extra = []
            if launch is None:
                launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "-m", "lmtailor"]
                extra = ["distributed.strategy=fsdp"]
            out = root / name.replace(" ", "_")
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", *launch, *common, *extra, f"output_dir={out}"],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            metrics = json.loads((out / "metrics.json").read_text())
            # GNU time's %M (KiB) is the largest resident set of any one process it waited for: the launcher's
            # children included, so with 2 processes it is the peak of the larger worker (per process, not summed)
            peak_mib = int(proc.stderr.strip().splitlines()[-1]) / 1024
            rows.append({"run": name, "tokens_per_s": metrics["train_tokens_per_s"],
                         "peak_rss_mib_per_process": peak_mib, "final_loss": metrics["final_train_loss"]})
            print(f"{name:<18} {metrics['train_tokens_per_s']:8.0f} tokens/s  peak {peak_mib:6.0f} MiB/process  "
                  f"final loss {metrics['final_train_loss']:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "METHOD", "CKPT"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-processes", action="store_true")
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.child[2] == "1")))
        return
    sizes = ["21M"] if a.quick else list(SIZES)
    result = {"note": "machine shared with other engineers' jobs (2 cores): timings are indicative; memory is not "
                      "affected", "seq_len": SEQ, "micro_batch": BATCH, "memory": plan_table(sizes)}
    if not a.skip_processes:
        result["processes"] = processes_table(a.quick)
    out = Path(__file__).with_name("results") / "scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    worst = max(abs(float(r["error"])) for r in result["memory"])  # type: ignore[arg-type]
    print(f"plan vs measured: worst error {worst:.1%} over {len(result['memory'])} runs; wrote {out}")


if __name__ == "__main__":
    main()
