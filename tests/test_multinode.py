"""Two machines (two `accelerate launch` commands as machine ranks 0 and 1 on 127.0.0.1, one process each) train
like one process; a machine lost mid-run ends the other with a one-line error and a resumable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import PAIRS
from test_sharded import ACCELERATE, ENV, free_port


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
    return ["train", f"base_model={tiny_model}", f"data.path={data}", "batch_size=8", "micro_batch_size=2",
            "lr=1e-2", "method=full", "eval.before_after=false", "data.val_size=4", "--no-progress"]


def test_two_machines_match_one_process(tiny_model, tmp_path):
    common = [*_common(tiny_model, _data(tmp_path)), "max_steps=6"]
    one = subprocess.run([sys.executable, "-m", "lmtailor", *common, f"output_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    procs = _machines([*common, f"output_dir={tmp_path / 'two'}"], free_port())
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "history.jsonl").read_text().splitlines()]
              for r in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 6
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(*losses, strict=True))
    w1 = load_file(tmp_path / "one" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
