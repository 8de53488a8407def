"""Compute precision: bf16 units are detected from CPU flags, `dtype: auto` picks per device, bf16 autocast tracks
float32 within a stated tolerance, and fp16 loss scaling skips overflowed steps instead of stopping the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import lora_batch
from lmtailor.config import load_config
from lmtailor.errors import ConfigError
from lmtailor.memory import bf16_unit, choose_precision, cpu_flags

AVX2_EPYC = "fpu vme sse sse2 avx avx2 fma bmi2 sha_ni"  # this project's build machine: no bf16 units
SAPPHIRE_RAPIDS = "avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ZEN4 = "avx2 avx512f avx512bw avx512_bf16 avx512_vnni"


@pytest.mark.parametrize(("flags", "unit"), [(AVX2_EPYC, None), (SAPPHIRE_RAPIDS, "amx_bf16"), (ZEN4, "avx512_bf16"),
                                             ("", None), ("avx512f avx512bw", None)])
def test_bf16_units_from_cpu_flags(flags, unit):
    assert bf16_unit(flags.split()) == unit
    cpuinfo = f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert cpu_flags(cpuinfo) == flags.split()
    mode, weights = choose_precision(load_config(None, []), cuda=False, mps=False, flags=flags.split())
    assert (mode, weights) == ("bf16" if unit else "no", torch.float32)  # float32 master weights either way


def test_precision_per_device():
    auto = load_config(None, [])
    assert choose_precision(auto, cuda=True, cuda_bf16=True) == ("bf16", torch.float32)
    assert choose_precision(auto, cuda=True, cuda_bf16=False) == ("fp16", torch.float32)  # loss scaling (Accelerate)
    assert choose_precision(auto, cuda=False, mps=True, flags=SAPPHIRE_RAPIDS.split()) == ("no", torch.float32)
    assert choose_precision(load_config(None, ["mixed_precision=fp16"]), cuda=True) == ("fp16", torch.float32)
    with pytest.raises(ConfigError, match=r"fp16 \(with loss scaling\) needs a CUDA GPU"):
        choose_precision(load_config(None, ["mixed_precision=fp16"]), cuda=False, mps=False)
    with pytest.raises(ConfigError, match="needs dtype=auto"):
        choose_precision(load_config(None, ["mixed_precision=bf16", "dtype=float16"]), cuda=True)


def test_fp16_on_cpu_is_refused_in_one_line(tiny_model, pairs_file, tmp_path, capsys):
    from lmtailor.cli import main

    assert main(["train", f"base_model={tiny_model}", f"data.path={pairs_file}", f"output_dir={tmp_path / 'r'}",
                 "mixed_precision=fp16", "max_steps=1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixed_precision" in err[0] and "CUDA" in err[0]


def _loss_and_grads(tiny_model: Path, data: Path, autocast: bool, mixed: str = "no"
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    model, loss_module, batch = lora_batch(tiny_model, data, mixed=mixed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, n = loss_module(**batch)
    (loss / n).backward()
    return float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


# bf16 keeps 8 significand bits (relative rounding 2^-9 per value), and the gradients of a random tiny model sum
# many small products: measured on it, loss within 1e-5, per-tensor gradient error median 2.6%, worst 5.8%,
# cosine similarity at least 0.998.
BF16_LOSS_RTOL = 0.005
BF16_GRAD_RTOL = 0.10  # per tensor: ||g_bf16 - g_fp32|| / ||g_fp32||
BF16_GRAD_COS = 0.99
# A bf16 base rounds the residual stream too: measured on the same model and batch, median error 2.3% (2.0% over a
# float32 base), worst 10.2% (4.5%), cosine at least 0.995; the loss within 3e-5.
BF16_BASE_GRAD_RTOL = 0.15
BF16_BASE_GRAD_MEDIAN = 0.05


def test_bf16_autocast_gradients_track_float32(tiny_model, pairs_file):
    """What `dtype: auto` runs on a CPU with bf16 units, checked on any CPU (torch emulates bf16 where it lacks
    them): the loss within 0.5%, every gradient within 10% (relative norm of the difference) and in the same
    direction (cosine above 0.99) as in float32."""
    loss32, g32 = _loss_and_grads(tiny_model, pairs_file, autocast=False)
    loss16, g16 = _loss_and_grads(tiny_model, pairs_file, autocast=True)
    assert loss16 == pytest.approx(loss32, rel=BF16_LOSS_RTOL)
    assert g32.keys() == g16.keys() and len(g32) > 8
    for k in g32:
        assert g16[k].dtype == torch.float32, k  # gradients land on the float32 master weights
        assert float((g16[k] - g32[k]).norm() / g32[k].norm()) < BF16_GRAD_RTOL, k
        assert float(torch.nn.functional.cosine_similarity(g16[k].flatten(), g32[k].flatten(), dim=0)) > \
            BF16_GRAD_COS, k


def test_an_adapter_runs_frozen_base_in_bf16_tracks_float32(tiny_model, pairs_file):
    """Under bf16 mixed precision LoRA keeps its frozen base in bf16 (`store_frozen_in`: half the memory, a bf16
    residual stream): the adapters stay float32 master weights, and the loss and every gradient stay within the
    same bounds of float32 as autocast over a float32 base."""
    model, _, _ = lora_batch(tiny_model, pairs_file, mixed="bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    plain, _, _ = lora_batch(tiny_model, pairs_file, mixed="fp16")  # fp16: the base stays float32
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    loss32, g32 = _loss_and_grads(tiny_model, pairs_file, autocast=False)
    loss16, g16 = _loss_and_grads(tiny_model, pairs_file, autocast=True, mixed="bf16")
    assert loss16 == pytest.approx(loss32, rel=BF16_LOSS_RTOL)
    assert g32.keys() == g16.keys() and len(g32) > 8
    errors = []
    for k in g32:
        assert g16[k].dtype == torch.float32, k
        errors.append(float((g16[k] - g32[k]).norm() / g32[k].norm()))
        assert errors[-1] < BF16_BASE_GRAD_RTOL, k
        assert float(torch.nn.functional.cosine_similarity(g16[k].flatten(), g32[k].flatten(), dim=0)) > \
            BF16_GRAD_COS, k
    assert sorted(errors)[len(errors) // 2] < BF16_BASE_GRAD_MEDIAN


def test_store_frozen_in_keeps_what_trains_and_its_module_float32(tiny_model):
    """Only modules without a trained parameter are cast: PEFT's trainable token rows (new tokens under LoRA) keep
    float32, the frozen embedding beside them goes to bf16, and a forward and backward pass under autocast run."""
    from transformers import AutoModelForCausalLM

    from lmtailor.memory import store_frozen_in
    from lmtailor.models import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), 4, 8, 0.0, ["q_proj", "v_proj"],
                     new_tokens=[5, 7])
    before = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert store_frozen_in(model, torch.bfloat16) == before // 2
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"] == torch.float32
    assert dtypes["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"] == torch.bfloat16
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "norm" in n} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


FP16_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from accelerate import Accelerator
    from lmtailor.config import load_config
    from lmtailor.loop import Loop, _optimizer_step, make_optimizer
    from lmtailor.objectives import get_objective
    from lmtailor.rundata import build_run_data
    from lmtailor.train import _apply_method
    from transformers import get_scheduler

    tiny, data, init_scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
    cfg = load_config(None, [f"base_model={tiny}", f"data.path={data}", "method=full", "lr=1e-3",
                             "batch_size=4", "micro_batch_size=2"])
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    # What Accelerate sets up for fp16 on a GPU, here on CPU: float16 autocast and a loss scaler (torch's CPU
    # GradScaler); Accelerate itself leaves both off on CPU.
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    data = build_run_data(objective, ctx, write_audit=False)
    model = _apply_method(objective.model(ctx, torch.float32), ctx.cfg)
    loss_module, optimizer = acc.prepare(objective.build(ctx, model), make_optimizer(model, cfg))
    state = {"step": 0, "best": None, "bad_evals": 0, "history": [], "tokens": 0, "elapsed": 0.0}
    loop = Loop(acc, cfg, objective, ctx, data, model, loss_module, optimizer,
                get_scheduler("constant", optimizer), state, cfg.run_dir)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for step in range(int(sys.argv[4])):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            loss, norm = _optimizer_step(loop, [data.train_items[i] for i in range(4)])
        except Exception as e:
            out.append({"error": f"{type(e).__name__}: {e}"})
            break
        moved = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        out.append({"loss": loss, "scale": acc.scaler.get_scale(), "moved": moved,
                    "finite": all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())})
    print(json.dumps(out))
""")


