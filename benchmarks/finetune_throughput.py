"""LoRA SFT throughput: lmtailor's loop (packed rows, loss head on supervised positions) vs HF `Trainer` + peft and
TRL's `SFTTrainer` + peft.

All sides train the bundled SmolLM2-135M-Instruct on `catalog:shell-commands` with the same LoRA (r=8, alpha=16,
q/k/v/o, no dropout), the same seeded examples in the same step groups (`lmtailor.loop.batch_at`), the same token
sequences (`lmtailor.render`, prompt masked to -100), batch 8, AdamW lr 2e-4 linear, clipping 1.0, the same
precision (fp32; or bf16 autocast, the frozen base in bf16 and the adapters in float32, as lmtailor keeps an
adapter run under bf16 and as an HF user loads a base for LoRA) and the same number of optimizer steps. Baselines:
- HF `Trainer` pads each batch to its longest example, as LLaMA-Factory and Axolotl do;
- TRL `SFTTrainer` in its fastest configuration that trains correctly on CPU: padding-free batches (each step's
  examples flattened into one row, position ids restarting at 0, no padding at all). TRL documents padding_free as
  needing FlashAttention; on CPU with sdpa, transformers (>= 5) turns restarting position ids without an attention
  mask into a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), so attention stays inside
  each example; the equal losses asserted here check it. TRL's `packing=True` (bfd) would regroup examples into
  blocks of max_length (other examples per step), so the same padding-free collator on the same step groups is
  the like-for-like form of it.
Only the training steps are timed (model loading and saving are excluded); token counts are exact counts of the
examples fed. Each side runs in its own subprocess so peak RSS is per side. The machine's fp32 and bf16 2048^2
matmul peaks are measured first, and each side's model FLOPs per second is given as a share of the peak of the
precision it trains in.

    python benchmarks/finetune_throughput.py              # 3 alternating repeats, medians -> benchmarks/results/
    python benchmarks/finetune_throughput.py --quick      # 3 steps, 1 repeat, a smoke test (writes nothing)

Targets: ours / baseline non-padding tokens/s >= 2.0 (HF Trainer) and >= 1.5 (TRL) with peak RSS no higher.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import (
    ROOT,
    alternate,
    cpu_model,
    linear_shapes,
    machine_peaks,
    matmul_gflops,
    median,
    peak_rss_bytes,
    run_side,
    settle_arguments,
    side_arguments,
    steady_seconds_per_step,
    step_clock,
    step_items,
    step_matmul_gflops,
)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "finetune_throughput.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
RATIO_TARGETS = {"baseline": 2.0, "trl": 1.5}
NAMES = {"ours": "lmtailor (packed)", "baseline": "HF Trainer (padded)", "trl": "TRL SFT (padding-free)",
         "ours_f32base": "lmtailor, float32 base"}
SIDES = ["ours", "baseline", "trl"]
EXTRA_SIDES = ["ours_f32base"]  # bf16 only, on request: lmtailor with its frozen base kept in float32 (as before)
# Largest |final loss ours - final loss baseline| accepted: same examples, same initial adapter, same steps; the
# sides differ only in summation order (packed, padded or flattened rows), which drifts a little over the steps.
LOSS_TOLERANCE = {"fp32": 2e-3, "bf16": 3e-2}


def run_config(a: argparse.Namespace, output_dir: str) -> Any:
    """The recipe every side follows (the baselines read their settings from it too)."""
    from lmtailor.config import build_config

    precision = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "auto", "mixed_precision": "bf16"}}[a.precision]
    return build_config({
        "name": "bench-finetune-throughput", "output_dir": output_dir, "overwrite": True,
        "base_model": a.base_model, "objective": "sft", "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"path": "catalog:shell-commands", "val_size": 0},
        "max_length": 256, "packing": True, "pack_length": 1024,
        "max_steps": a.steps, "batch_size": a.batch_size, "micro_batch_size": a.batch_size,
        "lr": 2e-4, "scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        **precision, "seed": 42, "eval_every": 0, "save_every": 0,
        "eval": {"before_after": False, "generate_examples": 0, "samples": 0},
    }, source="benchmark")


def token_counts(groups: list[Any]) -> dict[str, int]:
    return {
        "tokens": sum(len(s.input_ids) for g in groups for s in g),
        "padded_tokens": sum(len(g) * max(len(s.input_ids) for s in g) for g in groups),
        "supervised_tokens": sum(s.n_supervised for g in groups for s in g),
    }


def param_counts(model: Any) -> dict[str, int]:
    """Parameters by role: the decoder body (no embeddings), the LM head (a matmul even when tied), the adapter."""
    from lmtailor.models import unwrap_peft

    hf = unwrap_peft(model)
    emb, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    tied = emb.data_ptr() == head.data_ptr()
    body = base - emb.numel() - (0 if tied else head.numel())
    return {"body": body, "head": head.numel(), "lora": lora}


def model_flops(params: dict[str, int], tokens: int, supervised: int, method: str = "lora") -> float:
    """FLOPs a training pass needs (the same figure for every side, whatever it computes on padding).

    Full fine-tuning: 6 N per token (forward 2N, backward 4N: activation and weight gradients). LoRA: the frozen
    weights need the forward 2N and the activation gradient 2N but no weight gradient, so 4 N_body per token plus
    6 N_lora for the adapter; the LM head counts only at supervised positions (the loss needs no other logits).
    Attention scores (about 2% at these lengths) are left out.
    """
    if method == "full":
        return 6 * params["body"] * tokens + 6 * params["head"] * supervised
    return (4 * params["body"] + 6 * params["lora"]) * tokens + 4 * params["head"] * supervised


def rows_of(groups: list[Any]) -> list[dict[str, Any]]:
    """The steps' examples in order; a sequential sampler cuts them back into the same groups of batch_size."""
    return [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids), "labels": s.labels}
            for g in groups for s in g]


