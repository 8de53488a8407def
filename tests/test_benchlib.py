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