def _fp16_steps(tiny_model: Path, data: Path, init_scale: float, steps: int) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", FP16_SCRIPT, str(tiny_model), str(data), str(init_scale),
                           str(steps)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fp16_loss_scaling_skips_overflowed_steps(tiny_model, pairs_file):
    """The fp16 path (a GPU without bf16), run on CPU in its own process (Accelerate fixes the precision per process):
    a loss scale of 2^40 overflows float16 gradients; each such step is skipped with the weights unchanged and
    the scale halved, until the scale fits and steps update the weights, instead of stopping the run as diverged."""
    steps = _fp16_steps(tiny_model, pairs_file, 2.0 ** 40, 40)
    assert all("error" not in s for s in steps), steps[-1]
    skipped = [s for s in steps if not s["moved"]]
    assert 10 <= len(skipped) < len(steps) and not steps[0]["moved"] and steps[-1]["moved"]
    assert steps[1]["scale"] == steps[0]["scale"] / 2
    assert all(s["finite"] for s in steps)
    moved = [s["loss"] for s in steps if s["moved"]]
    assert moved[-1] < steps[0]["loss"]


# The real `lmtailor train` with fp16 loss scaling, on CPU: Accelerate leaves autocast and the scaler off on CPU and
# lmtailor refuses fp16 there, so this process lets the precision through and gives the Accelerator what it builds
# for fp16 on a GPU (float16 autocast, a GradScaler), as FP16_SCRIPT does. A small growth interval makes the scale
# move both ways within a few steps.
FP16_TRAIN = textwrap.dedent("""
    import json, sys, torch, accelerate
    import lmtailor.train
    from lmtailor.cli import main

    class CpuFp16(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.native_amp = True
                self.scaler = torch.amp.GradScaler("cpu", init_scale=float(sys.argv[1]), growth_interval=2)

    accelerate.Accelerator = CpuFp16
    lmtailor.train.choose_precision = lambda cfg, cuda, **kw: ("fp16", torch.float32)
    for args in json.loads(sys.argv[2]):  # one process for every run: the imports are paid once
        assert main(args) == 0, args
""")


