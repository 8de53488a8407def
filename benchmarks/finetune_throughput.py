"""LoRA SFT throughput: lmtailor's loop (packed rows, loss head on supervised positions) vs HF `Trainer` + peft.

Both sides train the bundled SmolLM2-135M-Instruct on `catalog:shell-commands` with the same LoRA (r=8, alpha=16,
q/k/v/o, no dropout), the same seeded examples in the same step groups (`lmtailor.loop.batch_at`), the same token
sequences (`lmtailor.render`, prompt masked to -100), batch 8, AdamW lr 2e-4 linear, clipping 1.0, fp32, and the
same number of optimizer steps. The baseline pads each batch to its longest example, as LLaMA-Factory and Axolotl
do. Only the training steps are timed (model loading and saving are excluded); token counts are exact counts of
the examples fed. Each side runs in its own subprocess so peak RSS is per side.

    python benchmarks/finetune_throughput.py              # 30 steps a side -> benchmarks/results/*.json
    python benchmarks/finetune_throughput.py --quick      # 5 steps a side, a smoke test (writes nothing unless --out)
    python benchmarks/finetune_throughput.py --repeats 2  # alternate the order of the sides, report each ratio

Target: ours / baseline non-padding tokens/s >= 2.0 with peak RSS no higher than the baseline's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "finetune_throughput.json"
RATIO_TARGET = 2.0


def run_config(steps: int, batch_size: int, output_dir: str) -> Any:
    """The recipe both sides follow (the baseline reads its settings from it too)."""
    from lmtailor.config import build_config

    return build_config({
        "name": "bench-finetune-throughput", "output_dir": output_dir, "overwrite": True,
        "base_model": "smollm2-135m-instruct", "objective": "sft", "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"path": "catalog:shell-commands", "val_size": 0},
        "max_length": 256, "packing": True, "pack_length": 1024,
        "max_steps": steps, "batch_size": batch_size, "micro_batch_size": batch_size,
        "lr": 2e-4, "scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "dtype": "float32", "seed": 42, "eval_every": 0, "save_every": 0,
        "eval": {"before_after": False, "generate_examples": 0, "samples": 0},
    }, source="benchmark")


def step_groups(cfg: Any) -> tuple[Any, list[Any]]:
    """The tokenizer and, per optimizer step, the tokenized examples lmtailor's loop feeds (same code path)."""
    from lmtailor.loop import batch_at, plan_steps
    from lmtailor.objectives import get_objective
    from lmtailor.rundata import build_run_data

    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    ctx.tokenizer = objective.tokenizer(ctx)
    seqs = build_run_data(objective, ctx, write_audit=False).train_items
    per_epoch, total = plan_steps(cfg, len(seqs), 1)
    return ctx.tokenizer, [[seqs[i] for i in batch_at(s, per_epoch, len(seqs), cfg, 1)] for s in range(total)]


def token_counts(groups: list[Any]) -> dict[str, int]:
    return {
        "tokens": sum(len(s.input_ids) for g in groups for s in g),
        "padded_tokens": sum(len(g) * max(len(s.input_ids) for s in g) for g in groups),
        "supervised_tokens": sum(s.n_supervised for g in groups for s in g),
    }


def peak_rss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---- side (a): lmtailor ----------------------------------------------------------------------------------------

def side_ours(steps: int, batch_size: int) -> dict[str, Any]:
    import torch

    from lmtailor.train import train

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        cfg = run_config(steps, batch_size, tmp)
        summary = train(cfg, progress=False)
        history = [json.loads(line) for line in (Path(tmp) / "history.jsonl").read_text().splitlines()]
    # history records cumulative tokens/s after each step; elapsed = tokens / tokens_per_s.
    _, groups = step_groups(cfg)
    counts = token_counts(groups)
    cum_tokens, step_elapsed = 0, []
    for rec, g in zip(history, groups, strict=True):
        cum_tokens += sum(len(s.input_ids) for s in g)
        step_elapsed.append(cum_tokens / rec["tokens_per_s"])
    return {
        "train_seconds": float(summary["train_seconds"]), "step_elapsed": step_elapsed,
        "tokens_reported": int(round(summary["train_tokens_per_s"] * summary["train_seconds"])),
        **counts, "losses": [r["loss"] for r in history], "final_loss": summary["final_train_loss"],
        "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads(),
    }


