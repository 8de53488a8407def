"""Several processes, one run: the strategy check, FSDP2 sharding, sharded checkpoints and the final gather.

`distributed.strategy: fsdp` (or `fsdp_grad_op`) shards the model with torch's own FSDP2 (`fully_shard`), one
unit per decoder layer plus the loss module as the root, over whatever process group the launcher made (gloo on
CPU, NCCL on GPUs): the same code runs in the CPU tests and on GPUs. Accelerate still launches the processes and
prepares the optimizer; it does not wrap the model (its own FSDP path refuses CPU).

A sharded checkpoint is a torch.distributed.checkpoint folder (every process writes its shards of the trainable
weights and optimizer state) plus the scheduler, RNG and trainer state as JSON/safetensors from the main process.
Every process writes into one hidden folder; after all have finished, the main process renames it to
`step-NNNNNN`, so a checkpoint is complete or absent, as with one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from lmtailor.checkpoint import jsonable, list_checkpoints, load_scaler_state, restore_rank_rng, scaler_state
from lmtailor.config import RunConfig
from lmtailor.errors import CheckpointError, ConfigError, LmtailorError
from lmtailor.models import decoder_layers

SHARDED = ("fsdp", "fsdp_grad_op")
DCP_MARKER = ".metadata"  # torch.distributed.checkpoint's index file


class DistributedError(LmtailorError):
    """A process of a multi-process run was lost or stopped answering."""


LAUNCH_FLAGS = {"ACCELERATE_USE_DEEPSPEED": "DEEPSPEED", "ACCELERATE_USE_FSDP": "FSDP",
                "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM"}


def check_launch(cfg: RunConfig, environ: Mapping[str, str], cuda: bool) -> None:
    """Refuse a launch or strategy the code does not drive before any process group or model is made.

    `accelerate launch` with an FSDP, DeepSpeed or Megatron-LM config tells its processes so in the environment;
    the Accelerator would then build that engine's plugin (DeepSpeed's on a machine without CUDA can wait for a
    process group that never forms), so the refusal comes first.

    Raises:
        ConfigError: naming the launch mode or strategy.
    """
    for var, mode in LAUNCH_FLAGS.items():
        if environ.get(var, "").lower() in ("1", "true", "yes"):
            _refuse_launch(mode)
    _refuse_deepspeed(cfg.distributed.strategy, cuda)


def _refuse_launch(mode: str) -> None:
    raise ConfigError(f"accelerate launch configured distributed_type {mode}, which lmtailor does not drive",
                      "launch plain processes (accelerate launch --multi_gpu --num_processes N) and set "
                      "distributed.strategy=fsdp or fsdp_grad_op in the recipe")


def _refuse_deepspeed(strategy: str, cuda: bool) -> None:
    if strategy.startswith("deepspeed"):
        why = "DeepSpeed needs CUDA GPUs and none is present" if not cuda else "DeepSpeed is not supported yet"
        raise ConfigError(f"config key 'distributed.strategy': {strategy} is not supported here ({why})",
                          "use fsdp (parameters, gradients and optimizer sharded, like ZeRO-3) or fsdp_grad_op "
                          "(like ZeRO-2); allowed values are auto, ddp, fsdp, fsdp_grad_op")


def check_strategy(cfg: RunConfig, launcher_type: str, cuda: bool) -> str:
    """The strategy this run uses ("ddp" or one of SHARDED); refuses what the code does not support.

    Args:
        cfg: the recipe.
        launcher_type: Accelerate's distributed type name for this launch (NO, MULTI_CPU, MULTI_GPU, FSDP, ...).
        cuda: whether CUDA GPUs are present.

    Raises:
        ConfigError: a DeepSpeed strategy, an Accelerate FSDP/DeepSpeed launch config, or FSDP with an option it
            cannot honour.
    """
    strategy = cfg.distributed.strategy
    if launcher_type in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        _refuse_launch(launcher_type)
    _refuse_deepspeed(strategy, cuda)
    if strategy in SHARDED:
        if cfg.method in ("prompt_tuning", "prefix_tuning", "qlora"):
            raise ConfigError(f"config key 'method': {cfg.method} is not supported with distributed.strategy="
                              f"{strategy}", "use method lora, full or freeze, or strategy ddp")
        if cfg.metric_for_best != "loss":
            raise ConfigError(f"config key 'metric_for_best': {cfg.metric_for_best!r} is computed on the main process "
                              f"alone, which a sharded model (distributed.strategy={strategy}) cannot do",
                              "use metric_for_best=loss, or strategy ddp")
        if cfg.encrypt_outputs:
            raise ConfigError(f"encrypt_outputs=true: sharded checkpoints (distributed.strategy={strategy}) are "
                              "written unencrypted", "use strategy ddp for encrypted runs")
        return strategy
    return "ddp"


def shard(loss_module: nn.Module, model: nn.Module, strategy: str, device: torch.device,
          param_dtype: torch.dtype | None = None) -> None:
    """Apply FSDP2 in place: every decoder layer its own unit, the loss module (embeddings, head) the root.

    The loss module is the root because the training loop calls it, not the model's own forward: FSDP2 gathers the
    root's parameters in the root's forward hook.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reshard = strategy == "fsdp"  # fsdp_grad_op keeps the gathered parameters from forward until backward
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(loss_module, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)


@contextlib.contextmanager
def gradient_sync(loss_module: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate without reduce-scattering gradients (sync=False) for all but the last micro-batch."""
    setter = getattr(loss_module, "set_requires_gradient_sync", None)
    if setter is None or sync:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def clip_grad_norm(parameters: Any, max_norm: float) -> float:
    """Clip by the global gradient norm over every shard; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def max_over_processes(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


# ---- sharded checkpoints -------------------------------------------------------------------------------------

def _state_dicts(loss_module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(loss_module, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded(folder: Path, loss_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 rng_states: list[dict[str, Any]], trainer: dict[str, Any], main: bool, scaler: Any = None) -> None:
    """Write one sharded checkpoint; every process calls it. It appears as `folder` only when complete."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.with_name(f".{folder.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    model_sd, optim_sd = _state_dicts(loss_module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if main:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "rng.safetensors").write_bytes(save({f"{r}.{k}": v for r, s in enumerate(rng_states)
                                                    for k, v in s.items() if torch.is_tensor(v)}))
        (tmp / "rng.json").write_text(json.dumps([{k: jsonable(v) for k, v in s.items() if not torch.is_tensor(v)}
                                                  for s in rng_states]))
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        scaling = scaler_state(scaler)  # fp16 loss scaling: the scale is the same on every process
        if scaling is not None:
            (tmp / "scaler.json").write_text(json.dumps(scaling))
    torch.distributed.barrier()  # every shard written before the folder becomes visible
    if main:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    torch.distributed.barrier()


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / DCP_MARKER).is_file()


def load_sharded(folder: Path, loss_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 rank: int, scaler: Any = None) -> dict[str, Any]:
    """Restore a sharded checkpoint (every process calls it), and the fp16 loss scaler if it saved one; returns
    the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not is_sharded_checkpoint(folder):
        raise CheckpointError(f"checkpoint {folder} was written by a run without sharding",
                              "resume it with the distributed.strategy it was written with")
    try:
        model_sd, optim_sd = _state_dicts(loss_module, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
        set_state_dict(loss_module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(ignore_frozen_params=True))
        scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        rng_t = load((folder / "rng.safetensors").read_bytes())
        rng_j = json.loads((folder / "rng.json").read_text())
        trainer: dict[str, Any] = json.loads((folder / "trainer.json").read_text())
        if scaler is not None and (folder / "scaler.json").is_file():
            load_scaler_state(scaler, json.loads((folder / "scaler.json").read_text()))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"sharded checkpoint {folder} cannot be read: {str(e).splitlines()[0]}",
                              "delete it to resume from the one before") from e
    restore_rank_rng(rng_t, rng_j, rank)
    return trainer


def gather_full_state(loss_module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process (empty elsewhere); every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(  # type: ignore[return-value]
        loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def lost_process(e: BaseException) -> bool:
    """Whether an exception is a collective failing because another process died or timed out."""
    names = {type(c).__name__ for c in (e, e.__cause__, e.__context__) if c is not None}
    text = str(e).lower()
    return bool(names & {"DistBackendError", "DistNetworkError", "DistStoreError"}) or any(
        m in text for m in ("connection closed by peer", "connection reset", "timed out", "timeout", "gloo",
                            "nccl", "broken pipe"))


def lost_contact(e: BaseException, run_dir: Path, timeout: float, step: int | None = None) -> DistributedError:
    """The one-line error for a collective that failed because another process died or stopped answering."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    # gloo/NCCL prefix their messages with the source file and line: keep only what they say
    first = first.split("] ", 1)[-1] if first.startswith("[") else first
    newest = list_checkpoints(run_dir)
    where = f" at step {step}" if step is not None else ""
    return DistributedError(
        f"lost contact with another process of the run{where} ({type(e).__name__}: {first[:200]})",
        f"restart every node with resume=true (newest complete checkpoint: {newest[-1] if newest else 'none'}; "
        f"a process waits distributed.timeout={timeout:g}s for the others)")
