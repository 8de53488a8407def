"""Two machines (two `accelerate launch` commands as machine ranks 0 and 1 on 127.0.0.1, one process each) train
like one process; a machine lost mid-run ends the other with a one-line error and a resumable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS
from test_sharded import ACCELERATE, ENV, free_port, kill_tree


def _machines(args: list[str], port: int) -> list[subprocess.Popen[str]]:
    """Machine ranks 0 and 1 of a 2-machine run rendezvousing at 127.0.0.1:port (static rendezvous)."""
    return [subprocess.Popen([str(ACCELERATE), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                              "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                              "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                              "-m", "lmtailor", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV, start_new_session=True) for rank in (0, 1)]


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n"
                            for i in range(4) for q, a in PAIRS))
    return data


def _common(tiny_model: Path, data: Path) -> list[str]:
    # mixed_precision=no: on a CPU with AMX dtype auto trains in bf16, whose rounding depends on how a step is split
    return ["train", f"base_model={tiny_model}", f"data.path={data}", "batch_size=8", "micro_batch_size=2",
            "lr=1e-2", "method=full", "eval.before_after=false", "data.val_size=4", "mixed_precision=no",
            "--no-progress"]


def _equal(one: Path, two: Path, steps: int) -> None:
    """Two runs' losses within 1e-4 relative and final weights within 1e-4."""
    losses = [[json.loads(x)["loss"] for x in (r / "history.jsonl").read_text().splitlines()] for r in (one, two)]
    assert len(losses[0]) == len(losses[1]) == steps
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(*losses, strict=True))
    w1 = load_file(one / "model" / "model.safetensors")
    w2 = load_file(two / "model" / "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


def _finish(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The uninterrupted one-process run both tests compare with (12 steps, checkpoints every 2)."""
    root = tmp_path_factory.mktemp("multinode")
    common = [*_common(tiny_model, _data(root)), "max_steps=12", "save_every=2", "eval_every=6"]
    one = subprocess.run([sys.executable, "-m", "lmtailor", *common, f"output_dir={root / 'one'}"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    return root, common


def test_two_machines_match_one_process(one_process):
    root, common = one_process
    _finish(_machines([*common, f"output_dir={root / 'two'}"], free_port()))
    assert json.loads((root / "two" / "metrics.json").read_text())["world_size"] == 2
    _equal(root / "one", root / "two", 12)


def test_lost_machine_ends_the_run_with_a_clear_error_then_resumes(one_process):
    root, common = one_process
    out = root / "lost"
    # the timeout bounds a silent peer; a killed one closes its sockets, which the survivor sees at once
    args = [*common, "distributed.timeout=120", f"output_dir={out}"]
    procs = _machines(args, free_port())
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-000002").is_dir() and time.time() < deadline:
        assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.02)
    kill_tree(procs[1].pid)  # machine 1 is gone: its launcher and its worker at once
    killed = time.time()
    _, err = procs[0].communicate(timeout=300)  # machine 0 must not hang
    procs[1].communicate()
    assert time.time() - killed < 90
    assert procs[0].returncode != 0
    assert not (out / "model").exists(), "the run finished before machine 1 could be killed"
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "lost contact with another process of the run at step" in ours[0], err[-3000:]
    assert "resume=true" in ours[0] and "[rank0]: Traceback" not in err, err[-3000:]
    newest = sorted((out / "checkpoints").iterdir())[-1]  # complete (written, then renamed into place)
    assert newest.name in ours[0] and (newest / "trainer.json").is_file()
    _finish(_machines([*args, "resume=true"], free_port()))
    _equal(root / "one", out, 12)
