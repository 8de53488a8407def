"""FSDP2 over gloo with 2 processes: matches one process, survives SIGKILL + resume exactly, trains LoRA."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS

ACCELERATE = Path(sys.executable).with_name("accelerate")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch2() -> list[str]:
    """`accelerate launch` of 2 local processes (gloo on CPU) on a free port (other runs may hold 29500)."""
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "lmtailor"]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once: torchrun starts each worker in its own session, so
    killing the launcher's process group alone leaves the workers training."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "history.jsonl").read_text().splitlines()]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One process, and FSDP over 2 processes, of the same full fine-tuning recipe (uninterrupted)."""
    root = tmp_path_factory.mktemp("sharded")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n"
                            for i in range(4) for q, a in PAIRS))
    # global batch 8 in micro-batches of 2: one process accumulates 4, each of two processes 2
    # mixed_precision=no: on a CPU with AMX dtype auto trains in bf16, whose rounding depends on how a step is split
    common = ["train", f"base_model={tiny_model}", f"data.path={data}", "max_steps=6", "batch_size=8",
              "micro_batch_size=2", "lr=1e-2", "eval.before_after=false", "data.val_size=5", "eval_every=3",
              "mixed_precision=no", "--no-progress"]
    _run([sys.executable, "-m", "lmtailor", *common, "method=full", f"output_dir={root / 'one'}"])
    _run([*launch2(), *common, "method=full", "distributed.strategy=fsdp", "save_every=2",
          f"output_dir={root / 'fsdp'}"])
    return {"root": root, "common": common}


def test_fsdp_two_processes_match_one(runs):
    root = runs["root"]
    one, two = (json.loads((root / r / "metrics.json").read_text()) for r in ("one", "fsdp"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert _close(_losses(root / "one"), _losses(root / "fsdp"))
    assert _losses(root / "one")[-1] < _losses(root / "one")[0]
    w1 = load_file(root / "one" / "model" / "model.safetensors")
    w2 = load_file(root / "fsdp" / "model" / "model.safetensors")  # gathered into a plain HF folder
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    # sharded checkpoints: one file of shards per process, the index, and the run state; never a half one
    ckpts = sorted(p.name for p in (root / "fsdp" / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]
    files = {p.name for p in (root / "fsdp" / "checkpoints" / "step-000004").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.json", "scheduler.json"} <= files


def test_fsdp_killed_then_resumed_equals_uninterrupted(runs):
    root, common = runs["root"], runs["common"]
    out = root / "killed"
    cmd = [*launch2(), *common, "method=full", "distributed.strategy=fsdp", "save_every=2", f"output_dir={out}"]
    target = out / "checkpoints" / f"step-00000{random.choice([2, 4])}"  # SIGKILL at a random checkpointed step
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 600
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)  # the launcher and both workers, at once
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    _run([*launch2(), *common, "method=full", "distributed.strategy=fsdp", "save_every=2", "resume=true",
          f"output_dir={out}"])
    assert _close(_losses(root / "fsdp"), _losses(out))
    w1 = load_file(root / "fsdp" / "model" / "model.safetensors")
    w2 = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "resumed weights differ from the uninterrupted run"


def test_lora_under_fsdp_matches_one_process(runs):
    root, common = runs["root"], runs["common"]
    _run([sys.executable, "-m", "lmtailor", *common, "method=lora", "lora.r=4", f"output_dir={root / 'lora1'}"])
    _run([*launch2(), *common, "method=lora", "lora.r=4", "distributed.strategy=fsdp_grad_op",
          f"output_dir={root / 'lora2'}"])
    assert _close(_losses(root / "lora1"), _losses(root / "lora2"))
    a1 = load_file(root / "lora1" / "model" / "adapter_model.safetensors")
    a2 = load_file(root / "lora2" / "model" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys() and a1
    assert all(torch.allclose(a1[k], a2[k], atol=1e-4) for k in a1)
