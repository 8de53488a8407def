"""Crash safety: SIGKILL the real `lmtailor train` CLI at random points, then resume to identical weights.

One run trains uninterrupted (the reference); two others, in parallel with it, are killed five times each: at a
random moment (usually during start-up), while a checkpoint is being written (the moment its hidden `.step-*.tmp`
staging folder appears), or at a random moment after a new checkpoint landed, each time resumed with
`resume=true`. After every kill each visible checkpoint folder must be complete and loadable; at the end
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
CKPT_FILES = {"trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "manifest.json",
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


def _crash_chain(tiny: Path, data: Path, run: Path, modes: list[str], seed: int, log: Path) -> tuple[int, int]:
    """Start, kill and resume one run once per mode; returns (kills, kills that left a staging folder)."""
    rng = random.Random(seed)
    deadline = time.time() + 240
    killed = left_staging = 0
    with log.open("w") as err:
        for mode in modes:
            resume = bool(_visible_checkpoints(run))
            staging_before = set(_staging(run))
            proc = subprocess.Popen(_cmd(tiny, data, run, resume), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
            outcome = _kill_when(proc, run, mode, rng, deadline)
            assert outcome == "killed", f"{run.name}: the run ended before the {mode} kill " \
                f"(exit {proc.returncode}): {log.read_text()[-2000:]}"
            killed += 1
            left_staging += bool(set(_staging(run)) - staging_before)
            _check_complete(run)
            assert not (run / "model").exists(), "a killed run must not have a final model"
    final = subprocess.run(_cmd(tiny, data, run, True), env=_env(), capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]
    _check_complete(run)
    return killed, left_staging


def test_sigkill_then_resume_gives_identical_weights(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Two runs are killed five times each, in parallel with the reference run (process start-up dominates)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors.torch import load_file

    ref_dir = tmp_path / "ref"
    chains = {tmp_path / "crash-a": ["startup", "during-write", "random", "during-write", "random"],
              tmp_path / "crash-b": ["during-write", "random", "during-write", "random", "during-write"]}
    with (tmp_path / "ref.log").open("w") as err:
        ref = subprocess.Popen(_cmd(tiny_model, pairs_file, ref_dir, False), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=err)
        with ThreadPoolExecutor(len(chains)) as pool:
            futures = [pool.submit(_crash_chain, tiny_model, pairs_file, run, modes, seed, tmp_path / f"{run.name}.log")
                       for seed, (run, modes) in enumerate(chains.items())]
            results = [f.result() for f in futures]
        assert ref.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert sum(k for k, _ in results) >= KILLS
    # At least one kill landed while a checkpoint was being written (its staging folder was left behind).
    assert sum(s for _, s in results) >= 1
    expected = load_file(str(ref_dir / "model" / "model.safetensors"))
    for run in chains:
        got = load_file(str(run / "model" / "model.safetensors"))
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), f"{run.name}: {name} differs after kill + resume"
        assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS
