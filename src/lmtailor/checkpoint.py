"""Training checkpoints: everything exact resume needs, in safetensors + JSON, written atomically.

A checkpoint folder `checkpoints/step-000120/` holds:
  trainable.safetensors    the parameters that train (LoRA weights, or the whole model)
  optimizer.safetensors    optimizer tensors; optimizer.json the rest of its state dict
  scheduler.json           LR scheduler state
  rng.safetensors          torch RNG state of each process; rng.json Python and NumPy RNG states
  trainer.json             step, best metric, patience counter, log history
The folder appears by one rename, so a crash leaves either a complete checkpoint or none. In a run with
`encrypt_outputs` each file is encrypted (lmtailor.crypto) under the same name; loading reads either kind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from lmtailor import crypto
from lmtailor.errors import CheckpointError
from lmtailor.io import atomic_dir

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        rest["state"][str(idx)] = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
                rest["state"][str(idx)][key] = "__tensor__"
            else:
                rest["state"][str(idx)][key] = val
    return tensors, rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, st in rest["state"].items():
        state[int(idx)] = {k: tensors[f"{idx}.{k}"] if v == "__tensor__" else v for k, v in st.items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} trainable parameter(s), e.g. {missing[0]}",
                              "it was written by a run with another method or LoRA setting")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device))


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rng_states: list[dict[str, Any]], trainer: dict[str, Any]) -> None:
    """Write one checkpoint folder atomically (call on the main process)."""
    opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
    key = crypto.sealing_key()

    def put(name: str, data: bytes) -> None:
        # Serialized in memory and sealed before it reaches the disk: no plaintext weights at rest.
        (tmp / name).write_bytes(data if key is None else crypto.seal_bytes(data, key))

    with atomic_dir(folder) as tmp:
        put("trainable.safetensors", save(trainable_state(model)))
        put("optimizer.safetensors", save(opt_tensors))
        put("optimizer.json", json.dumps(opt_rest).encode())
        put("scheduler.json", json.dumps(scheduler.state_dict()).encode())
        put("rng.safetensors", save({f"{r}.{k}": v for r, s in enumerate(rng_states) for k, v in s.items()
                                     if torch.is_tensor(v)}))
        put("rng.json", json.dumps([{k: _jsonable(v) for k, v in s.items() if not torch.is_tensor(v)}
                                    for s in rng_states]).encode())
        put("trainer.json", json.dumps(trainer, indent=1).encode())


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.integer):
        return int(v)
    return v


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int = 0) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG; returns the trainer state.

    Encrypted files are decrypted in memory with the active key (lmtailor.crypto.use_keys).
    """
    def get(name: str) -> bytes:
        return crypto.read_bytes(folder / name)

    try:
        load_trainable(model, load(get("trainable.safetensors")))
        optimizer.load_state_dict(_join_optimizer(load(get("optimizer.safetensors")),
                                                  json.loads(get("optimizer.json"))))
        scheduler.load_state_dict(json.loads(get("scheduler.json")))
        rng_t = load(get("rng.safetensors"))
        rng_j = json.loads(get("rng.json"))
        trainer = json.loads(get("trainer.json"))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {folder} cannot be read: {e}",
                              "delete it to resume from the one before") from e
    if rank < len(rng_j):
        state = dict(rng_j[rank])
        state.update({k.split(".", 1)[1]: v for k, v in rng_t.items() if k.startswith(f"{rank}.")})
        npst = state["numpy"]
        npst["state"] = {**npst["state"], "key": np.asarray(npst["state"]["key"], dtype=np.uint32)}
        set_rng_state(state)
    return trainer


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        # Hide the folder with one rename before deleting it: a crash inside rmtree then leaves a hidden
        # remnant, never a visible checkpoint with files missing.
        trash = old.with_name(f".{old.name}.del")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
