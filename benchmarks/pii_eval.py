"""Precision and recall of the PII detectors per type on the held-out faker set and the hand-written regression set.

The held-out set (tests/data/pii_eval.jsonl, written by benchmarks/make_pii_eval.py from faker in seven locales)
is the measure; the hand-written set (tests/data/pii_handwritten.jsonl) was written alongside the detectors and
only says they still do what they were built for. A predicted span counts as a true positive when it has the gold
span's type and overlaps it by at least half of their union (each gold span is matched at most once); `exact`
counts identical offsets. Each row is scanned with its locale's phone region (as a user sets
`privacy.phone_region` for their data); `--region US` scans every row with one region instead. Targets for the
regex types: recall >= 0.95, precision >= 0.90.

    python benchmarks/make_pii_eval.py     # (re)write the held-out set (needs faker: pip install -e .[dev])
    python benchmarks/pii_eval.py          # print the tables, write benchmarks/results/pii_eval.json
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
SETS = {"faker": ROOT / "tests" / "data" / "pii_eval.jsonl",
        "handwritten": ROOT / "tests" / "data" / "pii_handwritten.jsonl"}
# The hand-written set has no per-row region; it plants national numbers of these countries.
HANDWRITTEN_REGIONS = "US,GB,DE,FR"


def _valid_phone(value: str, region: str) -> bool:
    """Whether phonenumbers calls `value` a valid number of `region` (or of the country code it is written with):
    a miss of an invalid number (an unassigned area code faker made up) is the generator's, not the scanner's."""
    import phonenumbers

    for r in region.split(","):
        for v in (value, "+" + value[2:] if value.startswith("00") else value):
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(v, r)):
                    return True
            except phonenumbers.NumberParseException:
                continue
    return False


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union else 0.0


def evaluate(rows: list[dict[str, Any]], ner: bool = False, region: str | None = None) -> dict[str, Any]:
    """Per-type counts, precision, recall and F1, plus the misses and false alarms (for reading, capped).

    Args:
        rows: labeled rows ({"text", "spans", optional "region"}).
        ner: also run the NER backend.
        region: phone region(s) for every row; None uses each row's own "region" (default US).
    """
    from lmtailor.privacy.detectors import REGEX_TYPES, ScanOptions, scan

    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"gold": 0, "predicted": 0, "tp": 0, "exact": 0})
    stats["PHONE"]["missed_invalid_numbers"] = 0
    misses: list[dict[str, Any]] = []
    false_alarms: list[dict[str, Any]] = []
    options: dict[str, ScanOptions] = {}
    t0 = time.perf_counter()
    chars = 0
    for row in rows:
        text = row["text"]
        chars += len(text)
        want = region or row.get("region") or "US"
        opts = options.setdefault(want, ScanOptions.create(want))
        gold = [(s["type"], s["start"], s["end"]) for s in row["spans"]]
        pred = [(f.type, f.start, f.end, f.value) for f in scan(text, ner=ner, options=opts)]
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
                miss = {"id": row["id"], "type": g[0], "value": text[g[1]:g[2]]}
                if g[0] == "PHONE":
                    miss["valid_number"] = _valid_phone(miss["value"], want)
                    stats["PHONE"]["missed_invalid_numbers"] += not miss["valid_number"]
                misses.append(miss)
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
        if "missed_invalid_numbers" in s and s["gold"] > s["missed_invalid_numbers"]:
            per_type[t]["recall_of_valid_numbers"] = round(s["tp"] / (s["gold"] - s["missed_invalid_numbers"]), 4)
    total = {k: sum(s[k] for s in stats.values()) for k in ("gold", "predicted", "tp", "exact")}
    return {
        "snippets": len(rows), "phone_region": region or "per row", "per_type": per_type,
        "micro": {**total, "precision": round(total["tp"] / max(total["predicted"], 1), 4),
                  "recall": round(total["tp"] / max(total["gold"], 1), 4)},
        "all_targets_met": all(v["meets_target"] for v in per_type.values()),
        "chars_per_second": round(chars / max(elapsed, 1e-9)),
        "misses": misses[:60], "false_alarms": false_alarms[:60],
        "n_misses": len(misses), "n_false_alarms": len(false_alarms),
    }


def load(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def table(result: dict[str, Any]) -> str:
    lines = [f"{'type':15} {'gold':>5} {'pred':>5} {'tp':>5} {'precision':>9} {'recall':>7} {'f1':>6}  target"]
    for t, s in result["per_type"].items():
        lines.append(f"{t:15} {s['gold']:5} {s['predicted']:5} {s['tp']:5} {s['precision']:9.3f} "
                     f"{s['recall']:7.3f} {s['f1']:6.3f}  {'ok' if s['meets_target'] else 'MISSED'}")
    if "recall_of_valid_numbers" in result["per_type"].get("PHONE", {}):
        p = result["per_type"]["PHONE"]
        lines.append(f"  PHONE misses of numbers invalid in the region(s) scanned: {p['missed_invalid_numbers']}; "
                     f"recall of valid numbers {p['recall_of_valid_numbers']:.3f}")
    m = result["micro"]
    lines.append(f"{'all':15} {m['gold']:5} {m['predicted']:5} {m['tp']:5} {m['precision']:9.3f} {m['recall']:7.3f}")
    lines.append(f"{result['snippets']} snippets, phone region {result['phone_region']}, "
                 f"{result['chars_per_second']:,} chars/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pii_eval.json"))
    ap.add_argument("--region", default=None, help="one phone region for every row (default: each row's own)")
    ap.add_argument("--ner", action="store_true", help="also run the optional NER backend")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from lmtailor.io import atomic_write_json
    from lmtailor.privacy.scrub import SCRUBBER_VERSION

    faker_rows = load(SETS["faker"])
    results = {
        "faker": evaluate(faker_rows, ner=a.ner, region=a.region),
        "faker_region_US": evaluate(faker_rows, ner=a.ner, region="US"),
        "handwritten": evaluate(load(SETS["handwritten"]), ner=a.ner, region=a.region or HANDWRITTEN_REGIONS),
    }
    version = (SETS["faker"].with_suffix(".faker-version")).read_text().strip()
    out = {"scrubber_version": SCRUBBER_VERSION, "faker_version": version,
           "data": {k: str(p.relative_to(ROOT)) for k, p in SETS.items()}, **results}
    atomic_write_json(a.out, out)
    for name, result in results.items():
        print(f"== {name}\n{table(result)}\n")
    print(f"wrote {a.out}")
    return 0 if results["faker"]["all_targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
