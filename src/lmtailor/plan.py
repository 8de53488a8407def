"""`lmtailor plan`: what a model needs to fine-tune on given GPUs, per method, before anything is downloaded.

For a decoder of the llama family (llama, mistral, qwen2, smollm) it counts parameters from the config and adds up
memory per process: weights, gradients and optimizer state (sharded over the GPUs with FSDP), and activations per
micro-batch, which decide the largest micro-batch that fits. Throughput is estimated from the FLOPs per token
(6 x parameters for full fine-tuning, 4 x for frozen weights, +2 x with checkpointing) at a stated share of the
GPU's peak. The byte counts follow what `lmtailor train` does: float32 master weights with dtype auto, AdamW with
two float32 moments (one byte each with optimizer=adamw_8bit), a bf16 copy of trained weights cached by autocast,
NF4 at 0.5 byte + a scale per 64 weights for qlora. `benchmarks/scaling.py` checks the estimate against the peak
memory of real CPU steps.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmtailor.errors import ConfigError, LmtailorError

GIB = 1024 ** 3
RESERVE = 1.5 * GIB  # CUDA context, allocator fragmentation and workspace, per GPU

# Built in so that `plan` works offline: config.json fields that matter for memory.
FAMILIES: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                 tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                                 num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                                                 tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                                 tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True, attention_bias=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True, attention_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False, attention_bias=True),
    "meta-llama/Llama-3.2-1B-Instruct": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B-Instruct": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             tie_word_embeddings=False),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                               tie_word_embeddings=False),
}
ALIASES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# Dense bf16 peak TFLOP/s (fp16 for GPUs without bf16) of GPUs a --gpus spec may name.
GPUS: dict[str, tuple[float, float]] = {  # name -> (GiB, TFLOP/s)
    "H200": (141, 989), "H100": (80, 989), "A100-80GB": (80, 312), "A100": (40, 312), "L40S": (48, 362),
    "A6000": (48, 155), "L4": (24, 121), "RTX4090": (24, 165), "A10": (24, 125), "RTX3090": (24, 71),
    "T4": (16, 65), "V100": (16, 125),
}
DEFAULT_TFLOPS = 100.0  # a GPU named only by its memory

METHODS = ("full", "freeze", "lora", "qlora")


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_linear(self) -> int:
        """Weights of one block's linear layers (q, k, v, o, gate, up, down)."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate

    def params(self) -> int:
        h = self.hidden
        per_layer = self.layer_linear() + 2 * h + ((h + 2 * self.kv_dim) if self.bias else 0)
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def lora_params(self, r: int, all_linear: bool = False) -> int:
        """LoRA A and B of q, k, v, o (the default targets) or of every linear layer of every block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per = r * ((h + h) * 2 + (h + kv) * 2)
        if all_linear:
            per += r * 3 * (h + i)
        return self.layers * per


def shape_of(config: dict[str, Any]) -> Shape:
    try:
        heads = int(config["num_attention_heads"])
        return Shape(hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                     layers=int(config["num_hidden_layers"]), heads=heads,
                     kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
                     tied=bool(config.get("tie_word_embeddings", False)),
                     bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2")
    except KeyError as e:
        raise ConfigError(f"the model config lacks {e.args[0]}", "plan knows decoder models of the llama family "
                          "(llama, mistral, qwen2, smollm)") from None


def model_shape(name: str) -> tuple[Shape, str]:
    """(shape, where it came from): a built-in family, a local folder's config.json, or the hub's."""
    name = ALIASES.get(name, name)
    if name in FAMILIES:
        return shape_of(FAMILIES[name]), "built in"
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return shape_of(json.loads((path / "config.json").read_text())), str(path / "config.json")
    from lmtailor.models import load_model_config

    try:
        cfg = load_model_config(name)
    except LmtailorError as e:
        raise ConfigError(f"cannot read the config of {name}: {e.message}",
                          "give a local model folder, or one of the built-in families: " + ", ".join(FAMILIES)) from e
    return shape_of(cfg.to_dict()), "hub config.json"


def parse_gpus(spec: str) -> tuple[int, float, float, str]:
    """'1x24GB', '8xH100', '2xA100-80GB' -> (count, GiB each, peak TFLOP/s each, name)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*([\w.-]+?)\s*", spec)
    if not m:
        raise ConfigError(f"--gpus {spec!r} is not COUNTxGPU", "write e.g. 1x24GB, 8xH100 or 2xA100-80GB")
    count, what = int(m.group(1)), m.group(2)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*G(i?B)?", what, re.IGNORECASE)
    if size:
        return count, float(size.group(1)), DEFAULT_TFLOPS, f"{what} GPU"
    known = {k.lower(): k for k in GPUS}
    key = known.get(what.lower())
    if key is None:
        raise ConfigError(f"--gpus: unknown GPU {what!r}", "name its memory (1x24GB) or one of " + ", ".join(GPUS))
    return count, GPUS[key][0], GPUS[key][1], key


