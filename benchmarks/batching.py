"""Padding waste in classification batches: group_by_length off and on, same steps, same data.

Classification batches are padded to their longest text, not packed. Short texts of mixed lengths (tweets, SMS,
questions) waste much of each step on padding; group_by_length sorts examples by length within seeded groups of
64 batches before cutting them into batches. This runs `objective: classify` with LoRA on catalog data sets for
the same number of steps both ways and reports seconds per step, real tokens per second, and validation macro-F1
after those steps (the same examples are seen, in other batches).

    python benchmarks/batching.py --steps 60            # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "batching.json"


def run(dataset: str, grouped: bool, steps: int, work: Path) -> dict[str, Any]:
    from lmtailor.config import build_config
    from lmtailor.train import train

    cfg = build_config({"name": f"{dataset}-{grouped}", "output_dir": str(work / f"{dataset}-{int(grouped)}"),
                        "overwrite": True, "objective": "classify", "method": "lora", "max_steps": steps,
                        "eval_every": 0, "group_by_length": grouped, "eval": {"before_after": False},
                        "data": {"path": f"catalog:{dataset}", "format": "labeled", "val_size": 300}},
                       "batching benchmark")
    summary = train(cfg, progress=False)
    return {"dataset": dataset, "group_by_length": grouped, "steps": summary["steps"],
            "train_seconds": round(summary["train_seconds"], 1),
            "s_per_step": round(summary["train_seconds"] / max(1, summary["steps"]), 3),
            "tokens_per_s": round(summary["train_tokens_per_s"], 1),
            "val_macro_f1": summary["after"].get("macro_f1"), "val_accuracy": summary["after"].get("accuracy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--datasets", nargs="*", default=["sms-spam", "tweet-sentiment", "trec-questions"])
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmtailor-batching-"))
    rows = []
    for name in a.datasets:
        pair = [run(name, grouped, a.steps, work) for grouped in (False, True)]
        rows += pair
        off, on = pair
        print(f"{name}: {off['s_per_step']:.2f} -> {on['s_per_step']:.2f} s/step "
              f"({off['s_per_step'] / on['s_per_step']:.2f}x); val macro-F1 after {a.steps} steps "
              f"{off['val_macro_f1']:.3f} -> {on['val_macro_f1']:.3f}", flush=True)
    import torch

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "batching", "steps": a.steps, "rows": rows,
        "speedup": {r["dataset"]: round(r["s_per_step"] / s["s_per_step"], 2)
                    for r, s in zip(rows[::2], rows[1::2], strict=True)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": dt.date.today().isoformat()}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