def load_lora_model(cfg: Any, precision: str) -> Any:
    """The baselines' model: float32 base with LoRA; under bf16 the frozen base in bf16 and the adapters in float32,
    as an HF user loads it for LoRA (torch_dtype=bfloat16; PEFT keeps adapters float32) and as lmtailor keeps it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from lmtailor.models import load_pretrained

    set_seed(cfg.seed)  # same seed, same order of draws as lmtailor: identical LoRA initialisation
    model = load_pretrained(cfg.base_model, dtype=torch.float32)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if precision == "bf16":  # cast after the adapters are drawn, so that they start equal to lmtailor's
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model


def trainer_args(a: argparse.Namespace, cfg: Any, output_dir: str) -> dict[str, Any]:
    """TrainingArguments both baselines share."""
    return dict(
        output_dir=output_dir, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch", adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, seed=cfg.seed, train_sampling_strategy="sequential",
        dataloader_num_workers=0, dataloader_drop_last=False, logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, bf16=a.precision == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=True,
    )


# ---- side (a): lmtailor ----------------------------------------------------------------------------------------

def side_ours(a: argparse.Namespace, f32_base: bool = False) -> dict[str, Any]:
    import torch

    import lmtailor.train as train_module
    from lmtailor.train import train

    if f32_base:  # the frozen base left in float32 under bf16 autocast, as lmtailor kept it before 2026-12-01
        train_module.store_frozen_in = lambda model, dtype: 0  # type: ignore[assignment]

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        cfg = run_config(a, tmp)
        summary = train(cfg, progress=False)
        history = [json.loads(line) for line in (Path(tmp) / "history.jsonl").read_text().splitlines()]
    # history records cumulative tokens/s after each step; elapsed = tokens / tokens_per_s.
    _, groups = step_items(cfg)
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

def side_baseline(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        cfg = run_config(a, tmp)
        tok, groups = step_items(cfg)
        tok.padding_side = "right"
        model = load_lora_model(cfg, a.precision)
        params = param_counts(model)
        clock = step_clock()
        args = TrainingArguments(**trainer_args(a, cfg, tmp), remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows_of(groups), callbacks=[clock],
                          data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        trainer.train()
    return {
        "train_seconds": clock.t1 - clock.t0, "step_elapsed": clock.step_elapsed, **token_counts(groups),
        "losses": clock.losses, "final_loss": clock.losses[-1] if clock.losses else None, "params": params,
        "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads(),
    }


# ---- side (c): TRL SFTTrainer + peft, padding-free ---------------------------------------------------------------

def side_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        cfg = run_config(a, tmp)
        tok, groups = step_items(cfg)
        model = load_lora_model(cfg, a.precision)
        params = param_counts(model)
        clock = step_clock()
        # pre-tokenized input_ids + labels: TRL skips its tokenization and keeps the labels as given; max_length
        # None: the sequences are already cut at lmtailor's max_length
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows_of(groups)]
        args = SFTConfig(**trainer_args(a, cfg, tmp), padding_free=True, packing=False, max_length=None,
                         shuffle_dataset=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[clock])
        trainer.train()
    return {
        "train_seconds": clock.t1 - clock.t0, "step_elapsed": clock.step_elapsed, **token_counts(groups),
        "losses": clock.losses, "final_loss": clock.losses[-1] if clock.losses else None, "params": params,
        "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads(),
    }


# ---- driver ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side_arguments(p, 10, "a full run of 3 x 3 sides takes about 8 minutes", "examples", DEFAULT_MODEL, DEFAULT_OUT,
                   ROOT)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}, or "
                   "ours_f32base (bf16: lmtailor with its frozen base kept in float32)")
    p.add_argument("--side", choices=SIDES + EXTRA_SIDES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = settle_arguments(p.parse_args(argv))

    if a.side:  # child process: one side, result to a JSON file
        result = ({"ours": side_ours, "baseline": side_baseline, "trl": side_trl}[a.side](a)
                  if a.side != "ours_f32base" else side_ours(a, f32_base=True))
        Path(a.result).write_text(json.dumps(result))
        return

    import torch

    sides = [s for s in a.sides.split(",") if s]
    if sides[:1] != ["ours"] or len(sides) < 2 or any(s not in SIDES + EXTRA_SIDES for s in sides):
        raise SystemExit(f"--sides: ours first, then one or more of baseline, trl, ours_f32base; got {a.sides!r}")
    if "ours_f32base" in sides and a.precision != "bf16":
        raise SystemExit("--sides ours_f32base compares the frozen base's precision: it needs --precision bf16")
    if a.threads:
        torch.set_num_threads(a.threads)
    peaks = machine_peaks()
    units = peaks["bf16_units"] or "none (no amx_bf16 / avx512_bf16 in /proc/cpuinfo)"
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads; bf16 matrix units: {units}")
    print(f"matmul peaks: fp32 {peaks['matmul_gflops_float32']:.0f} GFLOP/s (2048^2), bf16 "
          f"{peaks['matmul_gflops_bfloat16']:.1f} GFLOP/s ({peaks['bf16_matmul_size']}^2)", flush=True)
    child = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--precision", a.precision,
             "--base-model", a.base_model]

    peak_dtype = "bfloat16" if a.precision == "bf16" else "float32"
    peak_n = peaks["bf16_matmul_size"] if a.precision == "bf16" else 2048

    def one(side: str, rep: int) -> dict[str, Any]:
        print(f"[{rep + 1}/{a.repeats}] {side}: {a.steps} steps of {a.batch_size} ({a.precision}) ...", flush=True)
        before = matmul_gflops(peak_dtype, peak_n)
        r = run_side(str(Path(__file__).resolve()), side, child, a.threads)
        # the peak read just before and just after this side: a shared VM's matmul rate drifts (2026-12-01: the
        # bf16 2048^2 figure read 650 to 2,400 GFLOP/s within minutes), so a share of one reading at the start
        # says more about the VM than about the side
        r["peak_gflops_around"] = (before + matmul_gflops(peak_dtype, peak_n)) / 2
        print(f"    {r['train_seconds']:.1f} s training, {r['tokens'] / r['train_seconds']:.0f} tokens/s, final loss "
              f"{r['final_loss']:.5f}", flush=True)
        return r

    rounds = alternate(a.repeats, sides, one)
    tol = LOSS_TOLERANCE[a.precision]
    for rnd in rounds:
        ours = rnd["ours"]
        if ours["tokens_reported"] not in range(ours["tokens"] - 2, ours["tokens"] + 3):
            print(f"warning: lmtailor reports {ours['tokens_reported']} tokens, the groups hold {ours['tokens']}",
                  file=sys.stderr)
        rnd["ratio"], rnd["loss_diff"] = {}, {}
        for side in sides[1:]:
            other = rnd[side]
            if other["tokens"] != ours["tokens"]:
                raise SystemExit(f"{side} saw {other['tokens']} tokens, ours {ours['tokens']}")
            rnd["loss_diff"][side] = diff = abs(ours["final_loss"] - other["final_loss"])
            if diff > tol:
                raise SystemExit(f"final losses differ by {diff:.2e} (ours {ours['final_loss']:.6f}, {side} "
                                 f"{other['final_loss']:.6f}), more than the tolerance {tol:g}: the sides do not "
                                 "train alike")
            rnd["ratio"][side] = other["train_seconds"] / ours["train_seconds"]  # same tokens: the speed ratio

    # model FLOPs (the same for every side) as a share of the peak of the precision trained in
    params = next((r[s]["params"] for r in rounds for s in sides[1:] if "params" in r[s]), None)
    first = rounds[0]["ours"]
    tokens, padded, supervised = first["tokens"], first["padded_tokens"], first["supervised_tokens"]
    peak = peaks["matmul_gflops_bfloat16" if a.precision == "bf16" else "matmul_gflops_float32"] * 1e9
    flops = model_flops(params, tokens, supervised) if params else None
    tps = {s: median(r[s]["tokens"] / r[s]["train_seconds"] for r in rounds) for s in sides}
    secs = {s: median(r[s]["train_seconds"] for r in rounds) for s in sides}
    rss = {s: max(r[s]["peak_rss_bytes"] for r in rounds) for s in sides}
    share = {s: flops / secs[s] / peak for s in sides} if flops else {}
    share_around = {s: median(flops / r[s]["train_seconds"] / (r[s]["peak_gflops_around"] * 1e9) for r in rounds)
                    for s in sides} if flops else {}
    # the rate of the step's own matrix products, timed alone at its row count (packed rows are padded to 64)
    from lmtailor.models import load_model_config

    dtype_name = "bfloat16" if a.precision == "bf16" else "float32"
    rows = 64 * math.ceil(tokens / a.steps / 64)
    config = load_model_config(a.base_model)
    step_rate = step_matmul_gflops(linear_shapes(config), rows, dtype_name,
                                   head=(config.hidden_size, config.vocab_size, math.ceil(supervised / a.steps))
                                   ) if params else None
    step_share = {s: flops / secs[s] / (step_rate * 1e9) for s in sides} if flops and step_rate else {}
    steady = {s: median(x for r in rounds if (x := steady_seconds_per_step(r[s]["step_elapsed"])) is not None)
              if a.steps >= 3 else None for s in sides}
    table = [
        ("", *(NAMES[s] for s in sides)),
        ("non-padding tokens/s", *(f"{tps[s]:.1f}" for s in sides)),
        ("supervised tokens/s", *(f"{supervised / secs[s]:.1f}" for s in sides)),
        ("training seconds", *(f"{secs[s]:.1f}" for s in sides)),
        ("steady s/step", *(f"{steady[s]:.2f}" if steady[s] else "-" for s in sides)),
        (f"share of {a.precision} peak", *(f"{share[s]:.1%}" if share else "-" for s in sides)),
        ("share of the peak read around it", *(f"{share_around[s]:.1%}" if share_around else "-" for s in sides)),
        ("share of the step's matmul rate", *(f"{step_share[s]:.1%}" if step_share else "-" for s in sides)),
        ("peak RSS (GB)", *(f"{rss[s] / 1e9:.2f}" for s in sides)),
        ("final step loss", *(f"{rounds[0][s]['final_loss']:.5f}" for s in sides)),
    ]
    print(f"\n{a.steps} steps x {a.batch_size} examples: {tokens} tokens ({supervised} supervised); padded to the "
          f"longest in each batch: {padded} ({tokens / padded:.0%} real); {a.precision}")
    if params:
        print(f"model FLOPs (LoRA): (4 x {params['body'] / 1e6:.1f}M body + 6 x {params['lora'] / 1e6:.2f}M adapter) "
              f"per token + 4 x {params['head'] / 1e6:.1f}M head per supervised token = {flops / 1e12:.2f} TFLOP")
    if step_rate:
        print(f"the step's own matrix products timed alone ({rows} packed rows, {dtype_name}): {step_rate:.0f} "
              f"GFLOP/s, {step_rate * 1e9 / peak:.0%} of the {a.precision} peak; what is left is work outside them")
    widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]
    for row in table:
        print("  ".join(f"{c:<{widths[0]}}" if j == 0 else f"{c:>{widths[j]}}" for j, c in enumerate(row)))
    verdicts = {}
    for side in sides[1:]:
        ratio = median(r["ratio"][side] for r in rounds)
        per = ", ".join(f"{r['ratio'][side]:.2f}" for r in rounds)
        diffs = ", ".join(f"{r['loss_diff'][side]:.1e}" for r in rounds)
        if side not in RATIO_TARGETS:  # ours_f32base: what keeping the frozen base in bf16 gains
            print(f"ours / {NAMES[side]}: median {ratio:.2f} (per repeat: {per}); peak RSS {rss['ours'] / 1e9:.2f} vs "
                  f"{rss[side] / 1e9:.2f} GB; final loss |diff| {diffs}")
            continue
        verdicts[side] = ok = ratio >= RATIO_TARGETS[side] and rss["ours"] <= rss[side]
        print(f"ours / {NAMES[side]}: median {ratio:.2f} (per repeat: {per}); target >= {RATIO_TARGETS[side]} with "
              f"RSS <= its: {'meets' if ok else 'misses'}; final loss |diff| {diffs} (tolerance {tol:g})")

    out = a.out if a.out is not None else (None if a.quick else DEFAULT_OUT)
    if out is None:
        return
    result = {
        "benchmark": "finetune_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "measured on a shared machine: ratios within one run are comparable, absolute figures vary",
        "setup": {"base_model": a.base_model, "data": "catalog:shell-commands", "method": "lora",
                  "lora": "r=8 alpha=16 q/k/v/o dropout 0", "steps": a.steps, "batch_size": a.batch_size,
                  "max_length": 256, "lr": 2e-4, "scheduler": "linear", "precision": a.precision,
                  "baseline": "transformers Trainer + peft, DataCollatorForSeq2Seq pad to longest, sequential sampler",
                  "trl": "trl SFTTrainer + peft, pre-tokenized, padding_free=True (one flattened row per step), "
                         "packing=False, sequential sampler",
                  "ours": "lmtailor.train.train, packing=true (pack_length 1024)",
                  "ours_f32base": "the same, its frozen base kept in float32 under bf16 autocast (before 2026-12-01)",
                  "bf16": "autocast; the frozen base in bf16 on every side, the adapters in float32"},
        "tokens": tokens, "padded_tokens": padded, "supervised_tokens": supervised,
        "machine_peaks": peaks, "params": params, "model_flops": flops, "share_of_peak": share,
        "share_of_peak_around_run": share_around,
        "step_matmul": {"rows": rows, "gflops": step_rate, "share_of_peak": step_rate * 1e9 / peak if step_rate
                        else None, "note": "the step's own matrix products (every frozen linear's forward and input "
                        "gradient at the step's packed row count, the head at its supervised rows) timed alone"},
        "share_of_step_matmul_rate": step_share,
        "tokens_per_s": tps, "peak_rss_bytes": rss,
        "ratio": {s: median(r["ratio"][s] for r in rounds) for s in sides[1:]},
        "ratio_per_repeat": {s: [r["ratio"][s] for r in rounds] for s in sides[1:]},
        "ratio_targets": RATIO_TARGETS, "meets_target": verdicts, "loss_tolerance": tol,
        "final_losses": {s: rounds[0][s]["final_loss"] for s in sides},
        "load_average_at_end": os.getloadavg(),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": first["torch_threads"],
                    "python": platform.python_version(), "torch": torch.__version__},
        "runs": rounds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
