"""Models built from a config (llama-style decoder, BERT-style encoder, T5-style encoder-decoder) and their cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtailor.config import ScratchSettings
from lmtailor.errors import ConfigError


def load_scratch_tokenizer(settings: ScratchSettings) -> Any:
    """The recipe's tokenizer, with the special tokens its architecture's objective needs."""
    from lmtailor.models import load_tokenizer
    from lmtailor.tokenizers import SENTINELS

    folder = Path(settings.tokenizer)
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"config key 'pretrain.scratch.tokenizer': no tokenizer folder at {folder}",
                          f"train one first: lmtailor tokenizer train --corpus DIR --vocab-size 8000 --out {folder}")
    tok = load_tokenizer(str(folder))
    missing = {}
    if settings.arch == "bert":
        for key, text in (("mask_token", "<mask>"), ("cls_token", "<cls>"), ("sep_token", "<sep>")):
            if getattr(tok, key, None) is None:
                missing[key] = text
    if missing:
        tok.add_special_tokens(missing)
    if settings.arch == "t5":
        absent = [s for s in SENTINELS if s not in tok.get_vocab()]
        if absent:
            tok.add_special_tokens({"additional_special_tokens": absent})
    return tok


def build_model(settings: ScratchSettings, tok: Any, nsp: bool = False, dtype: torch.dtype = torch.float32
                ) -> nn.Module:
    """A freshly initialized model of `settings.arch` sized by the settings (vocabulary: the tokenizer's)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForPreTraining,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    s = settings
    vocab = s.vocab or len(tok)
    if vocab < len(tok):
        raise ConfigError(f"config key 'pretrain.scratch.vocab': {vocab} is smaller than the tokenizer ({len(tok)})",
                          "leave vocab unset to use the tokenizer's size")
    if s.hidden % s.heads:
        raise ConfigError(f"pretrain.scratch: hidden ({s.hidden}) is not a multiple of heads ({s.heads})")
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    model: Any
    if s.arch == "llama":
        kv = s.kv_heads or s.heads
        if s.heads % kv:
            raise ConfigError(f"pretrain.scratch: heads ({s.heads}) is not a multiple of kv_heads ({kv})")
        # SwiGLU has three matrices: 8/3 x hidden keeps the MLP at the parameter count of a 4 x hidden GELU MLP.
        inter = s.intermediate or 32 * round(8 * s.hidden / 3 / 32)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=s.hidden, intermediate_size=inter, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=kv, max_position_embeddings=s.context,
            tie_word_embeddings=True, bos_token_id=None, **ids))
    elif s.arch == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                            num_attention_heads=s.heads, intermediate_size=s.intermediate or 4 * s.hidden,
                            max_position_embeddings=s.context, type_vocab_size=2, **ids)
        model = BertForPreTraining(config) if nsp else BertForMaskedLM(config)
    else:
        t5: dict[str, Any] = {"decoder_start_token_id": tok.pad_token_id, "tie_word_embeddings": True, **ids}
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=s.hidden, d_kv=s.hidden // s.heads, d_ff=s.intermediate or 4 * s.hidden,
            num_layers=s.layers, num_decoder_layers=s.layers, num_heads=s.heads, **t5))
    return model.to(dtype)


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matrix product per token: all but the input embedding lookup.

    A tied output head still costs a (hidden x vocab) product, so it is counted once through the output weight.
    """
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = out.weight.numel() if out is not None else 0
    return total - emb.numel() + head if out is None or out.weight is not emb else total


def training_flops_per_token(model: Any, layers: int, context: int, hidden: int, arch: str = "llama") -> float:
    """Estimated training FLOPs per token: 6·N for the matrix products plus 6·(attention layers)·context·hidden.

    The attention term is Kaplan et al.'s 2·n_layer·n_ctx·d_attn forward cost, tripled for backward; a T5 model has
    three attention blocks per layer pair (encoder self, decoder self, cross).
    """
    attn_layers = 3 * layers if arch == "t5" else layers
    return 6.0 * matmul_params(model) + 6.0 * attn_layers * context * hidden


def describe(model: Any, settings: ScratchSettings) -> str:
    n = sum(p.numel() for p in model.parameters())
    flops = training_flops_per_token(model, settings.layers, settings.context, settings.hidden, settings.arch)
    return (f"from scratch: {settings.arch} {settings.layers} layers x {settings.hidden} wide, {settings.heads} heads, "
            f"context {settings.context}, vocab {model.get_input_embeddings().weight.shape[0]}: "
            f"{n / 1e6:.2f}M parameters, ~{flops / 1e6:.1f} MFLOPs per training token")


def new_model(settings: ScratchSettings, tok: Any, dtype: torch.dtype, nsp: bool = False, seed: int = 0,
              say: Any = print) -> nn.Module:
    """A freshly initialized model for a `pretrain.scratch` recipe; prints parameters and FLOPs per token."""
    # Initialization must not depend on what consumed the global RNG before (resume rebuilds the same model).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(settings, tok, nsp=nsp, dtype=dtype)
    say(describe(model, settings))
    return model


def load_scratch(settings: ScratchSettings, dtype: torch.dtype, nsp: bool = False, seed: int = 0,
                 say: Any = print) -> tuple[nn.Module, Any]:
    """(new model, tokenizer) for a `pretrain.scratch` recipe."""
    tok = load_scratch_tokenizer(settings)
    return new_model(settings, tok, dtype, nsp, seed, say), tok
