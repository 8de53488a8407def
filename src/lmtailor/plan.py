"""`lmtailor plan`: what a model needs to fine-tune on given GPUs, per method, before anything is downloaded.

For a decoder of the llama family (llama, mistral, qwen2, smollm) it counts parameters from the config and adds up
memory per process: weights, gradients and optimizer state (sharded over the GPUs with FSDP), and activations per
micro-batch (counted from what autograd keeps per decoder block, at the moment of the step that holds the
peak), which decide the largest micro-batch that fits. Throughput is estimated from the FLOPs per token
(6 x parameters for full fine-tuning, 4 x for frozen weights, +2 x with checkpointing) at a stated share of the
GPU's peak. The byte counts follow what `lmtailor train` does: float32 master weights with dtype auto, AdamW with
two float32 moments (one byte each with optimizer=adamw_8bit), a bf16 copy of trained weights cached by autocast,
NF4 at 0.5 byte + a scale per 64 weights for qlora, and on one GPU with bf16 the frozen base of LoRA and QLoRA in
bf16. tests/test_plan_memory.py checks the estimate against the
live tensors of real CPU steps, `benchmarks/plan_accuracy.py` against the resident set of `lmtailor train` runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
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
NO_BF16 = {"T4", "V100"}  # fp16 with loss scaling: their frozen weights stay float32 (memory.store_frozen_in)

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


F32 = 4  # bytes of a float32 value: norms, the residual stream, log-sum-exp and the loss run in float32 always


@dataclass
class Estimate:
    """Bytes per process of one method: weights, gradients and optimizer state, and the live memory of one
    training step, which grows with the micro-batch.

    `phases` walks the step (see `step_phases`): each is (bytes, bytes per sequence) above weights and optimizer
    state at one moment; the peak is the largest of them, so `peak(micro_batch)` is exact for any micro-batch."""

    method: str
    checkpointing: bool
    total_params: int
    trainable_params: int
    weights: float
    gradients: float
    optimizer: float
    activations_per_seq: float  # what the backward pass keeps per sequence (plus the loss's transients)
    fixed: float = 0.0  # weights + gradients + optimizer state
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # (moment, bytes, bytes per sequence)
    overhead: float = 0.0  # what the process adds beyond tensors (the CPU estimate of run_estimate)

    def peak(self, micro_batch: int) -> float:
        base = self.weights + self.optimizer + self.overhead
        if not self.phases:
            return self.fixed + micro_batch * self.activations_per_seq
        return base + max(b + micro_batch * per for _, b, per in self.phases)

    def peak_moment(self, micro_batch: int) -> str:
        """The moment of the step (a phase's name) that holds the peak."""
        return max(self.phases, key=lambda p: p[1] + micro_batch * p[2])[0] if self.phases else ""

    def largest_micro_batch(self, budget: float) -> int:
        """The largest micro-batch whose peak fits `budget` bytes (0: not even one sequence)."""
        room = budget - self.weights - self.optimizer - self.overhead
        fits = [math.floor((room - b) / per) if per > 0 else (math.inf if room >= b else -1)
                for _, b, per in self.phases]
        best = min(fits) if fits else -1
        return 0 if best < 1 else int(min(best, 1 << 20))


def block_bytes(s: Shape, trains: str, *, half: bool = False, lora_r: int = 16, seq_len: int = 0,
                attention_matrix: bool = False, first: bool = False, packed: bool = False,
                float_mlp: bool = False) -> float:
    """Bytes per token that autograd keeps for the backward pass of one decoder block (llama family, SDPA).

    Counted from what each op saves, and checked tensor by tensor by benchmarks/plan_census.py:
    - each RMSNorm keeps its float32 input and 1/rms, and, where its weight trains, the normalized values; the
      projections reading its weighted output keep that output (one shared tensor in float32; under 16-bit
      autocast each projection keeps its own cast);
    - attention keeps q and k after the rotary embedding, v, its output (which o_proj reads) and a float32
      log-sum-exp per head; fused attention (SDPA, also on CPU) keeps no seq x seq matrix, eager attention keeps
      its probabilities (`attention_matrix`);
    - the SwiGLU MLP keeps gate, silu(gate), up and their product (the product only where down_proj trains);
    - LoRA's A of q, k, v, o keeps its input and B its r-wide input.
    `trains`: "all" (full fine-tuning, the unfrozen blocks of freeze), "lora" (frozen base and norms: frozen
    linears keep no inputs) or "none" (a frozen block below every trainable one keeps nothing). `first`: the block's
    input needs no gradient (the first block under LoRA or freeze), so its first norm keeps nothing of it.
    `packed`: packed rows on CPU, attended example by example (objectives/attention.py): each example's output is
    kept apart from the row's, and under bf16 autocast attention runs in float32 (q, k and v kept in float32, and
    the output cast back for o_proj): 4h bytes more per token in float32, 4kv + 6h (full) or 4kv + 4h (LoRA) in bf16,
    as counted tensor by tensor in tests/test_plan_memory.py.
    `float_mlp`: a 4-bit (bitsandbytes) base over a float32 residual stream under 16-bit autocast (QLoRA under fp16,
    whose frozen weights stay float32): its linear layers return their input's dtype, float32, so the MLP's gate,
    silu(gate) and up are kept in float32. Under bf16 the frozen weights are bf16 (memory.store_frozen_in), the
    residual stream too, and QLoRA keeps what LoRA keeps.
    """
    if trains == "none":
        return 0.0
    h, kv, i, a = s.hidden, s.kv_dim, s.intermediate, (2 if half else F32)
    attention = a * (2 * h + 2 * kv) + F32 * s.heads + (a * s.heads * seq_len if attention_matrix else 0)
    if packed:
        attention += (4 * kv + (6 if trains == "all" else 4) * h) if half else F32 * h
    if trains == "all":
        norms = 2 * F32 * (2 * h + 1) + a * h * (5 if half else 2)  # casts: q, k, v and gate, up
        block = norms + attention + a * 4 * i
    else:
        # o's LoRA A keeps its input cast back from float32 under autocast; in float32 it is attention's output
        norms = 2 * F32 * (h + 1) + a * h * (4 if half else 1)
        block = norms + attention + (F32 if float_mlp else a) * 3 * i + a * 4 * lora_r
    return block - (F32 * (h + 1) if first else 0)


def step_phases(s: Shape, method: str, checkpointing: bool, seq_len: int, *, half: bool, lora_r: int = 16,
                supervised: float = 1.0, unfreeze_last_n: int = 2, attention_matrix: bool = False,
                accumulating: bool = False, optimizer_temp: float = 0.0, gradients: float = 0.0,
                head_trains: bool = True, copies: float = 0.0, packed: bool = False,
                float_mlp: bool = False) -> list[tuple[str, float, float]]:
    """The moments of one training step that can hold its peak: (moment, bytes, bytes per sequence).

    Bytes above weights and optimizer state. In order: the loss's backward (every saved activation, and the
    float32 log-softmax of the supervised positions with its gradient and the NLL's: three vocabulary-wide rows
    each), the output head's backward (its weight's gradient arrives), each block's backward top down (the blocks
    below keep their activations, or only their inputs with checkpointing, while this one holds its full set,
    recomputed with checkpointing, and the gradients of its MLP in flight; the gradients of the blocks above have
    arrived), and the optimizer step (every gradient, and AdamW's temporaries). With gradient accumulation the
    later micro-batches run with every gradient already there. `copies`: 16-bit copies of the weights that
    autocast makes in forward and backward keeps."""
    h, a, t = s.hidden, (2 if half else F32), seq_len
    trains = {"full": "all", "freeze": "all", "lora": "lora", "qlora": "lora"}[method]
    trainable_blocks = unfreeze_last_n if method == "freeze" else s.layers
    frozen_below = s.layers - trainable_blocks
    full = [block_bytes(s, trains if k >= frozen_below else "none", half=half, lora_r=lora_r, seq_len=t,
                        attention_matrix=attention_matrix, first=(k == frozen_below and method != "full"),
                        packed=packed, float_mlp=float_mlp)
            for k in range(s.layers)]
    kept = [(F32 * h if checkpointing and b else b) for b in full]  # a checkpointed block keeps its input
    sup = supervised * t
    # outside the blocks: rotary cos and sin; the final norm (input, 1/rms, normalized values where it trains);
    # per supervised position the head's input (where the head trains) and the float32 log-softmax
    outside = 2 * F32 * (h // s.heads) + F32 * (h + 1) + (F32 * h if trains == "all" else 0)
    head_in = a * h if head_trains and trains == "all" else 0
    log_softmax = F32 * s.vocab
    acc = gradients if accumulating else 0.0
    head_grad = 0.0 if accumulating or not head_trains else F32 * s.vocab * h
    block_grad = 0.0 if accumulating else (gradients - head_grad) / max(trainable_blocks, 1)
    phases = [("loss backward", acc + copies, t * (sum(kept) + outside) + sup * (head_in + 3 * log_softmax)),
              ("head backward", acc + copies + head_grad, t * (sum(kept) + outside) + sup * (log_softmax + F32 * h))]
    # gradients of the MLP's values (float32 with float_mlp) and of the residual stream
    transient = (F32 if float_mlp else a) * 3 * s.intermediate + F32 * 2 * h
    for k in reversed(range(frozen_below, s.layers)):
        above = s.layers - 1 - k
        phases.append((f"block {k} backward", acc + copies * (k + 1) / s.layers + head_grad + (above + 1) * block_grad,
                       t * (sum(kept[:k]) + full[k] + transient + outside)))
    phases.append(("optimizer step", gradients + optimizer_temp, 0.0))
    return phases


def estimate(s: Shape, method: str, checkpointing: bool, seq_len: int, *, gpus: int = 1, master_bytes: int = 4,
             act_bytes: int = 2, lora_r: int = 16, optimizer_bytes: int = 8, unfreeze_last_n: int = 2,
             autocast_copy: bool = True, supervised: float = 1.0, attention_matrix: bool = False,
             accumulating: bool = False, device: str = "cuda", optimizer: str = "adamw", packed: bool = False,
             frozen_bytes: int | None = None) -> Estimate:
    """Memory of `method` per GPU; weights, gradients and optimizer state are split over `gpus` (FSDP).

    `act_bytes` 2: 16-bit autocast over float32 master weights (dtype auto on a GPU), 4: float32.
    `frozen_bytes`: bytes per frozen weight of LoRA and QLoRA (the base beside the adapters): 2 where a run keeps
    them in bf16 (memory.store_frozen_in: bf16 mixed precision, unsharded), else `master_bytes`.
    `device` "cpu" or "cuda" chooses AdamW's implementation (one tensor at a time on CPU, all at once on CUDA),
    whose temporaries differ."""
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
    half = act_bytes == 2
    linear = s.layers * s.layer_linear()
    frozen = master_bytes if frozen_bytes is None or method not in ("lora", "qlora") else frozen_bytes
    if method == "qlora":  # the blocks' linear weights in NF4 (0.5 byte + a float32 scale per 64), the rest as is
        weights = linear * (0.5 + 4 / 64) + (total - linear) * frozen + trainable * master_bytes
    elif method == "lora":  # the adapters come on top of the base
        weights = total * frozen + trainable * master_bytes
    else:  # freeze and full train weights of the model itself
        weights = total * master_bytes
    grads = trainable * master_bytes
    opt = trainable * optimizer_bytes
    # autocast's 16-bit copies of the float32 weights the matrix products read (the head's too), kept for backward;
    # NF4 weights are dequantized one layer at a time instead; a 16-bit frozen base needs none (the adapters' own)
    if not (autocast_copy and half):
        copies = 0.0
    elif frozen == 2:
        copies = 2.0 * trainable
    else:
        copies = 2 * (linear * (method != "qlora") + s.vocab * s.hidden)
    if optimizer_bytes != 8:
        temp = 0.0  # bitsandbytes' 8-bit AdamW updates in one fused kernel
    elif device == "cpu":  # single-tensor AdamW: sqrt of the second moment, then its quotient, one parameter at a time
        largest = s.vocab * s.hidden if method in ("full",) or (method == "freeze" and not s.tied) else (
            max(s.hidden, s.intermediate) * s.hidden if method == "freeze" else max(s.hidden, s.intermediate) * lora_r)
        temp = 2 * master_bytes * largest
    else:  # foreach AdamW on CUDA: the square roots of every second moment at once
        temp = trainable * master_bytes
    head_trains = method == "full" or (method == "freeze" and not s.tied)
    phases = step_phases(s, method, checkpointing, seq_len, half=half, lora_r=lora_r, supervised=supervised,
                         unfreeze_last_n=unfreeze_last_n, attention_matrix=attention_matrix,
                         accumulating=accumulating, optimizer_temp=temp / gpus, gradients=grads / gpus,
                         head_trains=head_trains, copies=copies / gpus, packed=packed and device == "cpu",
                         float_mlp=method == "qlora" and half and frozen != 2)
    per_seq = phases[0][2]
    fixed = (weights + grads + opt) / gpus
    return Estimate(method, checkpointing, total, trainable, weights / gpus, grads / gpus, opt / gpus, per_seq,
                    fixed, phases)


# What a CPU training process adds to its resident set beyond live tensors (see run_estimate).
PROCESS_CODE = 20 * 2**20  # the kernels' code and data paged in by the first forward, backward and optimizer step


def run_estimate(s: Shape, method: str, checkpointing: bool, seq_len: int, micro_batch: int, *,
                 mixed_precision: str = "no", lora_r: int = 16, optimizer: str = "adamw", supervised: float = 1.0,
                 attention_matrix: bool = False, accumulating: bool = False, device: str = "cpu",
                 packed: bool = False) -> float:
    """Peak bytes one `lmtailor train` process adds for this run (what its metrics.json `peak_memory_mib` measures):
    float32 weights, gradients and optimizer state, and the peak of one micro-batch's step (`step_phases`), with
    activations in float32 without mixed precision (CPU) or bf16/fp16 with it (plus the autocast copies).
    `packed`: `seq_len` is a packed row (see block_bytes), padded to a multiple of 64 under CPU bf16.
    On CPU the resident set is what runs out: the kernels' code paged in by the first step comes on top."""
    half = mixed_precision in ("bf16", "fp16")
    if packed and half and device == "cpu":  # bf16 packed rows are padded to a multiple of 64 (objectives/causal.py)
        seq_len = 64 * math.ceil(seq_len / 64)
    e = estimate(s, method, checkpointing, seq_len, act_bytes=2 if half else 4, lora_r=lora_r,
                 optimizer_bytes=2 if optimizer == "adamw_8bit" else 8, autocast_copy=half, supervised=supervised,
                 attention_matrix=attention_matrix, accumulating=accumulating, device=device, packed=packed,
                 frozen_bytes=2 if mixed_precision == "bf16" else None)
    # glibc's retained free pages are not counted: a run with release_memory=true gives them back (plan within 3-6%
    # at the plan_accuracy sizes), one with the default keeps 14-35% more (see memory.release_freed_memory)
    if device == "cpu":
        e.overhead = float(PROCESS_CODE)
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
                         optimizer_bytes=2 if optimizer == "adamw_8bit" else 8,
                         frozen_bytes=2 if count == 1 and gpu_name not in NO_BF16 else None)
            fits = e.largest_micro_batch(budget)
            flops_per_token = (6 if method == "full" else 4 if method != "freeze" else 4.5) * e.total_params
            if ckpt:
                flops_per_token += 2 * e.total_params
            tokens_s = count * utilisation * tflops * 1e12 / flops_per_token if fits else 0.0
            row = {k: v for k, v in asdict(e).items() if k != "phases"}
            rows.append({**row, "max_micro_batch": fits, "peak_at_max": e.peak(max(fits, 1)),
                         "peak_moment": e.peak_moment(max(fits, 1)), "tokens_per_s": tokens_s})
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
                 "activations per sequence; bf16 compute over float32 master weights (dtype auto), LoRA's and "
                 "QLoRA's frozen base in bf16 on one GPU with bf16")
    return "\n".join(lines)
