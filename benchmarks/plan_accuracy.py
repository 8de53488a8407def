"""`lmtailor plan` against the measured peak memory of real `lmtailor train` runs on CPU, at three model sizes.

Each case is one `python -m lmtailor train` process: a llama model built from a config with random weights
(`pretrain.scratch`, objective clm: every position supervised), rows of exactly `seq` tokens from a generated
corpus, a few optimizer steps in float32 (mixed_precision=no). The run records `peak_memory_mib` in its
metrics.json: the resident set's high-water mark during the training steps minus the resident set just before the
model was built (lmtailor.memory.PeakMemory; the high-water mark is reset when the steps start, so the transient
copy of loading does not count). That is what the plan's estimate for the same run (lmtailor.plan.run_estimate:
weights, gradients, optimizer state, activations of one micro-batch) should match. Memory does not depend on the
machine's load, so these figures are stable on a shared machine; the step times printed are not.

    python benchmarks/plan_accuracy.py                 # 3 sizes x 5 cases; writes results/plan_accuracy.{json,md}
    python benchmarks/plan_accuracy.py --sizes 15M     # one size
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# name -> (pretrain.scratch fields, seq, micro-batch); the three llama sizes of benchmarks/scaling.py
SIZES: dict[str, tuple[dict[str, int], int, int]] = {
    "21M": (dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=16000), 256, 4),
    "41M": (dict(hidden=640, intermediate=1728, layers=6, heads=10, kv_heads=5, vocab=24000), 256, 4),
    "81M": (dict(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4, vocab=32000), 256, 4),
}
CASES = [("full", False), ("full", True), ("lora", False)]
STEPS = 2
WORDS = ["the", "a", "model", "data", "train", "step", "memory", "plan", "token", "layer", "weight", "gradient",
         "optimizer", "batch", "sequence", "attention", "head", "vocabulary", "matrix", "product", "norm", "rotary",
         "embedding", "loss", "value", "key", "query", "output", "input", "hidden", "width", "depth", "adapter"]


def corpus(path: Path, n_lines: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))}) + "\n"
                            for _ in range(n_lines)))
    return path


def tokenizer(folder: Path, text: Path) -> Path:
    if not (folder / "tokenizer.json").is_file():
        from lmtailor.tokenizers import train_bpe

        docs = [json.loads(line)["text"] for line in text.read_text().splitlines()]
        train_bpe(docs, vocab_size=600, min_frequency=1).save_pretrained(folder)
    return folder


def train_args(size: str, method: str, ckpt: bool, work: Path, steps: int = STEPS) -> list[str]:
    """The `lmtailor train` arguments of one case (the corpus and tokenizer are made in `work`)."""
    spec, seq, micro = SIZES[size]
    text = work / "corpus.jsonl"
    if not text.is_file():
        corpus(text, 1500)  # ~70k tokens: enough blocks of 256 tokens for the steps and a validation split
    tok = tokenizer(work / "tok", text)
    scratch = [f"pretrain.scratch.{k}={v}" for k, v in spec.items()]
    return ["objective=clm", f"pretrain.scratch.tokenizer={tok}", f"pretrain.scratch.context={seq}", *scratch,
            "pretrain.cache=true", f"max_length={seq}", "packing=false", f"data.path={text}", "data.val_size=4",
            f"method={method}", f"gradient_checkpointing={str(ckpt).lower()}", "lora.r=16",
            f"batch_size={micro}", f"micro_batch_size={micro}", f"max_steps={steps}", "mixed_precision=no",
            "eval.before_after=false", "report_to=[]", "--no-progress"]


def measure(size: str, method: str, ckpt: bool, work: Path, steps: int = STEPS, release: bool = False
            ) -> dict[str, Any]:
    """Run one case in its own process (with `release`: release_memory=true); returns its metrics.json facts."""
    out = work / f"run-{size}-{method}-{int(ckpt)}-{int(release)}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmtailor", "train", f"output_dir={out}", "overwrite=true",
                           *train_args(size, method, ckpt, work, steps), f"release_memory={str(release).lower()}"],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{size} {method} ckpt={ckpt} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"measured_mib": metrics["peak_memory_mib"], "seconds": time.perf_counter() - t0,
            "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"]}


def planned(size: str, method: str, ckpt: bool) -> tuple[float, float]:
    """(the plan's peak for the process, of which live tensors) in bytes."""
    from lmtailor.plan import estimate, run_estimate, shape_of

    spec, seq, micro = SIZES[size]
    shape = shape_of({"hidden_size": spec["hidden"], "intermediate_size": spec["intermediate"],
                      "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"],
                      "num_key_value_heads": spec["kv_heads"], "vocab_size": spec["vocab"],
                      "tie_word_embeddings": True})
    sup = (seq - 1) / seq  # the last position of a row has no target
    tensors = estimate(shape, method, ckpt, seq, act_bytes=4, autocast_copy=False, lora_r=16, supervised=sup,
                       device="cpu").peak(micro)
    return run_estimate(shape, method, ckpt, seq, micro, lora_r=16, supervised=sup), tensors


