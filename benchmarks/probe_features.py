"""The linear probe's forward passes (classify.head_init=probe) in float32 and under bf16 autocast, on long pages.

A head fitted as a linear probe reads the frozen model's mean-pooled features of every training text before the
first step, and a budget pays for that pass. It ran in float32 even where the steps ran under bf16 autocast; it
now runs in the steps' precision (train.py). Each side here is a real `lmtailor train` of the bundled model on
catalog:python-docs-sections (pages cut at 512 tokens) with mixed_precision=no or bf16, in its own process
(Accelerate fixes the precision per process), and one optimizer step, so that what is timed is the probe: the
seconds of its forward passes and fit, its cross-validated macro-F1, and the probe-only head's ("before",
adapter off) macro-F1 and accuracy on the validation pages.

    python benchmarks/probe_features.py                 # about 8 minutes on 2 cores with bf16 units

On a CPU without bf16 units, bf16 autocast is emulated and slower; the figures then say so.
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

from benchlib import cpu_model, run_side

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "probe_features.json"


def side(mode: str, work: Path, dataset: str, max_length: int) -> dict[str, Any]:
    from lmtailor.cli import main

    run = work / f"probe-{mode}"
    args = ["train", "objective=classify", "method=lora", f"data.path=catalog:{dataset}", "data.format=labeled",
            "data.val_size=49", f"max_length={max_length}", "max_steps=1", "classify.pooling=mean",
            "classify.head_init=probe", f"mixed_precision={mode}", f"output_dir={run}", "overwrite=true",
            "--no-progress"]
    assert main(args) == 0
    m = json.loads((run / "metrics.json").read_text())
    probe = m["head_probe"]
    return {"mixed_precision": mode, "features_dtype": probe["features_dtype"], "probe_seconds": probe["seconds"],
            "train_texts": probe["examples"], "C": probe["C"], "cv_macro_f1": probe["cv_macro_f1"],
            "val_macro_f1": m["before"]["macro_f1"], "val_accuracy": m["before"]["accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="python-docs-sections")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        a.result.write_text(json.dumps(side(a.side, a.work, a.dataset, a.max_length)))
        return
    from lmtailor.memory import cpu_bf16_units

    work = Path(tempfile.mkdtemp(prefix="lmtailor-probe-"))
    extra = ["--work", str(work), "--dataset", a.dataset, "--max-length", str(a.max_length)]
    rows = {mode: run_side(__file__, mode, extra) for mode in ("no", "bf16")}
    fp32, bf16 = rows["no"], rows["bf16"]
    result = {"benchmark": "probe_features", "dataset": a.dataset, "max_length": a.max_length, "rows": rows,
              "speedup_bf16": round(fp32["probe_seconds"] / max(1e-9, bf16["probe_seconds"]), 2),
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16_units": cpu_bf16_units(),
                          "processor": platform.processor() or platform.machine()},
              "date": dt.date.today().isoformat()}
    for mode, r in rows.items():
        print(f"{mode:>4}: {r['features_dtype']} features, probe {r['probe_seconds']:.0f} s on {r['train_texts']} "
              f"texts, C={r['C']}, validation macro-F1 {r['val_macro_f1']:.3f}, accuracy {r['val_accuracy']:.3f}")
    print(f"bf16 autocast: {result['speedup_bf16']}x the float32 probe's speed")
    from lmtailor.io import atomic_write_text

    atomic_write_text(a.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