# ---- side (b): HF Trainer + peft, pad to the longest in the batch ----------------------------------------------

def side_baseline(steps: int, batch_size: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

    from lmtailor.models import load_pretrained

    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        cfg = run_config(steps, batch_size, tmp)
        tok, groups = step_groups(cfg)
        tok.padding_side = "right"
        # The steps' examples in order; a sequential sampler cuts them back into the same groups of batch_size.
        rows = [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids), "labels": s.labels}
                for g in groups for s in g]
        set_seed(cfg.seed)  # same seed, same order of draws as lmtailor: identical LoRA initialisation
        model = load_pretrained(cfg.base_model, dtype=torch.float32)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)

        class Clock(TrainerCallback):
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

        clock = Clock()
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=int(cfg.warmup_ratio * steps),
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=cfg.seed,
            train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_drop_last=False,
            logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock],
                          data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        out = trainer.train()
    return {
        "train_seconds": clock.t1 - clock.t0, "train_runtime": float(out.metrics["train_runtime"]),
        "step_elapsed": clock.step_elapsed, **token_counts(groups), "losses": clock.losses,
        "final_loss": clock.losses[-1] if clock.losses else None,
        "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads(),
    }


# ---- driver ----------------------------------------------------------------------------------------------------

def run_side(side: str, steps: int, batch_size: int, threads: int | None = None) -> dict[str, Any]:
    """Run one side in a fresh interpreter; returns its result dict (peak RSS is that process's alone)."""
    env = dict(os.environ)
    if threads:
        # Set before torch starts its thread pool; on a busy shared machine 1 thread avoids OpenMP spin stalls.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    try:
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(steps), "--batch-size", str(batch_size),
               "--result", result_path]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
        result = json.loads(Path(result_path).read_text())
        result["process_seconds"] = time.perf_counter() - t0
        return result
    finally:
        os.unlink(result_path)


