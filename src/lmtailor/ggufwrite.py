"""Write a transformers causal LM and its tokenizer as one GGUF file that llama.cpp (and Ollama) load.

Supported: llama and mistral (GGUF architecture "llama"), qwen2 and phi3; f16 or q8_0 tensors written here
(1-D tensors stay f32, as llama.cpp expects); k-quants are made from an f16 file by llama.cpp's own quantizer
(`lmtailor.llamacpp.quantize`).

The tokenizer is written as llama.cpp's byte-level BPE ("gpt2" model). llama.cpp splits text before BPE with
one of its built-in pre-tokenizers, chosen by the `tokenizer.ggml.pre` tag; the tag is picked here from the HF
tokenizer's own pre-tokenizer (see `pre_tokenizer_tag`), so that both split text the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmtailor import llamacpp
from lmtailor.errors import ModelError
from lmtailor.io import atomic_file

UNSUPPORTED_HINT = "use --format merged and convert with llama.cpp's convert_hf_to_gguf.py"


@dataclass(frozen=True)
class _Arch:
    gguf_arch: str  # llama.cpp's architecture name
    permute_qk: bool  # llama.cpp's llama graph uses interleaved RoPE pairs; HF stores rotate-half order
    tied_output: bool  # llama.cpp falls back to token_embd when output.weight is absent


ARCHS = {
    "llama": _Arch("llama", True, True),
    "mistral": _Arch("llama", True, True),  # llama.cpp's converter writes Mistral as llama as well
    "qwen2": _Arch("qwen2", False, True),  # NeoX-style RoPE in llama.cpp: HF order as is
    "phi3": _Arch("phi3", False, False),  # fused qkv and gate_up tensors map one to one
}


WRITTEN_HERE = ("f16", "q8_0")  # other types come from llama.cpp's quantizer (`llamacpp.QUANT_FTYPES`)


def write_gguf_file(model: nn.Module, tok: Any, out: Path, gguf_type: str = "f16", name: str = "model") -> Path:
    """`write_gguf` for f16/q8_0; any other llama.cpp type by quantizing an f16 file with llama.cpp, atomically."""
    if gguf_type in WRITTEN_HERE:
        return write_gguf(model, tok, out, gguf_type, name=name)
    with atomic_file(out) as tmp:
        f16 = tmp.with_name(tmp.name + ".f16")
        try:
            write_gguf(model, tok, f16, "f16", name=name)
            llamacpp.quantize(f16, tmp, gguf_type)
        finally:
            f16.unlink(missing_ok=True)
    return out


def write_gguf(model: nn.Module, tok: Any, out: Path, gguf_type: str = "f16", name: str = "model") -> Path:
    """Write `model` (llama, mistral, qwen2 or phi3) and its byte-level BPE tokenizer as one GGUF, atomically.

    Raises:
        ModelError: another architecture, RoPE scaling, or a tokenizer llama.cpp would split differently.
    """
    import gguf

    cfg: Any = model.config
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise ModelError(f"GGUF export supports {', '.join(ARCHS)} (llama-architecture family) models; "
                         f"this one is '{cfg.model_type}'", UNSUPPORTED_HINT)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export: RoPE scaling '{rope.get('rope_type')}' is not written by this exporter",
                         UNSUPPORTED_HINT)
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ModelError("GGUF export: partial rotary embeddings are not written by this exporter", UNSUPPORTED_HINT)
    theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    q8 = gguf_type == "q8_0"
    gg_arch = gguf.MODEL_ARCH[arch.gguf_arch.upper()]
    names = gguf.get_tensor_name_map(gg_arch, cfg.num_hidden_layers)
    pre = pre_tokenizer_tag(tok)  # before the file is opened: an unsupported tokenizer leaves nothing behind

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
        # llama.cpp changes how it tokenizes around special tokens (and needs Phi-3's own tokens) when the model's
        # name contains "phi3" or "phi-3"; this tokenizer is exported as it is, so the name must not say so.
        w.add_name(re.sub(r"(?i)phi-?3", "phi_3", name))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.MOSTLY_F16)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        if arch.gguf_arch == "llama" and head_dim != cfg.hidden_size // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        _add_tokenizer(w, tok, cfg.vocab_size, pre)
        state = model.state_dict()
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if tied and not arch.tied_output and "lm_head.weight" not in state:
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
        for key, tensor in state.items():
            if "rotary_emb" in key:
                continue
            if key == "lm_head.weight" and tied and arch.tied_output:
                continue  # token_embd doubles as the output matrix
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ModelError(f"GGUF export: no llama.cpp name for tensor {key} ({cfg.model_type})",
                                 UNSUPPORTED_HINT)
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if arch.permute_qk and key.endswith("self_attn.q_proj.weight"):
                data = _permute(data, n_head, n_head)
            elif arch.permute_qk and key.endswith("self_attn.k_proj.weight"):
                data = _permute(data, n_head, n_kv)
            data = np.ascontiguousarray(data)
            if data.ndim == 1:
                w.add_tensor(gname, data.astype(np.float32))  # norms and biases stay f32
            elif q8 and data.shape[-1] % 32 == 0:
                w.add_tensor(gname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(gname, data.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair (its RoPE kernel layout); transformers undoes this.
    n = n_head_kv if n_head != n_head_kv else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- tokenizer --------------------------------------------------------------------------------------------------

# Marks of the Split regexes of the byte-level tokenizers llama.cpp has a built-in pre-tokenizer for:
# Llama 3 keeps up to three digits together, Qwen2 splits every digit.
_LLAMA3_DIGITS = r"\p{N}{1,3}"
_QWEN2_MARK = r"\p{N}| ?[^\s\p{L}\p{N}]+"


def _spec(tok: Any) -> dict[str, Any]:
    return json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}


def pre_tokenizer_tag(tok: Any) -> str:
    """The `tokenizer.ggml.pre` tag whose built-in llama.cpp pre-tokenizer splits text as `tok` does.

    - GPT-2's regex (ByteLevel with use_regex), with or without every digit split apart first (Digits with
      individual_digits, SmolLM's tokenizer): "smollm" - llama.cpp's tag for the GPT-2 regex after a
      one-digit split, which is also what llama.cpp's converter writes for SmolLM. Without the digit split this
      is the same split only when the vocabulary has no token holding a digit beside another character; when it
      has one, "gpt-2".
    - a Split with Llama 3's regex then ByteLevel without regex: "llama-bpe"; with Qwen2's: "qwen2".
    Anything else is refused, since llama.cpp would tokenize it differently from training.
    """
    spec = _spec(tok)
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps: list[dict[str, Any]] = list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise ModelError("GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen2 / SmolLM style) "
                         f"only; this one is {model.get('type')} with pre-tokenizer {kinds}", UNSUPPORTED_HINT)
    normalizer = spec.get("normalizer") or {}
    # NFC changes no text that is already NFC (nearly all text); llama.cpp does not normalize, so only text in
    # another Unicode normal form would tokenize differently. Any other normalizer is refused.
    if normalizer and normalizer.get("type") != "NFC":
        raise ModelError(f"GGUF export: the tokenizer has a normalizer ({normalizer.get('type')}), "
                         "which llama.cpp's byte-level BPE does not apply", UNSUPPORTED_HINT)
    level = steps[kinds.index("ByteLevel")]
    if kinds == ["ByteLevel"] and level.get("use_regex", True) and not level.get("add_prefix_space"):
        vocab = tok.get_vocab()
        digit_mixed = any(len(t) > 1 and re.search(r"\d", t) for t in vocab if t not in _added(spec))
        return "gpt-2" if digit_mixed else "smollm"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and level.get("use_regex", True)
            and not level.get("add_prefix_space")):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if _LLAMA3_DIGITS in pattern:
            return "llama-bpe"
        if _QWEN2_MARK in pattern:
            return "qwen2"
    raise ModelError(f"GGUF export: llama.cpp has no built-in pre-tokenizer known to match this tokenizer's "
                     f"({' + '.join(str(k) for k in kinds)}), so it would split text differently", UNSUPPORTED_HINT)


def _added(spec: dict[str, Any]) -> set[str]:
    return {a["content"] for a in spec.get("added_tokens") or []}


def _add_tokenizer(w: Any, tok: Any, n_vocab: int, pre: str) -> None:
    """Byte-level BPE ("gpt2" in llama.cpp terms): tokens, types, merges, special ids, chat template."""
    import gguf

    spec = _spec(tok)
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids)
    added = {a["id"]: bool(a.get("special")) for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(n_vocab):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in special or added.get(i):
            types.append(gguf.TokenType.CONTROL)  # matched whole in text, never split (HF: special=True)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in (spec.get("model") or {}).get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.unk_token_id is not None:
        w.add_unk_token_id(tok.unk_token_id)
    w.add_add_bos_token(False)  # the chat template writes every special token itself
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)
