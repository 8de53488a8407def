"""Precision and recall of the PII detectors per type on the labeled set tests/data/pii_eval.jsonl.

A predicted span counts as a true positive when it has the gold span's type and overlaps it by at least half of
their union (each gold span is matched at most once); `exact` counts identical offsets. Targets for the regex
types: recall >= 0.95, precision >= 0.90.

    python benchmarks/make_pii_eval.py     # (re)write the labeled set
    python benchmarks/pii_eval.py          # print the table, write benchmarks/results/pii_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECALL_TARGET, PRECISION_TARGET = 0.95, 0.90


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union else 0.0


def evaluate(rows: list[dict[str, Any]], ner: bool = False) -> dict[str, Any]:
    """Per-type counts, precision, recall and F1, plus the misses and false alarms (for reading, capped)."""
    from lmtailor.privacy.detectors import REGEX_TYPES, scan

    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"gold": 0, "predicted": 0, "tp": 0, "exact": 0})
    misses: list[dict[str, Any]] = []
    false_alarms: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    chars = 0
    for row in rows:
        text = row["text"]
        chars += len(text)
        gold = [(s["type"], s["start"], s["end"]) for s in row["spans"]]
        pred = [(f.type, f.start, f.end, f.value) for f in scan(text, ner=ner)]
        used: set[int] = set()
        for g in gold:
            stats[g[0]]["gold"] += 1
        for p in pred:
            stats[p[0]]["predicted"] += 1
            match = next((i for i, g in enumerate(gold) if i not in used and g[0] == p[0]
                          and _overlap((g[1], g[2]), (p[1], p[2])) >= 0.5), None)
            if match is None:
                false_alarms.append({"id": row["id"], "type": p[0], "value": p[3]})
                continue
            used.add(match)
            stats[p[0]]["tp"] += 1
            stats[p[0]]["exact"] += (gold[match][1], gold[match][2]) == (p[1], p[2])
        for i, g in enumerate(gold):
            if i not in used:
                misses.append({"id": row["id"], "type": g[0], "value": text[g[1]:g[2]]})
    elapsed = time.perf_counter() - t0
    per_type = {}
    for t in sorted(stats):
        s = stats[t]
        precision = s["tp"] / s["predicted"] if s["predicted"] else (1.0 if s["gold"] == 0 else 0.0)
        recall = s["tp"] / s["gold"] if s["gold"] else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        ok = t not in REGEX_TYPES or (recall >= RECALL_TARGET and precision >= PRECISION_TARGET)
        per_type[t] = {**s, "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                       "meets_target": ok}
    total = {k: sum(s[k] for s in stats.values()) for k in ("gold", "predicted", "tp", "exact")}
    return {
        "snippets": len(rows), "per_type": per_type,
        "micro": {**total, "precision": round(total["tp"] / max(total["predicted"], 1), 4),
                  "recall": round(total["tp"] / max(total["gold"], 1), 4)},
        "all_targets_met": all(v["meets_target"] for v in per_type.values()),
        "chars_per_second": round(chars / max(elapsed, 1e-9)),
        "misses": misses[:50], "false_alarms": false_alarms[:50],
        "n_misses": len(misses), "n_false_alarms": len(false_alarms),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "tests" / "data" / "pii_eval.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pii_eval.json"))
    ap.add_argument("--ner", action="store_true", help="also run the optional NER backend")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    result = evaluate(rows, ner=a.ner)
    from lmtailor.io import atomic_write_json
    from lmtailor.privacy.scrub import SCRUBBER_VERSION

    result = {"scrubber_version": SCRUBBER_VERSION, "data": str(Path(a.data).relative_to(ROOT))
              if Path(a.data).resolve().is_relative_to(ROOT) else a.data, **result}
    atomic_write_json(a.out, result)
    print(f"{'type':15} {'gold':>5} {'pred':>5} {'tp':>5} {'precision':>9} {'recall':>7} {'f1':>6}  target")
    for t, s in result["per_type"].items():
        print(f"{t:15} {s['gold']:5} {s['predicted']:5} {s['tp']:5} {s['precision']:9.3f} {s['recall']:7.3f} "
              f"{s['f1']:6.3f}  {'ok' if s['meets_target'] else 'MISSED'}")
    m = result["micro"]
    print(f"{'all':15} {m['gold']:5} {m['predicted']:5} {m['tp']:5} {m['precision']:9.3f} {m['recall']:7.3f}")
    print(f"{result['snippets']} snippets, {result['chars_per_second']:,} chars/s; wrote {a.out}")
    return 0 if result["all_targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
