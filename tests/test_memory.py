"""Memory savers and precision: gradient checkpointing is exact, QLoRA and the 8-bit optimizer train on CPU
(bitsandbytes' CPU backend), bf16 autocast tracks float32, DoRA/rsLoRA switches, refusals are one line, and
the trackers record where they wrote (MLflow receives the metrics)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import lora_batch
from lmtailor.cli import main
from lmtailor.config import load_config
from lmtailor.errors import ConfigError

FAST = ["max_steps=4", "batch_size=4", "micro_batch_size=2", "lr=2e-2", "data.val_size=3",
        "eval.before_after=false", "--no-progress"]


@pytest.fixture
def data12(tmp_path: Path) -> Path:
    from conftest import PAIRS

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n"
                            for i in range(3) for q, a in PAIRS))
    return path


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _train(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={out}", *FAST, *extra]) == 0
    return _history(out)


def _gradients(tiny_model: Path, data: Path, checkpointing: bool) -> dict[str, torch.Tensor]:
    model, loss_module, batch = lora_batch(tiny_model, data, "packing=true",
                                           f"gradient_checkpointing={str(checkpointing).lower()}")
    model.train()
    assert unwrap_flag(model) is checkpointing
    assert "segment_ids" in batch or batch["input_ids"].shape[0] < 6  # packed rows
    loss, n = loss_module(**batch)
    (loss / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def unwrap_flag(model: torch.nn.Module) -> bool:
    from lmtailor.models import unwrap_peft

    return bool(unwrap_peft(model).is_gradient_checkpointing)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, data12):
    plain = _gradients(tiny_model, data12, False)
    ckpt = _gradients(tiny_model, data12, True)
    assert plain.keys() == ckpt.keys() and len(plain) > 8
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6, rtol=1e-5), k
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_qlora_trains_a_4bit_base_on_cpu(tiny_model, data12, tmp_path):
    pytest.importorskip("bitsandbytes")
    hist = _train(tiny_model, data12, tmp_path / "q", "method=qlora", "lora.r=8", "lora.target_modules=all-linear",
                  "max_steps=8", "lr=5e-2", "gradient_checkpointing=true")
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (tmp_path / "q" / "model" / "adapter_model.safetensors").is_file()


def test_qlora_base_is_nf4(tiny_model):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lmtailor.memory import quantize_4bit

    model = quantize_4bit(AutoModelForCausalLM.from_pretrained(tiny_model), torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q k v o gate up down of both layers
    assert quantized[0].weight.dtype == torch.uint8 and quantized[0].weight.quant_type == "nf4"


def test_8bit_optimizer_trains(tiny_model, data12, tmp_path):
    pytest.importorskip("bitsandbytes")
    hist = _train(tiny_model, data12, tmp_path / "o", "method=full", "optimizer=adamw_8bit", "lr=5e-3",
                  "max_steps=6", "save_every=3")
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_bf16_autocast_tracks_float32(tiny_model, data12, tmp_path):
    """The bf16 path (what dtype auto picks on CPUs with AMX/AVX512-BF16) stays within 2% of float32."""
    for name, mode in (("a", "no"), ("b", "bf16")):  # own processes: Accelerate fixes the precision per process
        subprocess.run([sys.executable, "-m", "lmtailor", "train", f"base_model={tiny_model}", f"data.path={data12}",
                        f"output_dir={tmp_path / name}", *FAST, "method=full", f"mixed_precision={mode}"],
                       check=True, capture_output=True)
    fp32, bf16 = _history(tmp_path / "a"), _history(tmp_path / "b")
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * a["loss"], (a["loss"], b["loss"])


def test_lora_under_bf16_keeps_its_frozen_base_in_bf16(tiny_model, data12, tmp_path):
    """A LoRA run under bf16 mixed precision keeps its frozen weights in bf16 (metrics.json says so), tracks the
    float32 run within 2%, and writes float32 adapters."""
    from safetensors import safe_open

    for name, mode in (("a", "no"), ("b", "bf16")):
        subprocess.run([sys.executable, "-m", "lmtailor", "train", f"base_model={tiny_model}", f"data.path={data12}",
                        f"output_dir={tmp_path / name}", *FAST, "method=lora", "lr=5e-2", f"mixed_precision={mode}"],
                       check=True, capture_output=True)
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab"}
    assert metrics["a"]["precision"] == {"mixed": "no", "frozen_weights": ["float32"]}
    assert metrics["b"]["precision"] == {"mixed": "bf16", "frozen_weights": ["bfloat16"]}
    for a, b in zip(_history(tmp_path / "a"), _history(tmp_path / "b"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * a["loss"], (a["loss"], b["loss"])
    with safe_open(str(tmp_path / "b" / "model" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 (not iterable)


def test_precision_choice_per_device():
    from lmtailor.memory import choose_precision, cpu_bf16_units

    cfg = load_config(None, [])
    assert choose_precision(cfg, cuda=False, mps=False) == ("bf16" if cpu_bf16_units() else "no", torch.float32)
    assert choose_precision(cfg, cuda=False, mps=True) == ("no", torch.float32)
    with pytest.raises(ConfigError, match="fp16 .*needs a CUDA GPU"):
        choose_precision(load_config(None, ["mixed_precision=fp16"]), cuda=False, mps=False)
    assert choose_precision(load_config(None, ["dtype=bfloat16"]), cuda=False) == ("no", torch.bfloat16)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert (cpu_bf16_units() is not None) == any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def test_dora_and_rslora_switches(tiny_model):
    from transformers import AutoModelForCausalLM

    from lmtailor.models import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), 4, 8, 0.0, ["q_proj"], use_dora=True,
                     use_rslora=True)
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # alpha / sqrt(r)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_unsupported_strategy_is_refused_at_start(strategy, tiny_model, data12, tmp_path, capsys):
    assert main(["train", f"base_model={tiny_model}", f"data.path={data12}", f"output_dir={tmp_path / 'r'}",
                 f"distributed.strategy={strategy}", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and strategy in err[0] and "fsdp" in err[0]


def test_mlflow_receives_the_metrics(tiny_model, data12, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "m"
    _train(tiny_model, data12, run, "method=lora", "report_to=[tensorboard,mlflow]", "eval_every=2", "name=mlrun")
    record = json.loads((run / "trackers.json").read_text())
    assert record["report_to"] == ["tensorboard", "mlflow"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["where"]["mlflow"])
    [exp] = [e for e in client.search_experiments() if e.name == "mlrun"]
    [found] = client.search_runs([exp.experiment_id])
    losses = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in _history(run)])
    assert client.get_metric_history(found.info.run_id, "eval/val_loss")
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_missing_tracker_is_refused(tiny_model, data12, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # wandb may be installed here (the trackers extra): look as if it were not
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", f"base_model={tiny_model}", f"data.path={data12}", f"output_dir={tmp_path / 'w'}",
                 "report_to=wandb", *FAST]) == 2
    assert "report_to" in capsys.readouterr().err


@pytest.mark.parametrize("mixed, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_qlora_base_computes_in_the_steps_precision(tiny_model, mixed, dtype):
    """Under bf16 mixed precision the 4-bit base dequantizes straight to bf16 (QLoRA's compute dtype); in float32
    each dequantized weight was a float32 copy that autocast cast again."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lmtailor.train import _apply_method

    cfg = load_config(None, [f"base_model={tiny_model}", "method=qlora", "lora.target_modules=all-linear"])
    model = _apply_method(AutoModelForCausalLM.from_pretrained(tiny_model), cfg, None, torch.device("cpu"), mixed)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    assert {m.compute_dtype for m in quantized} == {dtype}
    assert {m.weight.quant_state.dtype for m in quantized} == {dtype}
    x = torch.randn(2, 5, quantized[0].in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed == "bf16"):
        y = quantized[0](x)
    w = quantized[0].weight
    reference = x @ bnb.functional.dequantize_4bit(w.data, w.quant_state).float().T
    assert y.shape == reference.shape and torch.allclose(y.float(), reference, rtol=3e-2, atol=3e-2)
    assert any(p.requires_grad for p in model.parameters())  # LoRA on top
