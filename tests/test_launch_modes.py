"""Distributed modes lmtailor does not drive are refused at start with one line naming them, through real
`accelerate launch` config files; none of them hangs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from test_sharded import ACCELERATE, ENV, free_port

FSDP_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_sharding_strategy: FULL_SHARD
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: true
"""
DEEPSPEED_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: {stage}
  gradient_accumulation_steps: 1
  offload_optimizer_device: none
  offload_param_device: none
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: true
"""


def _args(tiny_model: Path, tmp_path: Path) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "list files", "output": "ls"}\n' * 8)
    return ["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
            "--no-progress"]


def _one_error_line(err: str) -> str:
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ours and "Traceback" not in err.split(ours[0])[0].split("[rank")[-1], err[-3000:]
    return ours[0]


def test_accelerate_fsdp_config_is_refused_at_start(tiny_model, tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_YAML)
    proc = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(config), "--main_process_port",
                           str(free_port()), "-m", "lmtailor", *_args(tiny_model, tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    line = _one_error_line(proc.stderr)
    assert "distributed_type FSDP" in line and "distributed.strategy=fsdp" in line
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_config_stops_at_once(tiny_model, tmp_path, stage):
    """ZeRO-2/3 through an Accelerate DeepSpeed config: without the deepspeed package Accelerate's launcher stops
    itself; with it, lmtailor refuses before any process group forms (DeepSpeed needs CUDA)."""
    config = tmp_path / "ds.yaml"
    config.write_text(DEEPSPEED_YAML.format(stage=stage))
    proc = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(config), "--main_process_port",
                           str(free_port()), "-m", "lmtailor", *_args(tiny_model, tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    if importlib.util.find_spec("deepspeed") is None:
        assert "DeepSpeed is not installed" in proc.stderr, proc.stderr[-3000:]
    else:
        assert "distributed_type DEEPSPEED" in _one_error_line(proc.stderr)


@pytest.mark.parametrize(("env", "override", "named"), [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, None, "distributed_type DEEPSPEED"),  # what accelerate launch sets
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, None, "distributed_type MEGATRON_LM"),
    ({}, "distributed.strategy=deepspeed_zero2", "deepspeed_zero2 is not supported here"),
    ({}, "distributed.strategy=deepspeed_zero3", "deepspeed_zero3 is not supported here"),
])
def test_unsupported_modes_are_refused_in_one_line(tiny_model, tmp_path, env, override, named):
    proc = subprocess.run([sys.executable, "-m", "lmtailor", *_args(tiny_model, tmp_path),
                           *([override] if override else [])], capture_output=True, text=True,
                          env={**ENV, **env}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and named in proc.stderr
    assert "Traceback" not in proc.stderr