def check_against_measured(sizes: list[str], cases: list[tuple[str, bool]], work: Path,
                           steps: int = STEPS, out: Path | None = None) -> list[dict[str, Any]]:
    """One row per (size, case): plan, measured, relative error of the plan; the results so far are written to
    `out` after each row (a long run on a loaded machine leaves what it measured)."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for method, ckpt in cases:
            got = measure(size, method, ckpt, work, steps, release=True)
            default = measure(size, method, ckpt, work, steps)
            plan_b, tensors_b = planned(size, method, ckpt)
            plan_mib = plan_b / 2**20
            row = {"size": size, "method": method, "checkpointing": ckpt, "seq": SIZES[size][1],
                   "micro_batch": SIZES[size][2], "plan_mib": round(plan_mib, 1),
                   "plan_tensors_mib": round(tensors_b / 2**20, 1), **got,
                   "error": plan_mib / got["measured_mib"] - 1, "default_measured_mib": default["measured_mib"],
                   "default_seconds": default["seconds"], "default_error": plan_mib / default["measured_mib"] - 1}
            rows.append(row)
            print(f"{size:>5} {method:<6} ckpt={'yes' if ckpt else 'no ':<3} plan {plan_mib:7.0f} MiB  measured "
                  f"{got['measured_mib']:7.0f} MiB  error {row['error']:+6.1%}  ({got['seconds']:.0f} s); glibc's "
                  f"default {default['measured_mib']:7.0f} MiB ({row['default_error']:+6.1%}, "
                  f"{default['seconds']:.0f} s)", flush=True)
            if out is not None:
                write(rows, out, steps)
    return rows


def write(rows: list[dict[str, Any]], out: Path, steps: int) -> None:
    from lmtailor.io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "plan_accuracy.json", {"cases": rows, "steps": steps, "method": "process RSS "
                      "high-water mark during the steps minus RSS before the model was built"})
    atomic_write_text(out / "plan_accuracy.md", render(rows))


def render(rows: list[dict[str, Any]]) -> str:
    worst = max(abs(r["error"]) for r in rows)
    lines = ["# `lmtailor plan` vs measured peak memory of CPU training runs", "",
             "Each row is one `lmtailor train` process (objective clm on a llama model built from a config with "
             f"random weights, every position supervised, float32, {STEPS} optimizer steps, AdamW). Measured: the "
             "resident set's high-water mark during the training steps minus the resident set before the model was "
             "built (`peak_memory_mib` of metrics.json). Plan: `lmtailor.plan.run_estimate` for the same run: "
             "the live tensors at the step's peak moment (of which the activations are counted from what autograd "
             "saves per block, see tests/test_plan_memory.py) plus the kernels' code paged in. Memory does not depend "
             "on the machine's load; step times do.", "",
             "Each case runs twice: with `release_memory: true` (glibc gives freed memory back at once; the "
             "plan's target) and with glibc's default, which keeps freed blocks for reuse, so the resident set "
             "stays above the live tensors (the steps are faster; see lmtailor.memory.release_freed_memory).", "",
             "| size | method | checkpointing | seq x micro-batch | trainable | plan: tensors | plan MiB | "
             "measured MiB (release_memory) | plan error | measured MiB (glibc default) | plan error |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['method']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['seq']} x {r['micro_batch']} | {r['trainable_params'] / 1e6:.2f}M | "
                     f"{r.get('plan_tensors_mib', float('nan')):.0f} | {r['plan_mib']:.0f} | "
                     f"{r['measured_mib']:.0f} | {r['error']:+.1%} | {r.get('default_measured_mib', float('nan')):.0f}"
                     f" | {r.get('default_error', float('nan')):+.1%} |")
    worst_default = max((abs(r["default_error"]) for r in rows if "default_error" in r), default=float("nan"))
    lines += ["", f"Worst plan error: {worst:.1%} over {len(rows)} runs with release_memory (target: within 15%); "
              f"{worst_default:.1%} against glibc's default."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = check_against_measured(args.sizes, CASES, Path(tmp), args.steps, args.out)
    print(f"worst plan error {max(abs(r['error']) for r in rows):.1%}; wrote {args.out / 'plan_accuracy.md'}")


if __name__ == "__main__":
    main()