@dataclass
class Estimate:
    """Bytes per process of one method; activations per sequence of seq_len tokens."""

    method: str
    checkpointing: bool
    total_params: int
    trainable_params: int
    weights: float
    gradients: float
    optimizer: float
    activations_per_seq: float
    fixed: float = 0.0  # weights + gradients + optimizer (+ autocast copies)

    def peak(self, micro_batch: int) -> float:
        return self.fixed + micro_batch * self.activations_per_seq


def activation_bytes(s: Shape, seq_len: int, act_bytes: int, checkpointing: bool, supervised: float = 1.0,
                     attention_matrix: bool = False) -> float:
    """Memory the backward pass keeps per sequence of seq_len tokens.

    Per block and token: about 18 x hidden + 6 x kv_dim + 5 x intermediate values (the norms' float32
    intermediates, q/k/v before and after the rotary embedding, the attention output, the MLP's gate, up, their
    activation and product), plus heads x seq_len attention probabilities where attention is not fused
    (`attention_matrix`, e.g. on CPU). With checkpointing only each block's input is kept, plus one block
    recomputed. The output head's logits on the supervised positions come on top in float32, four copies of
    vocabulary width (logits, log-softmax and their gradients). Coefficients measured on the 21M model of
    benchmarks/scaling.py; its other sizes check them."""
    per_token_layer = (18 * s.hidden + 6 * s.kv_dim + 5 * s.intermediate
                       + (s.heads * seq_len if attention_matrix else 0)) * act_bytes
    layers = (s.layers * s.hidden * act_bytes + per_token_layer) if checkpointing else s.layers * per_token_layer
    logits = 4 * 4 * s.vocab * supervised
    return seq_len * (layers + logits + 4 * s.hidden)


def estimate(s: Shape, method: str, checkpointing: bool, seq_len: int, *, gpus: int = 1, master_bytes: int = 4,
             act_bytes: int = 2, lora_r: int = 16, optimizer_bytes: int = 8, unfreeze_last_n: int = 2,
             autocast_copy: bool = True, supervised: float = 1.0, attention_matrix: bool = False) -> Estimate:
    """Memory of `method` per GPU; weights, gradients and optimizer state are split over `gpus` (FSDP)."""
    total = s.params()
    if method == "full":
        trainable = total
    elif method == "freeze":
        per_layer = s.layer_linear() + 2 * s.hidden
        trainable = unfreeze_last_n * per_layer + s.hidden + (0 if s.tied else s.vocab * s.hidden)
    elif method in ("lora", "qlora"):
        trainable = s.lora_params(lora_r)
    else:
        raise ConfigError(f"plan: unknown method {method!r}", "allowed values are " + ", ".join(METHODS))
    if method == "qlora":  # the blocks' linear weights in NF4 (0.5 byte + a float32 scale per 64), the rest as is
        linear = s.layers * s.layer_linear()
        weights = linear * (0.5 + 4 / 64) + (total - linear) * master_bytes + trainable * master_bytes
    else:  # LoRA adapters come on top of the base; freeze and full train weights of the model itself
        weights = (total + (trainable if method == "lora" else 0)) * master_bytes
    grads = trainable * master_bytes
    opt = trainable * optimizer_bytes
    copies = trainable * 2 if autocast_copy and act_bytes == 2 else 0  # bf16 copies autocast caches
    fixed = (weights + grads + opt + copies) / gpus
    act = activation_bytes(s, seq_len, act_bytes, checkpointing, supervised, attention_matrix)
    return Estimate(method, checkpointing, total, trainable, weights / gpus, grads / gpus, opt / gpus, act, fixed)


