"""Export a run: LoRA merged into its base as a plain HF safetensors folder, or one GGUF file for llama.cpp.

    lmtailor export runs/my-run --format merged --out my-model/
    lmtailor export runs/my-run --format gguf --out my-model.gguf [--gguf-type q8_0]

Both are written atomically (a reader sees the old output or the complete new one). A GGUF file is checked
by loading it back with transformers' GGUF reader and comparing its logits with the source model on a fixed
text: `GGUF_TOLERANCE` is the largest allowed |logit difference| relative to the source logits' spread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lmtailor.errors import ConfigError, ModelError
from lmtailor.io import atomic_file
from lmtailor.outputs import check_output, replacing

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")
GGUF_TYPES = ("f16", "q8_0")
# rms(logit(gguf) - logit(source)) / std(logit(source)) over every position and vocabulary entry of CHECK_TEXT.
# Measured: bundled 135M model f16 0.0007, q8_0 0.031 (top-1 agreement 100%); tiny test models <= 0.01.
GGUF_TOLERANCE = {"f16": 0.01, "q8_0": 0.08}
CHECK_TEXT = ("To list the files in a folder, run ls -la. To count the lines of a file, run wc -l file.txt. "
              "The quick brown fox jumps over the lazy dog.")


def export_run(run: str | Path, fmt: Literal["merged", "gguf"], out: str | Path, gguf_type: str = "f16",
               verify: bool = True, force: bool = False) -> dict[str, Any]:
    """Export a run folder (adapter or full model), a model folder or a model name.

    Args:
        run: what to export; an adapter is merged into its base first.
        fmt: "merged" (HF folder: config.json, model.safetensors, tokenizer files) or "gguf" (one file).
        out: the folder (merged) or file (gguf) to write; an existing one is an error unless `force`.
        gguf_type: "f16" or "q8_0" (GGUF only; 1-D tensors stay f32, as llama.cpp expects).
        verify: GGUF only: reload the file and compare logits with the source (raises if off tolerance).
        force: replace an existing output, keeping it as `NAME.bak-<time>` (lmtailor.outputs).

    Returns:
        A summary: path, format, size in bytes and, for GGUF, the logit check.

    Raises:
        ConfigError: unknown format or GGUF type, an output that exists (without force) or cannot be written.
        ModelError: the architecture cannot be written as GGUF,
        or the GGUF file read back does not match the source.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'", f"choose one of: {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type '{gguf_type}'", f"choose one of: {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if fmt == "gguf" and out.suffix != ".gguf":
        out = out / f"{Path(run).name}-{gguf_type}.gguf" if out.is_dir() else out.with_suffix(".gguf")
    inputs = (run,) if Path(run).expanduser().exists() else ()
    check_output(out, force, folder=fmt == "merged", inputs=inputs)  # before the minutes of loading and merging
    model, tok, info = load_merged(run)
    if fmt == "merged":
        from lmtailor.models import save_model

        with replacing(out, force):
            save_model(model, tok, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return {"format": "merged", "path": str(out), "bytes": size, "base_model": info["base_model"],
                "merged_adapter": info.get("adapter")}
    with replacing(out, force):
        write_gguf(model, tok, out, gguf_type, name=Path(run).name)
    summary: dict[str, Any] = {"format": "gguf", "gguf_type": gguf_type, "path": str(out),
                               "bytes": out.stat().st_size, "base_model": info["base_model"]}
    if verify:
        check = compare_gguf(out, model, tok)
        summary["check"] = check
        if check["rms_rel_diff"] > GGUF_TOLERANCE[gguf_type]:
            raise ModelError(f"the GGUF file read back differs from the source: rms(dlogit)/std(logit) = "
                             f"{check['rms_rel_diff']:.4f} > {GGUF_TOLERANCE[gguf_type]} ({out})")
    return summary


def load_merged(target: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """fp32 model with any LoRA adapter merged in, its tokenizer and info (`Run.info`)."""
    from lmtailor.models import unwrap_peft
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load(merge=True)
    model = unwrap_peft(model)
    assert not hasattr(model, "peft_config") or not getattr(model, "peft_config", None), "adapter left unmerged"
    return model.eval(), tok, run.info


# ---- GGUF ------------------------------------------------------------------------------------------------------

def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair (its RoPE kernel layout); transformers undoes this.
    n = n_head_kv if n_head != n_head_kv else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: nn.Module, tok: Any, out: Path, gguf_type: str = "f16", name: str = "model") -> Path:
    """Write a llama-architecture model and its byte-level BPE tokenizer as one GGUF file, atomically."""
    import gguf

    cfg: Any = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise ModelError(f"GGUF export supports llama-architecture models; this one is '{cfg.model_type}'",
                         "use --format merged and convert with llama.cpp's convert_hf_to_gguf.py")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export: RoPE scaling '{rope.get('rope_type')}' is not written by this exporter",
                         "use --format merged and convert with llama.cpp's convert_hf_to_gguf.py")
    theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    qtype = gguf.GGMLQuantizationType.Q8_0 if gguf_type == "q8_0" else gguf.GGMLQuantizationType.F16
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
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
        _add_tokenizer(w, tok, cfg.vocab_size)
        state = model.state_dict()
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        for key, tensor in state.items():
            if tied and key == "lm_head.weight":
                continue  # llama.cpp reuses token_embd when output.weight is absent
            if "rotary_emb" in key:
                continue
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ModelError(f"GGUF export: no llama.cpp name for tensor {key}")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if key.endswith("self_attn.q_proj.weight"):
                data = _permute(data, n_head, n_head)
            elif key.endswith("self_attn.k_proj.weight"):
                data = _permute(data, n_head, n_kv)
            if data.ndim == 1:
                w.add_tensor(gname, data.astype(np.float32))  # norms stay f32
            elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
                w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(gname, data.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _add_tokenizer(w: Any, tok: Any, n_vocab: int) -> None:
    """Byte-level BPE ("gpt2" in llama.cpp terms): tokens, types, merges, special ids, chat template."""
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or [])
    if model.get("type") != "BPE" or not byte_level:
        raise ModelError("GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style) only",
                         "use --format merged and convert with llama.cpp's convert_hf_to_gguf.py")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids)
    added = {a["id"] for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(n_vocab):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in special or i in added:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_add_bos_token(False)  # the chat template writes every special token itself
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


@torch.inference_mode()
def compare_gguf(path: str | Path, source: nn.Module, tok: Any, text: str = CHECK_TEXT) -> dict[str, float]:
    """Load `path` with transformers' GGUF reader and compare its logits with `source` on `text`.

    Returns max |Δlogit|, rms(Δlogit) / std(source logits) (the checked figure), max |Δlogit| / std and the
    top-1 agreement over positions.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    try:
        # Not through models.load_pretrained on purpose: this reads back the GGUF file just written, with
        # transformers' GGUF reader, which parses GGUF tensors (no pickle, no model code).
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as e:  # the GGUF reader raises many kinds of errors
        raise ModelError(f"transformers cannot read back {path}: {e}") from e
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
    ref = source.float()(input_ids=ids).logits[0]  # (T, V)
    got = loaded(input_ids=ids).logits[0]  # (T, V)
    delta = got - ref
    std = ref.std().item()
    return {"max_abs_diff": delta.abs().max().item(), "rms_rel_diff": delta.pow(2).mean().sqrt().item() / std,
            "max_rel_diff": delta.abs().max().item() / std,
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(), "tokens": ids.shape[1]}
