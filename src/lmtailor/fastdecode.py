"""Fast CPU decoding for llama-family models: packed fp16 weights and a lean decode loop.

Decoding one token at batch 1 reads every weight once, so on a CPU its speed is set by the bytes of weights
read per token and by the Python work per layer. `FastCausalLM` halves the first and trims the second:

- weights: every Linear, the output head included, is packed once for fbgemm's fp16 GEMM (fp16 weights,
  fp32 activations and accumulation: the weight rounding is 2^-11 relative, perplexity moves by ~0.1%);
- loop: a preallocated KV cache, q/k/v and gate/up fused into one matmul each, each RMSNorm's weight (and
  sqrt(width)) folded into the matmul after it so that the norm is two small ops, rotary embedding as one
  complex multiply (q and k rows are permuted once so each rotated pair sits side by side: q.k is unchanged
  because both get the same permutation), and the output head run on the last position only.

It reads the weights out of a transformers model and answers the `generate(...)` arguments that lmtailor's
generation and server use, so they run unchanged on it. benchmarks/serve_load.py measures speed and quality
cost against plain fp32 HF `generate`. There is no int8 path here: a hand-written int8 kernel decoded slower
than llama.cpp q8_0 on the same machine (issue 18), so int8 weights are served through llama.cpp
(`lmtailor serve --engine llama.cpp`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.config import check_speedup
from lmtailor.errors import ConfigError

FAST = ("fp16",)  # the speed-ups served by FastCausalLM
ARCHS = ("llama", "mistral", "qwen2")  # pre-norm, rotary, SiLU-gated MLP decoders with the same weight names
# Rotary variants whose frequencies depend only on the position (HF's rotary module computes them once here).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def speed_up(model: nn.Module, how: str) -> nn.Module:
    """Apply a CPU decoding speed-up to a loaded causal LM.

    Args:
        model: a transformers causal LM, or a PeftModel with LoRA adapters (merged into the weights first).
        how: "none"; "fp16": a `FastCausalLM` with packed fp16 weights (see the module docstring);
            "bf16": bf16 weights decoded by HF `generate`.

    Returns:
        The model to decode with (the input model's weights may be shared or merged in place).

    Raises:
        ConfigError: an unknown or removed speed-up (int8), or a model the fast path does not handle.
    """
    check_speedup(how)
    if how == "none":
        return model
    if how == "bf16":
        return model.to(torch.bfloat16)
    return FastCausalLM(_merged(model, how), how)


def _merged(model: nn.Module, how: str) -> nn.Module:
    """A PeftModel with its LoRA adapters merged into the weights; any other model as it is."""
    peft = getattr(model, "peft_config", None)
    if peft is None:
        return model
    if any(c.peft_type != "LORA" for c in peft.values()):
        raise ConfigError(f"speedup={how} needs adapters that merge into the weights (LoRA)",
                          "serve this run with --speedup none")
    return model.merge_and_unload()  # type: ignore[operator,no-any-return]


class PackedLinear:
    """y = x W^T + b with W packed once for fbgemm's fp16 GEMM (fast batch-1 CPU matmuls)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach().float().contiguous()  # (N, K)
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)  # type: ignore[no-any-return]

    def dequantize(self) -> torch.Tensor:
        """The weight actually applied, in fp32 (N, K)."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0].half().float()  # type: ignore[no-any-return]


def _pairs_adjacent(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Permute each head's output rows from (i, i + d/2) rotary pairs (HF's rotate_half) to (2i, 2i + 1)."""
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(heads * head_dim, *w.shape[1:])


def _check(model: Any, how: str) -> Any:
    cfg: Any = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    hint = "use --speedup none (or bf16), or serve a llama, mistral or qwen2 model"
    if kind not in ARCHS or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        raise ConfigError(f"speedup={how} handles {', '.join(ARCHS)} decoders; this model is {kind}", hint)
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"speedup={how} needs a SiLU MLP; this model uses {cfg.hidden_act}", hint)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        raise ConfigError(f"speedup={how} handles rotary types {', '.join(ROPE_TYPES)}; this model uses "
                          f"{rope.get('rope_type', rope.get('type'))}", hint)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise ConfigError(f"speedup={how} has no sliding-window attention (this model's window: {window})", hint)
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError(f"speedup={how} is a CPU path; this model is on {next(model.parameters()).device}",
                          "use --speedup none on a GPU")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"speedup={how} needs torch's fbgemm kernels (x86 CPUs)", "use --speedup none or bf16")
    return cfg


