"""DPO with LoRA throughput: lmtailor's loop (each pair one packed row, prompt computed once) vs TRL's `DPOTrainer`.

Both sides train the bundled SmolLM2-135M-Instruct with the same LoRA (r=8, alpha=16, q/k/v/o, no dropout) on the
same preference pairs made from `catalog:shell-commands` (chosen: the reference command; rejected: the next
record's command, a plausible wrong answer), the same pairs in the same step groups (`lmtailor.loop.batch_at`), the
same token sequences (`lmtailor.render`; TRL gets them pre-tokenized, its prompt being the tokens before the first
supervised one), sigmoid loss with beta 0.1, the reference being the model with its adapter disabled on both sides,
batch 8 pairs, AdamW lr 5e-5 linear, clipping 1.0, the same precision and the same number of optimizer steps. TRL
runs in its fastest correct configuration on CPU: no gradient checkpointing (DPOConfig's default is on), chosen and
rejected rows padded to the longest in the batch (its `padding_free` is unavailable since its DPO refactor: it
warns and pads), its fused LM head (log-probs in chunks, no full logits). Only the training steps are timed; each
side runs in its own subprocess so peak RSS is per side. Equal final losses are asserted (LOSS_TOLERANCE).

    python benchmarks/preference_throughput.py             # 3 alternating repeats, medians -> benchmarks/results/
    python benchmarks/preference_throughput.py --quick     # 3 steps, 1 repeat, a smoke test (writes nothing)

Target: ours / TRL pairs/s >= 2.0 with peak RSS no higher than TRL's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
    median,
    peak_rss_bytes,
    run_side,
    settle_arguments,
    side_arguments,
    steady_seconds_per_step,
    step_clock,
    step_items,
)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "preference_throughput.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
RATIO_TARGET = 2.0
# Largest |final loss ours - final loss TRL| accepted: same pairs, same initial adapter, same steps; the sides differ
# only in summation order (packed vs padded rows, fused vs plain LM head), which drifts a little over the steps.
LOSS_TOLERANCE = {"fp32": 2e-3, "bf16": 3e-2}
SIDES = ["ours", "trl"]


def write_pairs(path: Path) -> int:
    """Preference pairs from the shell-commands catalog: chosen the record's command, rejected the next record's
    (skipping equal ones). Returns the number of pairs."""
    from lmtailor.data.validate import load_examples

    examples = load_examples("catalog:shell-commands")
    answers = [ex.messages[-1]["content"] for ex in examples if ex.messages]
    rows = []
    for i, ex in enumerate(examples):
        assert ex.messages is not None and ex.messages[-1]["role"] == "assistant"
        other = next(answers[(i + k) % len(answers)] for k in range(1, len(answers))
                     if answers[(i + k) % len(answers)] != answers[i])
        rows.append({"messages": ex.messages[:-1], "chosen": answers[i], "rejected": other})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def run_config(a: argparse.Namespace, output_dir: str, data: Path) -> Any:
    """The recipe both sides follow (TRL reads its settings from it too)."""
    from lmtailor.config import build_config

    precision = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "auto", "mixed_precision": "bf16"}}[a.precision]
    return build_config({
        "name": "bench-preference-throughput", "output_dir": output_dir, "overwrite": True,
        "base_model": a.base_model, "objective": "dpo", "dpo": {"beta": 0.1}, "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"path": str(data), "format": "preference", "val_size": 0},
        "max_length": 256, "packing": True, "share_prefix": True,
        "max_steps": a.steps, "batch_size": a.batch_size, "micro_batch_size": a.batch_size,
        "lr": 5e-5, "scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        **precision, "seed": 42, "eval_every": 0, "save_every": 0,
        "eval": {"before_after": False, "generate_examples": 0, "samples": 0},
    }, source="benchmark")


def counts(groups: list[list[Any]]) -> dict[str, int]:
    """pairs; tokens of the packed rows (prompt once); tokens of the unpacked rows (prompt twice), padded to the
    longest of each batch as TRL feeds them."""
    unpacked = [[len(p.chosen.input_ids), len(p.rejected.input_ids)] for g in groups for p in g]
    return {
        "pairs": sum(len(g) for g in groups),
        "packed_tokens": sum(len(p.input_ids) for g in groups for p in g),
        "unpacked_tokens": sum(sum(u) for u in unpacked),
        "padded_tokens": sum(2 * len(g) * max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in g)
                             for g in groups),
    }


# ---- side (a): lmtailor ----------------------------------------------------------------------------------------

def side_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lmtailor.loop import item_tokens
    from lmtailor.train import train

    with tempfile.TemporaryDirectory(prefix="bench-pref-ours-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data)
        cfg = run_config(a, str(Path(tmp) / "run"), data)
        summary = train(cfg, progress=False)
        history = [json.loads(line) for line in (Path(tmp) / "run" / "history.jsonl").read_text().splitlines()]
        _, groups = step_items(cfg)
    # history records cumulative tokens/s after each step: elapsed = tokens so far / tokens_per_s
    cum, step_elapsed = 0, []
    for rec, g in zip(history, groups, strict=True):
        cum += sum(item_tokens(p) for p in g)
        step_elapsed.append(cum / rec["tokens_per_s"])
    return {"train_seconds": float(summary["train_seconds"]), "step_elapsed": step_elapsed, **counts(groups),
            "losses": [r["loss"] for r in history], "final_loss": summary["final_train_loss"],
            "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads()}


# ---- side (b): TRL DPOTrainer + peft ---------------------------------------------------------------------------

def trl_rows(groups: list[list[Any]]) -> list[dict[str, Any]]:
    """TRL's pre-tokenized columns for each pair, in step order: the prompt is the tokens before the first
    supervised one; a completion ends at its last supervised token (later template tokens take no loss and, the
    model being causal, change nothing before them)."""
    from lmtailor.data.example import IGNORE

    def split(seq: Any) -> tuple[list[int], list[int]]:
        sup = [i for i, x in enumerate(seq.labels) if x != IGNORE]
        first, last = sup[0], sup[-1]
        if len(sup) != last - first + 1:
            raise SystemExit(f"{seq.source}: the answer's supervised tokens are not contiguous")
        return seq.input_ids[:first], seq.input_ids[first:last + 1]

    rows = []
    for g in groups:
        for pair in g:
            prompt, chosen = split(pair.chosen)
            prompt_r, rejected = split(pair.rejected)
            if prompt != prompt_r:
                raise SystemExit(f"{pair.chosen.source}: chosen and rejected have different prompts")
            rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def side_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lmtailor.models import load_pretrained

    class PreTokenized(DPOTrainer):  # type: ignore[misc]
        """DPOTrainer fed lmtailor's token sequences: its own tokenization (outside the timed steps) is skipped."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kw: Any) -> Any:
            return dataset

    with tempfile.TemporaryDirectory(prefix="bench-pref-trl-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data)
        cfg = run_config(a, str(Path(tmp) / "run"), data)
        tok, groups = step_items(cfg)
        rows = trl_rows(groups)
        model = load_pretrained(cfg.base_model, dtype=torch.float32)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
        clock = step_clock()
        args = DPOConfig(
            output_dir=tmp, max_steps=a.steps, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
            learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            seed=cfg.seed, train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1,
            eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            bf16=a.precision == "bf16", fp16=False, gradient_checkpointing=False,
            beta=cfg.dpo.beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
        )
        # DPOTrainer seeds and then attaches the adapter, as lmtailor does: the same initial LoRA weights
        trainer = PreTokenized(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=lora, callbacks=[clock])
        trainer.train()
    return {"train_seconds": clock.t1 - clock.t0, "step_elapsed": clock.step_elapsed, **counts(groups),
            "losses": clock.losses, "final_loss": clock.losses[-1] if clock.losses else None,
            "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads()}


# ---- driver ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side_arguments(p, 6, "a full run of 3 x 2 sides takes about 8 minutes", "pairs", DEFAULT_MODEL, DEFAULT_OUT,
                   ROOT)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = settle_arguments(p.parse_args(argv))

    if a.side:  # child process: one side, result to a JSON file
        result = (side_ours if a.side == "ours" else side_trl)(a)
        Path(a.result).write_text(json.dumps(result))
        return

    import torch

    child = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--precision", a.precision,
             "--base-model", a.base_model]

    def one(side: str, rep: int) -> dict[str, Any]:
        print(f"[{rep + 1}/{a.repeats}] {side}: {a.steps} steps of {a.batch_size} pairs ({a.precision}) ...",
              flush=True)
        r = run_side(str(Path(__file__).resolve()), side, child, a.threads)
        print(f"    {r['train_seconds']:.1f} s training, {r['pairs'] / r['train_seconds']:.2f} pairs/s, "
              f"final loss {r['final_loss']:.5f}", flush=True)
        return r

    rounds = alternate(a.repeats, SIDES, one)
    tol = LOSS_TOLERANCE[a.precision]
    for rnd in rounds:
        ours, trl = rnd["ours"], rnd["trl"]
        if ours["pairs"] != trl["pairs"] or ours["unpacked_tokens"] != trl["unpacked_tokens"]:
            raise SystemExit(f"the sides saw different data: {ours['pairs']} vs {trl['pairs']} pairs")
        if len(ours["losses"]) != len(trl["losses"]):
            raise SystemExit(f"the sides logged {len(ours['losses'])} vs {len(trl['losses'])} step losses")
        rnd["loss_diff"] = abs(ours["final_loss"] - trl["final_loss"])
        rnd["max_step_loss_diff"] = max(abs(x - y) for x, y in zip(ours["losses"], trl["losses"], strict=True))
        if rnd["loss_diff"] > tol:
            raise SystemExit(f"final losses differ by {rnd['loss_diff']:.2e} (ours {ours['final_loss']:.6f}, TRL "
                             f"{trl['final_loss']:.6f}), more than the tolerance {tol:g}: the sides do not train alike")
        rnd["ratio"] = (ours["pairs"] / ours["train_seconds"]) / (trl["pairs"] / trl["train_seconds"])

    first = rounds[0]["ours"]
    pairs_s = {s: median(r[s]["pairs"] / r[s]["train_seconds"] for r in rounds) for s in SIDES}
    rss = {s: max(r[s]["peak_rss_bytes"] for r in rounds) for s in SIDES}
    ratio = median(r["ratio"] for r in rounds)
    steady = {s: median(x for r in rounds if (x := steady_seconds_per_step(r[s]["step_elapsed"])) is not None)
              if a.steps >= 3 else None for s in SIDES}
    table = [
        ("", "lmtailor (packed pairs)", "TRL DPOTrainer + peft"),
        ("pairs/s", f"{pairs_s['ours']:.2f}", f"{pairs_s['trl']:.2f}"),
        ("training seconds", f"{median(r['ours']['train_seconds'] for r in rounds):.1f}",
         f"{median(r['trl']['train_seconds'] for r in rounds):.1f}"),
        ("steady s/step", *(f"{steady[s]:.2f}" if steady[s] else "-" for s in SIDES)),
        ("peak RSS (GB)", f"{rss['ours'] / 1e9:.2f}", f"{rss['trl'] / 1e9:.2f}"),
        ("final step loss", f"{first['final_loss']:.5f}", f"{rounds[0]['trl']['final_loss']:.5f}"),
    ]
    print(f"\n{a.steps} steps x {a.batch_size} pairs = {first['pairs']} pairs ({a.precision}); tokens fed: lmtailor "
          f"{first['packed_tokens']} (prompt once per pair), TRL {first['padded_tokens']} padded "
          f"({first['unpacked_tokens']} non-padding)")
    w0, w1 = max(len(r[0]) for r in table), max(len(r[1]) for r in table)
    for row in table:
        print(f"{row[0]:<{w0}}  {row[1]:>{w1}}  {row[2]:>22}")
    per = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
    diffs = ", ".join(f"{r['loss_diff']:.1e}" for r in rounds)
    verdict = "meets" if ratio >= RATIO_TARGET and rss["ours"] <= rss["trl"] else "misses"
    print(f"final loss |ours - TRL| per repeat: {diffs} (tolerance {tol:g})")
    print(f"ratio (pairs/s, ours / TRL): median {ratio:.2f} (per repeat: {per}); target >= {RATIO_TARGET} with RSS "
          f"<= TRL: {verdict}")

    out = a.out if a.out is not None else (None if a.quick else DEFAULT_OUT)
    if out is None:
        return
    import trl

    result = {
        "benchmark": "preference_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "measured on a shared machine: ratios within one run are comparable, absolute figures vary",
        "setup": {"base_model": a.base_model, "data": "catalog:shell-commands pairs (rejected: next record's answer)",
                  "objective": "dpo sigmoid, beta 0.1, reference = adapter disabled", "method": "lora",
                  "lora": "r=8 alpha=16 q/k/v/o dropout 0", "steps": a.steps, "batch_size": a.batch_size,
                  "max_length": 256, "lr": 5e-5, "scheduler": "linear", "precision": a.precision,
                  "trl": f"trl {trl.__version__} DPOTrainer + peft, pre-tokenized, padded to longest, no gradient "
                         "checkpointing, sequential sampler",
                  "ours": "lmtailor.train.train, packing=true, share_prefix=true (one row per pair)"},
        **{k: first[k] for k in ("pairs", "packed_tokens", "unpacked_tokens", "padded_tokens")},
        "ours_pairs_per_s": pairs_s["ours"], "trl_pairs_per_s": pairs_s["trl"],
        "ratio": ratio, "ratio_per_repeat": [r["ratio"] for r in rounds], "ratio_target": RATIO_TARGET,
        "ours_peak_rss_bytes": rss["ours"], "trl_peak_rss_bytes": rss["trl"],
        "loss_tolerance": tol, "final_loss_diff_per_repeat": [r["loss_diff"] for r in rounds],
        "meets_target": verdict == "meets", "load_average_at_end": os.getloadavg(),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": first["torch_threads"],
                    "python": platform.python_version(), "torch": torch.__version__},
        "runs": rounds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
