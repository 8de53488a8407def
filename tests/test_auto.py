"""`lmtailor auto`: objective from the data, a successive-halving search on a dev split, the winner trained and
reported against the baselines, all within the budget."""

from __future__ import annotations

import json
import time

from lmtailor.cli import main

WORDS = {"sport": ["goal", "match", "league", "coach"], "money": ["bank", "loan", "interest", "credit"]}


def test_auto_classifies_a_labeled_file_within_its_budget(tiny_model, tmp_path, capsys):
    rows = [{"text": f"the {WORDS[lab][i % 4]} story number {i}", "label": lab}
            for i in range(60) for lab in ("sport", "money")]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "auto"
    t0 = time.monotonic()
    assert main(["auto", str(data), "--budget", "150s", "--trials", "2", "--base-model", str(tiny_model),
                 "--out", str(out)]) == 0
    elapsed = time.monotonic() - t0
    report = json.loads((out / "auto.json").read_text())
    assert report["format"] == "labeled" and report["objective"] == "classify"
    assert 1 <= len(report["candidates"]) <= 2 and set(report["best_params"]) <= {"lr", "lora.r", "epochs"}
    # the test split was held out from the search: trials trained on train.jsonl only
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    test = (out / "data" / "test.jsonl").read_text().splitlines()
    assert not set(train) & set(test) and len(train) + len(test) == 120
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"} and "macro_f1" in report["after"]
    assert report["verdict"] and (out / "final" / "model").is_dir()
    md = (out / "auto.md").read_text()
    assert "objective **classify**" in md and "tfidf_logreg" in md and "| 0 |" in md
    assert elapsed < 150 * 1.5  # the budget covers training; loading and evaluation add a little
