"""Crash safety: SIGKILL the real `lmtailor train` CLI at random points, then resume to identical weights.

One run trains uninterrupted (the reference, in parallel). Another is killed ten times: once at a random moment
(usually while it starts up), then alternately while a checkpoint is being written (the moment its hidden
`.step-*.tmp` staging folder appears) and at a random moment after a new checkpoint landed, each time resumed
with `resume=true`. After every kill each visible checkpoint folder must be complete and loadable; at the end
the resumed run's weights must equal the reference's, tensor for tensor.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

STEPS = 30
SAVE_EVERY = 2
KILLS = 10
CKPT_FILES = {"trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              "rng.safetensors", "rng.json", "trainer.json"}


def _cmd(tiny: Path, data: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "lmtailor", "train", f"base_model={tiny}", f"data.path={data}", "method=full",
            f"max_steps={STEPS}", f"save_every={SAVE_EVERY}", "keep_checkpoints=3", "batch_size=4",
            "micro_batch_size=4", "lr=1e-3", "seed=7", "eval.before_after=false", "eval.generate_examples=0",
            f"output_dir={out}", f"resume={'true' if resume else 'false'}", "--no-progress"]


def _env() -> dict[str, str]:
    # One thread: the same float reduction order in every process, and no oversubscription on small CI boxes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def _visible_checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def _staging(run: Path) -> list[str]:
    root = run / "checkpoints"
    try:
        return [e.name for e in os.scandir(root) if e.name.startswith(".step-") and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _newest_step(run: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in _visible_checkpoints(run) if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def _check_complete(run: Path) -> None:
    """Every visible checkpoint folder has all its files, and each one opens."""
    from safetensors.torch import load_file

    for ckpt in _visible_checkpoints(run):
        names = {p.name for p in ckpt.iterdir()}
        assert names == CKPT_FILES, f"{ckpt.name} is incomplete: {sorted(names)}"
        for name in CKPT_FILES:
            if name.endswith(".safetensors"):
                load_file(str(ckpt / name))
            else:
                json.loads((ckpt / name).read_text())
        trainer = json.loads((ckpt / "trainer.json").read_text())
        assert trainer["step"] == int(ckpt.name.split("-")[1])


def _kill_when(proc: subprocess.Popen, run: Path, mode: str, rng: random.Random, deadline: float) -> str:
    """SIGKILL `proc` at the moment `mode` picks; returns what happened."""
    start_step = _newest_step(run)
    if mode == "startup":
        time.sleep(rng.uniform(0.2, 3.0))
    else:
        # Let one new checkpoint land first, so every kill moves the run forward.
        while _newest_step(run) < start_step + SAVE_EVERY and proc.poll() is None and time.time() < deadline:
            time.sleep(0.0005)
        if mode == "during-write":
            seen = set(_staging(run))
            while proc.poll() is None and time.time() < deadline and not (set(_staging(run)) - seen):
                time.sleep(0.0002)
        else:
            time.sleep(rng.uniform(0, 0.03))
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed"


def test_sigkill_then_resume_gives_identical_weights(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ref_dir, run = tmp_path / "ref", tmp_path / "crash"
    log = (tmp_path / "stderr.txt").open("w")
    ref = subprocess.Popen(_cmd(tiny_model, pairs_file, ref_dir, False), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=log)
    rng = random.Random(1234)
    deadline = time.time() + 240
    modes = ["startup"] + ["during-write", "random"] * ((KILLS - 1) // 2 + 1)
    killed, left_staging = 0, 0
    for mode in modes[:KILLS]:
        resume = bool(_visible_checkpoints(run))
        staging_before = set(_staging(run))
        proc = subprocess.Popen(_cmd(tiny_model, pairs_file, run, resume), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=log)
        outcome = _kill_when(proc, run, mode, rng, deadline)
        assert outcome == "killed", f"the run ended before the {mode} kill (exit {proc.returncode}): " \
            + (tmp_path / "stderr.txt").read_text()[-2000:]
        killed += 1
        left_staging += bool(set(_staging(run)) - staging_before)
        _check_complete(run)
        assert not (run / "model").exists(), "a killed run must not have a final model"
    assert killed >= KILLS
    # At least one kill landed while a checkpoint was being written (its staging folder was left behind).
    assert left_staging >= 1

    final = subprocess.run(_cmd(tiny_model, pairs_file, run, True), env=_env(), capture_output=True, text=True,
                           timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]
    assert ref.wait(timeout=240) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    _check_complete(run)
    a = load_file(str(ref_dir / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after kill + resume"
    # The history of the resumed run ends at the last step.
    assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS
