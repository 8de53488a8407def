"""Precision and memory savers: the compute precision per device, bf16 matrix units of the CPU, gradient
checkpointing, a 4-bit NF4 base for QLoRA and an 8-bit optimizer (both bitsandbytes, imported only when asked).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.errors import ConfigError
from lmtailor.models import decoder_layers, unwrap_peft

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix/dot-product units


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> str | None:
    """The first of BF16_FLAGS this CPU has (Linux /proc/cpuinfo), or None: where bf16 autocast pays on CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return next((f for f in BF16_FLAGS if f in flags), None)


def choose_precision(cfg: RunConfig, cuda: bool | None = None, mps: bool | None = None) -> tuple[str, torch.dtype]:
    """(Accelerate's mixed_precision, weight dtype) for this recipe on this machine.

    dtype auto keeps float32 weights and picks the compute precision per device: bf16 on a GPU that has it, fp16
    with loss scaling on one that does not, none on MPS, bf16 on a CPU with bf16 units (AMX, AVX512-BF16), else none.
    A fixed dtype (float32, bfloat16, float16) trains the weights in that dtype, without autocast.

    Raises:
        ConfigError: fp16 mixed precision without a CUDA GPU.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = (not cuda and torch.backends.mps.is_available()) if mps is None else mps
    if cfg.dtype != "auto":
        if cfg.mixed_precision not in ("auto", "no"):
            raise ConfigError(f"config key 'mixed_precision': {cfg.mixed_precision} needs dtype=auto (float32 master "
                              f"weights), got dtype={cfg.dtype}", "set dtype=auto, or mixed_precision=no")
        return "no", getattr(torch, cfg.dtype)
    mode = cfg.mixed_precision
    if mode == "auto":
        if cuda:
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mode = "bf16" if not mps and cpu_bf16_units() else "no"
    if mode == "fp16" and not cuda:
        raise ConfigError("config key 'mixed_precision': fp16 (with loss scaling) needs a CUDA GPU",
                          "on CPU use bf16 (fast where the CPU has AMX or AVX512-BF16) or no")
    return mode, torch.float32


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: frozen inputs need no grad)."""
    hf: Any = unwrap_peft(model)
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"config key 'gradient_checkpointing': {type(hf).__name__} does not support it",
                          "set gradient_checkpointing=false")
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                   "context_fn": _same_attention(hf.config)})


def _same_attention(config: Any) -> Callable[[], tuple[Any, Any]]:
    """A checkpoint context_fn: the recomputation in backward uses the attention implementation the forward used.

    The loss module switches the implementation only around its forward call (packed rows attend segment by
    segment on CPU); backward runs after it has switched back, and would recompute with another one."""
    def context_fn() -> tuple[Any, Any]:
        chosen = config._attn_implementation

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            old = config._attn_implementation
            config._attn_implementation = chosen
            try:
                yield
            finally:
                config._attn_implementation = old

        return contextlib.nullcontext(), recompute()

    return context_fn


def require_bitsandbytes(what: str) -> Any:
    """Import bitsandbytes, or say which config key needs it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes, which is not installed", "pip install bitsandbytes")
    try:
        import bitsandbytes
    except Exception as e:  # a build without a backend for this machine fails at import
        raise ConfigError(f"{what}: bitsandbytes cannot run here: {str(e).splitlines()[0]}",
                          "use method=lora / optimizer=adamw") from e
    return bitsandbytes


def quantize_4bit(model: nn.Module, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the linear layers of the decoder blocks by NF4 4-bit ones (bitsandbytes), in place, on `device`.

    Embeddings, norms and the output head stay in their dtype (the QLoRA recipe); LoRA then trains on top.
    """
    bnb = require_bitsandbytes("method=qlora")
    for layer in decoder_layers(model):
        for child in list(layer.modules()):
            for attr, sub in list(child.named_children()):
                if type(sub) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(sub.in_features, sub.out_features, bias=sub.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(sub.weight.data.to(compute_dtype), requires_grad=False,
                                             quant_type="nf4")
                if sub.bias is not None:
                    q.bias = nn.Parameter(sub.bias.data.to(compute_dtype), requires_grad=False)
                setattr(child, attr, q.to(device))  # moving a Params4bit quantizes it
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


NESTED = "__bnb_optimizer_quant_state__"  # where bitsandbytes nests its quantized moments in a state dict


def adamw_8bit(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW with 8-bit moments (bitsandbytes), its state dict flat (tensors at the top of each parameter's
    state) like torch's, so that checkpoints store it the same way."""
    bnb = require_bitsandbytes("optimizer=adamw_8bit")

    class FlatAdamW8bit(bnb.optim.AdamW8bit):  # type: ignore[misc,name-defined]
        def state_dict(self) -> dict[str, Any]:
            sd: dict[str, Any] = super().state_dict()
            for st in sd["state"].values():
                # one quantization map is shared by every parameter: copies, as safetensors stores no aliases
                st.update({f"{NESTED}.{k}": v.clone() if torch.is_tensor(v) else v
                           for k, v in st.pop(NESTED, {}).items()})
            return sd

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            state = {}
            for idx, st in state_dict["state"].items():
                nested = {k.split(".", 1)[1]: v for k, v in st.items() if k.startswith(NESTED + ".")}
                state[idx] = {k: v for k, v in st.items() if not k.startswith(NESTED + ".")}
                if nested:
                    state[idx][NESTED] = nested
            super().load_state_dict({**state_dict, "state": state})

    return FlatAdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)  # type: ignore[no-any-return]