def rates(r: dict[str, Any]) -> dict[str, float]:
    secs = r["train_seconds"]
    out = {"tokens_per_s": r["tokens"] / secs, "padded_tokens_per_s": r["padded_tokens"] / secs,
           "supervised_tokens_per_s": r["supervised_tokens"] / secs}
    # Steady state: drop the first step (allocator and thread-pool warm-up hit both sides).
    el = r["step_elapsed"]
    if len(el) > 2:
        out["steady_seconds_per_step"] = (el[-1] - el[0]) / (len(el) - 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per side (default 30)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (default 8)")
    p.add_argument("--quick", action="store_true", help="5 steps per side, a smoke test")
    p.add_argument("--repeats", type=int, default=1, help="run both sides this many times, alternating order")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                   "none with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's choice)")
    p.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    steps = 5 if a.quick else a.steps

    if a.side:  # child process: one side, result to a JSON file
        result = (side_ours if a.side == "ours" else side_baseline)(steps, a.batch_size)
        Path(a.result).write_text(json.dumps(result))
        return

    import torch

    runs: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        order = ["ours", "baseline"] if rep % 2 == 0 else ["baseline", "ours"]
        pair: dict[str, Any] = {"order": order}
        for side in order:
            print(f"[{rep + 1}/{a.repeats}] {side}: {steps} steps of {a.batch_size} ...", flush=True)
            pair[side] = run_side(side, steps, a.batch_size, a.threads)
            print(f"    {pair[side]['train_seconds']:.1f} s training, "
                  f"{pair[side]['tokens'] / pair[side]['train_seconds']:.0f} tokens/s", flush=True)
        if pair["ours"]["tokens"] != pair["baseline"]["tokens"]:
            raise SystemExit(f"the sides saw different token counts: {pair['ours']['tokens']} vs "
                             f"{pair['baseline']['tokens']}")
        if pair["ours"]["tokens_reported"] not in range(pair["ours"]["tokens"] - 2, pair["ours"]["tokens"] + 3):
            print(f"warning: lmtailor reports {pair['ours']['tokens_reported']} tokens, the groups hold "
                  f"{pair['ours']['tokens']}", file=sys.stderr)
        pair["ratio"] = rates(pair["ours"])["tokens_per_s"] / rates(pair["baseline"])["tokens_per_s"]
        runs.append(pair)

    ours = [rates(r["ours"]) for r in runs]
    base = [rates(r["baseline"]) for r in runs]
    med = statistics.median
    ratio = med(r["ratio"] for r in runs)
    rss_ours = max(r["ours"]["peak_rss_bytes"] for r in runs)
    rss_base = max(r["baseline"]["peak_rss_bytes"] for r in runs)
    first = runs[0]
    tokens, padded = first["ours"]["tokens"], first["ours"]["padded_tokens"]
    table = [
        ("", "lmtailor (packed)", "HF Trainer + peft (padded)"),
        ("non-padding tokens/s", f"{med(o['tokens_per_s'] for o in ours):.1f}",
         f"{med(b['tokens_per_s'] for b in base):.1f}"),
        ("padded tokens/s", "-", f"{med(b['padded_tokens_per_s'] for b in base):.1f}"),
        ("supervised tokens/s", f"{med(o['supervised_tokens_per_s'] for o in ours):.1f}",
         f"{med(b['supervised_tokens_per_s'] for b in base):.1f}"),
        ("training seconds", f"{med(r['ours']['train_seconds'] for r in runs):.1f}",
         f"{med(r['baseline']['train_seconds'] for r in runs):.1f}"),
        ("peak RSS (GB)", f"{rss_ours / 1e9:.2f}", f"{rss_base / 1e9:.2f}"),
        ("final step loss", f"{first['ours']['final_loss']:.4f}", f"{first['baseline']['final_loss']:.4f}"),
    ]
    w0 = max(len(r[0]) for r in table)
    w1 = max(len(r[1]) for r in table)
    print(f"\n{steps} steps x {a.batch_size} examples: {tokens} tokens ({first['ours']['supervised_tokens']} "
          f"supervised); padded to the longest in each batch: {padded} ({tokens / padded:.0%} real)")
    for row in table:
        print(f"{row[0]:<{w0}}  {row[1]:>{w1}}  {row[2]:>26}")
    per = ", ".join(f"{r['ratio']:.2f}" for r in runs)
    verdict = "meets" if ratio >= RATIO_TARGET and rss_ours <= rss_base else "misses"
    print(f"ratio (non-padding tokens/s, ours / baseline): {ratio:.2f} (per repeat: {per}); target >= "
          f"{RATIO_TARGET} with RSS <= baseline: {verdict}")

    out = a.out if a.out is not None else (None if a.quick else DEFAULT_OUT)
    if out is None:
        return
    result = {
        "benchmark": "finetune_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "setup": {"base_model": "smollm2-135m-instruct", "data": "catalog:shell-commands", "method": "lora",
                  "lora": "r=8 alpha=16 q/k/v/o dropout 0", "steps": steps, "batch_size": a.batch_size,
                  "max_length": 256, "lr": 2e-4, "scheduler": "linear", "dtype": "float32",
                  "baseline": "transformers Trainer + peft, DataCollatorForSeq2Seq pad to longest, sequential sampler",
                  "ours": "lmtailor.train.train, packing=true (pack_length 1024)"},
        "tokens": tokens, "padded_tokens": padded, "supervised_tokens": first["ours"]["supervised_tokens"],
        "ours_tokens_per_s": med(o["tokens_per_s"] for o in ours),
        "baseline_tokens_per_s": med(b["tokens_per_s"] for b in base),
        "baseline_padded_tokens_per_s": med(b["padded_tokens_per_s"] for b in base),
        "ratio": ratio, "ratio_per_repeat": [r["ratio"] for r in runs], "ratio_target": RATIO_TARGET,
        "ours_peak_rss_bytes": rss_ours, "baseline_peak_rss_bytes": rss_base,
        "ours_final_loss": first["ours"]["final_loss"], "baseline_final_loss": first["baseline"]["final_loss"],
        "meets_target": verdict == "meets",
        "load_average_at_end": os.getloadavg(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": first["ours"]["torch_threads"],
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
