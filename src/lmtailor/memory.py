"""Precision and memory savers: the compute precision per device, bf16 matrix units of the CPU, gradient
checkpointing, a 4-bit NF4 base for QLoRA and an 8-bit optimizer (both bitsandbytes, imported only when asked).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.errors import ConfigError
from lmtailor.models import decoder_layers, unwrap_peft

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter for the size from which an allocation gets pages of its own
RELEASE_THRESHOLD = 64 * 1024
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix/dot-product units


def bf16_unit(flags: Iterable[str]) -> str | None:
    """The first of BF16_FLAGS among a CPU's feature flags, or None: where bf16 autocast pays on CPU.

    AMX (Sapphire Rapids and later) multiplies bf16 tiles; AVX512-BF16 (Cooper Lake, Zen 4 and later) has bf16 dot
    products. Without either, torch emulates bf16 matrix products with float32 ones plus conversions: slower than
    float32 alone, so float32 is the better choice."""
    have = set(flags)
    return next((f for f in BF16_FLAGS if f in have), None)


def release_freed_memory(threshold: int = RELEASE_THRESHOLD) -> bool:
    """Make glibc give freed memory back to the system at once (`release_memory: true`); False where this C
    library has no mallopt (musl, macOS).

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so a training
    step's activations come from the heap afterwards, and the heap keeps what they free for reuse: the resident set
    stays above the live tensors. Measured on llama models of 21M and 41M parameters over 6 float32 steps: 14-35%
    above `lmtailor plan`'s live-tensor figure with the default, 3-6% with a fixed 64 KiB threshold (allocations at
    least that large are mapped and unmapped on their own). The price is a page fault per fresh page: the 21M/41M
    steps ran 10-27% slower, LoRA steps of the bundled 135M model 30-60% slower (562-582 -> 240-318 tokens/s in
    bf16, 425-467 -> 250-292 in float32, peak resident set 2.2 -> 1.8 GB). Worth it where memory, not time, is
    short.
    Takes effect for allocations made afterwards."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (Linux; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    return next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> str | None:
    """bf16_unit of this machine's CPU."""
    return bf16_unit(cpu_flags())


def choose_precision(cfg: RunConfig, cuda: bool | None = None, mps: bool | None = None, *,
                     cuda_bf16: bool | None = None, flags: Iterable[str] | None = None) -> tuple[str, torch.dtype]:
    """(Accelerate's mixed_precision, weight dtype) for this recipe on this machine.

    dtype auto keeps float32 weights and picks the compute precision per device: bf16 on a GPU that has it, fp16
    with loss scaling on one that does not, none on MPS, bf16 on a CPU with bf16 units (AMX, AVX512-BF16), else none.
    A fixed dtype (float32, bfloat16, float16) trains the weights in that dtype, without autocast. `cuda`, `mps`,
    `cuda_bf16` (the GPU has bf16) and `flags` (the CPU's feature flags) describe the machine; unset, detected.

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
            mode = "bf16" if (torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16) else "fp16"
        else:
            unit = cpu_bf16_units() if flags is None else bf16_unit(flags)
            mode = "bf16" if not mps and unit else "no"
    if mode == "fp16" and not cuda:
        # Accelerate scales losses only on an accelerator; on CPU it would silently train in float32.
        raise ConfigError("config key 'mixed_precision': fp16 (with loss scaling) needs a CUDA GPU",
                          "on CPU use bf16 (fast where the CPU has AMX or AVX512-BF16) or no")
    return mode, torch.float32


class PeakMemory:
    """Peak memory of the training steps above what the process held before the model was built.

    CUDA: the allocator's high-water mark (torch.cuda.max_memory_allocated). CPU (Linux): the resident set's
    high-water mark (VmHWM), reset to the current size when the steps start (`/proc/self/clear_refs` 5), so that a
    transient copy while the weights load does not count; RSS covers everything the process holds (tensors, the
    allocator's free-but-kept pages, library code paged in), which is what runs out. Elsewhere: not measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.baseline = self._now()

    def _now(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.memory_allocated())
        return _proc_status_bytes("VmRSS")

    def start(self) -> None:
        """Forget the peak so far (call when the training steps begin)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int | None:
        """Bytes above the baseline at the highest point since `start`, or None where it cannot be measured."""
        top = int(torch.cuda.max_memory_allocated()) if self.cuda else _proc_status_bytes("VmHWM")
        if top is None or self.baseline is None:
            return None
        return top - self.baseline


def _proc_status_bytes(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith(key + ":")), None)
    return int(line.split()[1]) * 1024 if line else None  # reported in kB


@contextlib.contextmanager
def cached_weight_casts(model: nn.Module, device_type: str) -> Iterator[None]:
    """Under autocast, cast each frozen float32 linear weight to the compute dtype once for the whole run.

    Autocast caches its casts only for weights that require grad; a frozen weight (the base of LoRA, the tied
    output head) is cast again in every forward, a pass over all the model's weights per micro-batch (on a 2-core
    AMX Xeon about 15% of a bf16 LoRA step of the bundled model: torch.profiler over finetune_throughput.py's steps).
    Here a pre-hook swaps in a cached copy for the duration of the layer's forward (the float32 weight stays the
    parameter outside it); a weight changed in place is cast again. The copies are what autocast would keep for
    backward anyway, so the peak does not grow. Not for sharded models (their parameters are shards)."""
    cache: dict[nn.Module, tuple[tuple[int, int], nn.Parameter]] = {}
    saved: dict[nn.Module, nn.Parameter] = {}

    def before(module: nn.Module, args: Any) -> None:
        weight = module._parameters.get("weight")
        if (weight is None or weight.requires_grad or weight.dtype != torch.float32
                or not torch.is_autocast_enabled(device_type)):
            return
        dtype = torch.get_autocast_dtype(device_type)
        key = (weight.data_ptr(), weight._version)
        hit = cache.get(module)
        if hit is None or hit[0] != key or hit[1].dtype != dtype:
            hit = cache[module] = (key, nn.Parameter(weight.detach().to(dtype), requires_grad=False))
        saved[module] = weight
        module._parameters["weight"] = hit[1]

    def after(module: nn.Module, args: Any, output: Any) -> None:
        weight = saved.pop(module, None)
        if weight is not None:
            module._parameters["weight"] = weight

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles += [module.register_forward_pre_hook(before),
                        module.register_forward_hook(after, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, weight in saved.items():
            module._parameters["weight"] = weight
        cache.clear()


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen float32 weights of an adapter run in `dtype`, the 16-bit precision its steps compute in;
    returns the bytes freed.

    Under autocast a frozen float32 weight is only ever read through its 16-bit cast, so its float32 copy buys no
    precision in the matrix products; what it does cost: twice the memory (a 7B base is 28 GB in float32, 14 GB in
    bf16) and a residual stream that stays float32 (on a 2-core AMX Xeon, bf16 LoRA of the bundled model in
    finetune_throughput.py: peak RSS 2.46 -> 1.78 GB, tokens/s 1.02-1.03x, within the VM's noise). Trained
    parameters stay float32 (the optimizer's master weights), and so does
    every frozen parameter of a module that holds a trained one (PEFT's trainable token rows live beside their
    frozen embedding). Float32 buffers (rotary frequencies) stay as they are."""
    freed = 0
    for module in model.modules():
        own = list(module._parameters.values())
        if any(p is not None and p.requires_grad for p in own):
            continue
        for p in own:
            if p is not None and p.dtype == torch.float32:
                before = p.numel() * p.element_size()
                p.data = p.data.to(dtype)
                freed += before - p.numel() * p.element_size()
    return freed


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