class _Layer:
    """One decoder block's weights, packed."""

    def __init__(self, block: Any, heads: int, kv_heads: int, head_dim: int) -> None:
        attn, mlp = block.self_attn, block.mlp
        norm1, norm2 = _norm_scale(block.input_layernorm), _norm_scale(block.post_attention_layernorm)

        def rows(name: str, n: int, permute: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            lin = getattr(attn, name)
            w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
            if permute:
                w, b = _pairs_adjacent(w, n, head_dim), None if b is None else _pairs_adjacent(b, n, head_dim)
            return w, b

        parts = [rows("q_proj", heads, True), rows("k_proj", kv_heads, True), rows("v_proj", kv_heads, False)]
        self.qkv = PackedLinear(torch.cat([w for w, _ in parts]) * norm1, _cat_bias(parts))
        self.o = PackedLinear(attn.o_proj.weight, attn.o_proj.bias)
        gu = [(mlp.gate_proj.weight, mlp.gate_proj.bias), (mlp.up_proj.weight, mlp.up_proj.bias)]
        self.gate_up = PackedLinear(torch.cat([w for w, _ in gu]) * norm2, _cat_bias(gu))
        self.down = PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias)
        self.inter = mlp.gate_proj.weight.shape[0]


def _norm_scale(norm: Any) -> torch.Tensor:
    """An RMSNorm's weight times sqrt(width), to fold into the next matmul's input columns (see _unit)."""
    w = norm.weight.detach().float()
    return w * w.numel() ** 0.5


