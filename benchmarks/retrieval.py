"""Retrieved examples in the prompt (data.retrieved_examples = 0, 1, 2) on the main job at one time budget.

Each run is `lmtailor train configs/quickstart.yaml data.retrieved_examples=K budget=B` on the same 60 held-out pairs
(the recipe's split): chrF, exact match and looping share of the generated commands, against the nearest-answer
baseline of the same evaluation. Retrieval makes every prompt longer, so at one budget it trains fewer steps; the
question is whether seeing the nearest solved example is worth them.

    python benchmarks/retrieval.py --budget 5m          # about 25 minutes on 2 CPU cores
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
OUT = ROOT / "benchmarks" / "results" / "retrieval.json"


def run(k: int, budget: str, work: Path) -> dict[str, Any]:
    from lmtailor.config import load_config
    from lmtailor.train import train

    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"),
                      [f"data.retrieved_examples={k}", f"budget={budget}", f"name=retrieval-k{k}",
                       f"output_dir={work / f'k{k}'}", "overwrite=true"])
    summary = train(cfg, progress=False)
    after, before = summary["after"], summary["before"]
    return {"retrieved_examples": k, "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "train_tokens": summary["data"]["train_tokens"],
            "chrf_before": before.get("chrf"), "chrf_after": after.get("chrf"),
            "exact_match_after": after.get("exact_match"), "looping_after": after.get("looping"),
            "nearest_answer_chrf": (summary["baselines"].get("nearest_answer") or {}).get("chrf")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="5m")
    p.add_argument("--ks", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmtailor-retrieval-"))
    rows = []
    for k in a.ks:
        rows.append(run(k, a.budget, work))
        r = rows[-1]
        print(f"k={k}: {r['steps']} steps in {r['train_seconds']:.0f} s; chrF {r['chrf_before']:.1f} -> "
              f"{r['chrf_after']:.1f} (nearest answer {r['nearest_answer_chrf']:.1f}); exact match "
              f"{r['exact_match_after']:.1%}")
    import torch

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "retrieval", "budget": a.budget,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