def _fp16_train(tiny_model: Path, data: Path, init_scale: float, runs: list[tuple[Path, list[str]]]) -> None:
    common = [f"base_model={tiny_model}", f"data.path={data}", "method=full", "max_steps=10", "batch_size=4",
              "micro_batch_size=2", "lr=1e-3", "save_every=5", "keep_checkpoints=5", "data.val_size=2",
              "eval.before_after=false", "eval.generate_examples=0", "report_to=[]", "--no-progress"]
    todo = [["train", f"output_dir={out}", *common, *extra] for out, extra in runs]
    subprocess.run([sys.executable, "-c", FP16_TRAIN, str(init_scale), json.dumps(todo)], check=True,
                   capture_output=True, text=True)


def test_fp16_resume_restores_the_loss_scale(tiny_model, pairs_file, tmp_path):
    """An fp16 run interrupted after its step-5 checkpoint and resumed ends with the weights, losses and loss scales
    of an uninterrupted run: the checkpoint holds the scaler's scale and growth tracker (scaler.json), and resume
    restores them (a resumed scaler starting again from its initial scale would skip steps the first run took)."""
    from safetensors.torch import load_file

    full, part = tmp_path / "full", tmp_path / "part"
    init = 2.0 ** 20  # too large for the first steps: they overflow and halve it, then clean steps double it
    _fp16_train(tiny_model, pairs_file, init, [(full, []), (part, [])])
    hist = [json.loads(line) for line in (full / "history.jsonl").read_text().splitlines()]
    saved = json.loads((part / "checkpoints" / "step-000005" / "scaler.json").read_text())
    assert saved["scale"] == hist[4]["loss_scale"] != init  # the scale moved before the checkpoint
    assert len({h["loss_scale"] for h in hist}) > 1
    # pretend the second run died after its step-5 checkpoint
    shutil.rmtree(part / "model")
    (part / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist[:5]))
    _fp16_train(tiny_model, pairs_file, init, [(part, ["resume=true"])])
    again = [json.loads(line) for line in (part / "history.jsonl").read_text().splitlines()]
    assert [(h["loss"], h["loss_scale"]) for h in again] == [(h["loss"], h["loss_scale"]) for h in hist]
    a, b = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_saves_and_restores_the_loss_scaler(tmp_path):
    """At the checkpoint layer, with torch's own GradScaler: scale and growth tracker go to scaler.json (JSON, in the
    manifest) and come back into a fresh scaler; a checkpoint without a scaler leaves the scaler as it is."""
    from lmtailor.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    for overflow in (True, False):  # an overflow halves the scale; a clean step then moves the growth tracker
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.ones(4, 3)).float().sum()
        scaler.scale(loss).backward()
        if overflow:
            model.weight.grad = torch.full_like(model.weight, float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    saved = scaler.state_dict()
    assert (saved["scale"], saved["_growth_tracker"]) == (2.0 ** 7, 1)
    save_checkpoint(tmp_path / "step-000001", model, opt, sched, [], {"step": 1}, scaler=scaler)
    assert verify_checkpoint(tmp_path / "step-000001") is None
    assert json.loads((tmp_path / "step-000001" / "scaler.json").read_text())["scale"] == 2.0 ** 7
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    load_checkpoint(tmp_path / "step-000001", model, opt, sched, scaler=fresh)
    assert fresh.state_dict() == saved and fresh.get_scale() == 2.0 ** 7
    save_checkpoint(tmp_path / "step-000002", model, opt, sched, [], {"step": 2})  # no scaler: no scaler.json
    assert not (tmp_path / "step-000002" / "scaler.json").exists()
    load_checkpoint(tmp_path / "step-000002", model, opt, sched, scaler=fresh)
    assert fresh.get_scale() == 2.0 ** 7


def _autocast_pass(model: torch.nn.Module, loss_module: torch.nn.Module, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = loss_module(**batch)
    (loss / n).backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _weight_casts(fn) -> int:
    """How many float32 -> bf16 conversions of 2-D tensors (weights) `fn` makes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "aten::_to_copy" and e.input_shapes and len(e.input_shapes[0]) == 2)


def test_cached_weight_casts_change_nothing_but_the_casts(tiny_model, pairs_file):
    """Frozen weights cast once for the run give the same loss and gradients, bit for bit, as autocast casting them
    in every forward; the float32 weights stay the parameters; a weight changed in place is cast again."""
    from lmtailor.memory import cached_weight_casts

    model, loss_module, batch = lora_batch(tiny_model, pairs_file)
    params = dict(model.named_parameters())
    plain_loss, plain_grads = _autocast_pass(model, loss_module, batch)
    plain_casts = _weight_casts(lambda: _autocast_pass(model, loss_module, batch))
    with cached_weight_casts(model, "cpu"):
        loss, grads = _autocast_pass(model, loss_module, batch)  # fills the cache
        cached_casts = _weight_casts(lambda: _autocast_pass(model, loss_module, batch))
        assert dict(model.named_parameters()) == params  # the same Parameter objects, float32
        assert all(p.dtype == torch.float32 for p in params.values())
        frozen = next(p for k, p in params.items() if k.endswith("base_layer.weight"))
        with torch.no_grad():
            frozen.mul_(1.5)
        changed_loss, _ = _autocast_pass(model, loss_module, batch)
    assert loss == plain_loss
    assert all(torch.equal(grads[k], plain_grads[k]) for k in plain_grads)
    frozen_linears = sum(1 for k, p in params.items() if not p.requires_grad and p.dim() == 2 and "embed" not in k)
    assert plain_casts - cached_casts >= frozen_linears > 0
    assert changed_loss == _autocast_pass(model, loss_module, batch)[0] != plain_loss  # same as uncached, new weight


def test_cached_weight_casts_restore_the_weight_when_a_forward_fails():
    from lmtailor.memory import cached_weight_casts

    layer = torch.nn.Linear(4, 3).requires_grad_(False)
    weight = layer.weight
    with cached_weight_casts(layer, "cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
        with pytest.raises(RuntimeError):
            layer(torch.ones(2, 5))
        assert layer.weight is weight
    assert layer.weight is weight and layer._forward_pre_hooks == {} and layer._forward_hooks == {}


def test_bf16_shape_padding_keeps_the_loss(tiny_model, pairs_file, monkeypatch):
    """Under CPU bf16 autocast packed rows are padded to a multiple of SHAPE_STEP tokens (oneDNN builds a kernel
    per matrix shape); the padding is causal-invisible, so loss and gradients match the unpadded rows."""
    import lmtailor.objectives.causal as causal

    model, loss_module, batch = lora_batch(tiny_model, pairs_file)
    assert "segment_ids" in batch and batch["input_ids"].shape[1] % causal.SHAPE_STEP != 0  # padding exercised
    padded_loss, padded = _autocast_pass(model, loss_module, batch)
    monkeypatch.setattr(causal, "SHAPE_STEP", 1)
    loss, grads = _autocast_pass(model, loss_module, batch)
    assert padded_loss == pytest.approx(loss, rel=1e-3)
    for k in grads:
        assert float(torch.nn.functional.cosine_similarity(padded[k].flatten(), grads[k].flatten(), dim=0)) > 0.999, k
