"""Weights & Biases (offline) and trackio through Accelerate's trackers write their local files; the run folder's
trackers.json records which trackers were used and where."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAIRS

FAST = ["max_steps=3", "batch_size=4", "micro_batch_size=2", "data.val_size=3", "eval_every=2",
        "eval.before_after=false", "--no-progress"]


def _run(tiny_model: Path, tmp_path: Path, tracker: str, env: dict[str, str]) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    run = tmp_path / "run"
    # a fresh process: both trackers read their folder settings once, on import
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    proc = subprocess.run([sys.executable, "-m", "lmtailor", "train", f"base_model={tiny_model}", f"data.path={data}",
                           f"output_dir={run}", "name=trk", f"report_to=[tensorboard,{tracker}]", *FAST],
                          capture_output=True, text=True, env={**clean, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "trackers.json").read_text())
    assert record["report_to"] == ["tensorboard", tracker]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    return run


def test_wandb_offline_writes_its_run_files(tiny_model, tmp_path):
    pytest.importorskip("wandb")
    run = _run(tiny_model, tmp_path, "wandb", {})
    record = json.loads((run / "trackers.json").read_text())
    assert record["where"]["wandb"] == f"offline in {run}"
    [offline] = (run / "wandb").glob("offline-run-*")  # what `wandb sync` uploads later
    assert list(offline.glob("run-*.wandb"))


def test_trackio_writes_its_local_database(tiny_model, tmp_path):
    pytest.importorskip("trackio")
    run = _run(tiny_model, tmp_path, "trackio", {})
    record = json.loads((run / "trackers.json").read_text())
    assert record["where"]["trackio"] == str(run / "trackio")
    assert [p for p in (run / "trackio").rglob("*") if p.is_file()]