def run_estimate(s: Shape, method: str, checkpointing: bool, seq_len: int, micro_batch: int, *,
                 mixed_precision: str = "no", lora_r: int = 16, optimizer: str = "adamw", supervised: float = 1.0,
                 attention_matrix: bool = True) -> float:
    """Peak bytes one `lmtailor train` process adds for this run (what its metrics.json `peak_memory_mib` measures):
    float32 weights, gradients and optimizer state, and the activations of one micro-batch of `seq_len`-token rows,
    in float32 without mixed precision (CPU) or bf16/fp16 with it (plus the autocast copies of trained weights).
    `attention_matrix`: attention keeps its probabilities (CPU, eager); fused kernels on a GPU do not."""
    half = mixed_precision in ("bf16", "fp16")
    e = estimate(s, method, checkpointing, seq_len, act_bytes=2 if half else 4, lora_r=lora_r,
                 optimizer_bytes=2 if optimizer == "adamw_8bit" else 8, autocast_copy=half, supervised=supervised,
                 attention_matrix=attention_matrix)
    return e.peak(micro_batch)


def plan(model: str, gpus: str = "1x24GB", seq_len: int = 2048, utilisation: float = 0.4, lora_r: int = 16,
         optimizer: str = "adamw") -> dict[str, Any]:
    """Every method with and without gradient checkpointing on `gpus`: memory, largest micro-batch, tokens/s."""
    shape, source = model_shape(model)
    count, gib, tflops, gpu_name = parse_gpus(gpus)
    budget = gib * GIB - RESERVE
    rows = []
    for method in METHODS:
        for ckpt in (False, True):
            e = estimate(shape, method, ckpt, seq_len, gpus=count, lora_r=lora_r,
                         optimizer_bytes=2 if optimizer == "adamw_8bit" else 8)
            fits = max(0, math.floor((budget - e.fixed) / e.activations_per_seq)) if budget > e.fixed else 0
            flops_per_token = (6 if method == "full" else 4 if method != "freeze" else 4.5) * e.total_params
            if ckpt:
                flops_per_token += 2 * e.total_params
            tokens_s = count * utilisation * tflops * 1e12 / flops_per_token if fits else 0.0
            rows.append({**asdict(e), "max_micro_batch": fits, "peak_at_max": e.peak(max(fits, 1)),
                         "tokens_per_s": tokens_s})
    return {"model": model, "source": source, "params": shape.params(), "gpus": count, "gpu": gpu_name,
            "gib_per_gpu": gib, "tflops_per_gpu": tflops, "utilisation": utilisation, "seq_len": seq_len,
            "reserve_gib": RESERVE / GIB, "rows": rows}


def render_plan(p: dict[str, Any]) -> str:
    g = 1 / GIB
    lines = [f"{p['model']} ({p['source']}): {p['params'] / 1e9:.2f}B parameters; {p['gpus']} x {p['gpu']} "
             f"({p['gib_per_gpu']:g} GiB, {p['reserve_gib']:g} GiB kept for CUDA), sequences of {p['seq_len']} "
             f"tokens, throughput at {p['utilisation']:.0%} of {p['tflops_per_gpu']:g} TFLOP/s per GPU",
             f"{'method':<8} {'ckpt':<5} {'trainable':>10} {'weights':>8} {'grads':>7} {'optim':>7} "
             f"{'act/seq':>8} {'max micro-batch':>15} {'tokens/s':>9}"]
    for r in p["rows"]:
        lines.append(f"{r['method']:<8} {'yes' if r['checkpointing'] else 'no':<5} "
                     f"{r['trainable_params'] / 1e6:>9.1f}M {r['weights'] * g:>7.1f}G {r['gradients'] * g:>6.1f}G "
                     f"{r['optimizer'] * g:>6.1f}G {r['activations_per_seq'] * g:>7.2f}G "
                     f"{r['max_micro_batch'] if r['max_micro_batch'] else 'does not fit':>15} "
                     f"{r['tokens_per_s']:>9.0f}")
    lines.append("memory per GPU (weights, gradients, optimizer sharded over GPUs with distributed.strategy=fsdp); "
                 "activations per sequence; bf16 compute over float32 master weights (dtype auto)")
    return "\n".join(lines)