def _cat_bias(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    if all(b is None for _, b in parts):
        return None
    return torch.cat([torch.zeros(w.shape[0]) if b is None else b.detach().float() for w, b in parts])


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != before:
            torch.set_num_threads(before)


class FastCausalLM(nn.Module):
    """A llama-family causal LM rebuilt for CPU decoding with packed weights (see the module docstring).

    Only the token embedding stays a Parameter (fp32, for lookup); the HF model can be dropped after building.
    `generate` runs on `threads` torch threads (0: the caller's setting). One by default: a decoding step is
    memory-bound and made of small ops, and idle OpenMP workers only spin on a busy machine.
    """

    def __init__(self, model: Any, how: str = "fp16", threads: int = 1) -> None:
        super().__init__()
        if check_speedup(how) not in FAST:
            raise ConfigError(f"speedup={how} is not a FastCausalLM packing ({', '.join(FAST)})",
                              "use speed_up(model, how)")
        cfg = _check(model, how)
        self.config, self.how, self.threads = cfg, how, threads
        self.generation_config = getattr(model, "generation_config", None)  # EOS / pad defaults, as in HF
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # RMSNorm(x) = g * x / sqrt(mean(x^2) + eps) = (g * sqrt(D)) * x / hypot(|x|, sqrt(D * eps)).
        self.norm_floor = torch.tensor((cfg.hidden_size * float(cfg.rms_norm_eps)) ** 0.5)
        inner = model.model
        self.embed = nn.Parameter(inner.embed_tokens.weight.detach().float(), requires_grad=False)  # (V, D)
        self.layers = [_Layer(b, self.heads, self.kv_heads, self.head_dim) for b in inner.layers]
        head = model.lm_head
        self.head = PackedLinear(head.weight * _norm_scale(inner.norm), head.bias)
        self.max_positions = int(cfg.max_position_embeddings)
        # Rotary factors of every position as complex numbers, taken from the model's own rotary module.
        with torch.no_grad():
            pos = torch.arange(self.max_positions)[None]
            cos, sin = inner.rotary_emb(self.embed[:1].float(), pos)  # (1, P, head_dim), halves repeated
        half = self.head_dim // 2
        self.rotary = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())  # (P, head_dim/2)

    # ---- forward -------------------------------------------------------------------------------------------

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight and sqrt(D), both folded into the next matmul: two ops instead of eight."""
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.norm_floor)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, start: int, cache: list[tuple[torch.Tensor, ...]],
              mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Run `ids` (B, T) through the blocks, writing K/V at cache columns start..start+T; returns (B, T, D).

        positions: (B, T) rotary positions; mask: (B, 1, T, start+T) bool of visible keys, or None for all
        (with `causal` for a prompt of several tokens).
        """
        b, t = ids.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        rot = self.rotary[positions][:, :, None]  # (B, T, 1, d/2)
        end = start + t
        x = F.embedding(ids, self.embed)  # (B, T, D)
        for layer, (kc, vc) in zip(self.layers, cache, strict=True):
            y = layer.qkv(self._unit(x)).view(b, t, h + 2 * kv, d)
            qk = torch.view_as_complex(y[:, :, :h + kv].reshape(b, t, h + kv, d // 2, 2)) * rot
            qk = torch.view_as_real(qk).flatten(3)  # (B, T, h + kv, d)
            kc[:, :, start:end] = qk[:, :, h:].transpose(1, 2)  # cache: (B, kv, S, d)
            vc[:, :, start:end] = y[:, :, h + kv:].transpose(1, 2)
            att = F.scaled_dot_product_attention(qk[:, :, :h].transpose(1, 2), kc[:, :, :end], vc[:, :, :end],
                                                 attn_mask=mask, is_causal=causal and mask is None,
                                                 enable_gqa=True)  # (B, h, T, d)
            x = x + layer.o(att.transpose(1, 2).reshape(b, t, h * d))
            g = layer.gate_up(self._unit(x))  # (B, T, 2I)
            x = x + layer.down(F.silu(g[..., :layer.inter]) * g[..., layer.inter:])
        return self._unit(x)  # the final norm's weight is folded into the head

    def _cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, ...]]:
        # Columns are written before they are read; padded columns are masked: no need to zero them.
        shape = (batch, self.kv_heads, length, self.head_dim)
        return [(torch.empty(shape), torch.empty(shape)) for _ in self.layers]

    def _prompt(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, length: int
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor | None]:
        """Prefill: (hidden states (B, T, D), cache, next rotary position (B,), key mask (B, S) or None)."""
        b, t = ids.shape
        if length > self.max_positions:
            raise ValueError(f"prompt + new tokens = {length} exceeds the model's {self.max_positions} positions")
        cache = self._cache(b, length)
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(t).expand(b, t)
            return self._step(ids, positions, 0, cache, None, True), cache, torch.full((b,), t), None
        keys = torch.ones(b, length, dtype=torch.bool)
        keys[:, :t] = attention_mask.bool()
        # HF's left-padding positions: count of real tokens before each one.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        # A padding query sees itself too, so that its softmax has one finite entry (no NaN in the cache).
        mask = (causal & keys[:, None, :t]) | torch.eye(t, dtype=torch.bool)  # (B, T, T)
        hidden = self._step(ids, positions, 0, cache, mask[:, None], False)
        return hidden, cache, attention_mask.long().sum(-1), keys

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **unused: Any) -> Any:
        """Logits of every position (B, T, V), as `.logits` like a transformers model (for perplexity)."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden, _, _, _ = self._prompt(input_ids, attention_mask, input_ids.shape[1])
        return CausalLMOutputWithPast(logits=self.head(hidden))

    # ---- decoding ------------------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Decode like HF `generate` (see `_generate` for the arguments); returns (B, T + n) token ids."""
        with _torch_threads(self.threads):
            return self._generate(input_ids, **kwargs)

    @torch.inference_mode()
    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False,
                  temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  repetition_penalty: float | None = None, pad_token_id: int | None = None,
                  eos_token_id: int | list[int] | None = None, stopping_criteria: Any = None,
                  stop_strings: str | list[str] | None = None, tokenizer: Any = None, streamer: Any = None,
                  cache_implementation: str | None = None) -> torch.Tensor:
        """Decode like HF `generate` for the arguments lmtailor passes; returns prompt + new tokens (B, T + n).

        Rows left-padded by `attention_mask`; a row that ends (EOS or a stopping criterion) is padded with
        `pad_token_id` from then on, and decoding stops when every row has ended or after max_new_tokens.
        `cache_implementation` is accepted and ignored: the cache here is always preallocated.
        """
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        b, t = input_ids.shape
        defaults = self.generation_config
        if eos_token_id is None and defaults is not None:
            eos_token_id = defaults.eos_token_id
        if pad_token_id is None and defaults is not None:
            pad_token_id = defaults.pad_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        procs = LogitsProcessorList()
        if repetition_penalty is not None and repetition_penalty != 1.0:
            # As HF: a row's left padding is not a repetition.
            padding = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)
            procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=padding))
        if do_sample:
            if temperature is not None and temperature != 1.0:
                procs.append(TemperatureLogitsWarper(temperature))
            if top_k:
                procs.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p))
        stops = list(stopping_criteria or [])
        if stop_strings:
            from transformers.generation.stopping_criteria import StopStringCriteria

            stops.append(StopStringCriteria(tokenizer, stop_strings))
        eos_t = torch.tensor(eos, dtype=torch.long)

        out = torch.full((b, t + max_new_tokens), pad, dtype=torch.long)  # (B, T + n)
        out[:, :t] = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        hidden, cache, position, keys = self._prompt(input_ids, attention_mask, t + max_new_tokens)
        logits = self.head(hidden[:, -1])  # (B, V)
        running = torch.ones(b, dtype=torch.bool)
        n = 0
        while True:
            if n < min_new_tokens and eos:  # HF's MinNewTokensLengthLogitsProcessor, without its per-step arange
                logits[:, eos_t] = float("-inf")
            scores = procs(out[:, :t + n], logits)  # type: ignore[arg-type]
            # (B,)
            nxt = torch.multinomial(F.softmax(scores, dim=-1), 1).squeeze(1) if do_sample else scores.argmax(-1)
            nxt = torch.where(running, nxt, pad)
            out[:, t + n] = nxt
            n += 1
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos:  # (torch.isin takes 0.25 ms here)
                running &= ~(nxt[:, None] == eos_t).any(-1)
            for stop in stops:
                running &= ~stop(out[:, :t + n], scores)
            if n >= max_new_tokens or not bool(running.any()):
                break
            col = t + n - 1  # the new token's cache column
            mask = None if keys is None else keys[:, None, None, :col + 1]  # (B, 1, 1, S)
            hidden = self._step(nxt[:, None], position[:, None], col, cache, mask, False)
            position = position + 1
            logits = self.head(hidden[:, -1])
        if streamer is not None:
            streamer.end()
        return out[:, :t + n]
