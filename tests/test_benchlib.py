"""The throughput benchmark's own arithmetic: the linear shapes it times are the model's linear layers."""

from __future__ import annotations

import math

import torch


def _benchlib(monkeypatch):  # noqa: ANN202
    from conftest import load_benchmark

    return load_benchmark("benchlib", monkeypatch)


def test_linear_shapes_cover_every_linear_weight_of_the_decoder(monkeypatch, tiny_model):
    from lmtailor.models import load_model_config, load_pretrained

    lib = _benchlib(monkeypatch)
    model = load_pretrained(str(tiny_model), dtype=torch.float32)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    shapes = lib.linear_shapes(load_model_config(str(tiny_model)))
    assert sum(k * n * c for k, n, c in shapes) == sum(m.weight.numel() for m in linears)
    assert sum(c for _, _, c in shapes) == len(linears)
    rate = lib.step_matmul_gflops(shapes, 64, "float32", head=(head.in_features, head.out_features, 8), budget_s=0.01)
    assert math.isfinite(rate) and rate > 0


def test_gpu_check_runs_its_sides_and_profiles_on_a_cpu(tmp_path):
    """The GPU check is run by hand on a lent GPU (minutes a session): its CPU self-test keeps it from rotting in
    between. Every side measures, the FLOP count is the model's, and the plan stands beside the measured peak."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--tiny", "--methods", "full,lora,hf",
                    "--profile", "full", "--work", str(tmp_path / "work")], env=env, check=True, timeout=600,
                   capture_output=True)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["runs"]) == {"full", "lora", "hf"}
    for name, run in result["runs"].items():
        assert run["tokens_per_s"] > 0 and run["seconds_per_step"] > 0, name
    assert result["runs"]["full"]["plan_peak_mib"] > 0 and result["runs"]["full"]["peak_memory_mib"] > 0
    spec = result["spec"]
    h, layers = spec["hidden_size"], spec["num_hidden_layers"]
    assert result["params"] > layers * 3 * h * spec["intermediate_size"]  # the MLPs alone
    profile = (tmp_path / "profile-full.txt").read_text()
    assert profile.startswith("full: one step, wall") and "aten::mm" in profile
