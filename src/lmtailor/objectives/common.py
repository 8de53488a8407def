"""Pieces several objectives share: the tokenizer and model of a recipe (pretrained, or built from scratch), the
corpus as fixed-length blocks, padding, and the masking generator.

Masking randomness: during training, collate draws from the global torch RNG, which the loop checkpoints, so a
resumed run masks exactly as the uninterrupted one. Under no_grad/inference (validation), it uses a generator
seeded from cfg.seed, so every evaluation scores the same masks and validation losses are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.objectives.registry import ObjectiveContext
from lmtailor.pretrain.corpus import _blocks, doc_text, token_cache
from lmtailor.render import IGNORE, Tokenized

# The architecture `pretrain.scratch` must build for each objective that can start from scratch.
SCRATCH_ARCH = {"sft": "llama", "clm": "llama", "mlm": "bert", "span": "t5"}
_KIND = {"llama": "a decoder", "bert": "an encoder", "t5": "an encoder-decoder"}


def recipe_tokenizer(ctx: ObjectiveContext) -> Any:
    """The scratch tokenizer (with the special tokens its architecture needs) or the base model's."""
    cfg = ctx.cfg
    if cfg.pretrain.scratch is not None:
        from lmtailor.pretrain.scratch import load_scratch_tokenizer

        return load_scratch_tokenizer(cfg.pretrain.scratch)
    from lmtailor.models import load_tokenizer

    return load_tokenizer(cfg.base_model, cfg.trust_remote_code)


def recipe_model(ctx: ObjectiveContext, dtype: torch.dtype, auto_class: str, nsp: bool = False) -> nn.Module:
    """A model built from `pretrain.scratch` (the architecture this objective needs) or loaded from base_model."""
    cfg = ctx.cfg
    scratch = cfg.pretrain.scratch
    if scratch is None:
        from lmtailor.models import load_pretrained

        return load_pretrained(cfg.base_model, auto_class, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    want = SCRATCH_ARCH.get(cfg.objective)
    if want is None:
        raise ConfigError(f"config key 'pretrain.scratch': objective {cfg.objective} does not start from scratch",
                          f"objectives that do: {', '.join(SCRATCH_ARCH)}")
    if scratch.arch != want:
        raise ConfigError(f"objective {cfg.objective} needs {_KIND[want]}, got pretrain.scratch.arch={scratch.arch!r}",
                          f"use arch: {want}" + (", or objective mlm (bert) / span (t5)" if want == "llama" else ""))
    check_context(cfg)
    from lmtailor.pretrain.scratch import new_model

    return new_model(scratch, ctx.tokenizer, dtype, nsp=nsp, seed=cfg.seed)


def check_context(cfg: RunConfig) -> None:
    s = cfg.pretrain.scratch
    if s is not None and cfg.max_length > s.context:
        raise ConfigError(f"max_length ({cfg.max_length}) exceeds pretrain.scratch.context ({s.context})",
                          "lower max_length or raise the model's context")


def texts(examples: Sequence[Example]) -> list[str]:
    return [doc_text(ex) for ex in examples]


def prepare_blocks(ctx: ObjectiveContext, examples: list[Example]) -> tuple[Any, dict[str, Any]]:
    """The corpus as consecutive max_length-token blocks (documents joined by EOS): from the cache or in memory."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    docs = texts(examples)
    if not docs:
        return [], {"blocks": 0}
    if cfg.pretrain.cache:
        blocks = token_cache(lambda: docs, tok, cfg.max_length)
        return blocks, {"blocks": len(blocks), "tokens": blocks.n_tokens, "cache": str(blocks.path),
                        "cache_reused": blocks.reused}
    items = [Tokenized(ids, list(ids), f"block {i}") for i, ids in enumerate(_blocks(docs, tok, cfg.max_length))]
    return items, {"blocks": len(items), "tokens": sum(len(s.input_ids) for s in items)}


def masking_generator(cfg: RunConfig) -> torch.Generator | None:
    """None (the global, checkpointed RNG) while training; a generator seeded from cfg.seed for evaluation."""
    return None if torch.is_grad_enabled() else torch.Generator().manual_seed(cfg.seed)


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """(len(rows), longest) tensor, right-padded with `value`."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def count_labels(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms of a batch whose targets are in `labels` (plus one per pair for next-sentence prediction)."""
    n = int((batch["labels"] != IGNORE).sum())
    return n + (batch["next_sentence_label"].numel() if "next_sentence_label" in batch else 0)


@torch.inference_mode()
def loss_over(loss_module: nn.Module, items: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
              batch: int = 8) -> tuple[float, int]:
    """(sum of losses, loss terms) of a loss module over items, in batches; items are indexed by position."""
    total, count = 0.0, 0
    device = next(loss_module.parameters()).device
    for i in range(0, len(items), batch):
        b = collate([items[j] for j in range(i, min(i + batch, len(items)))])
        loss, n = loss_module(**{k: v.to(device) for k, v in b.items()})
        total, count = total + float(loss), count + int(n)
    return total, count


def override_dropout(config: Any, p: float) -> list[str]:
    """Set every float dropout probability of a transformers config to p; returns the names changed."""
    changed = []
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float) and hasattr(config, key):
            setattr(config, key, p)
            changed.append(key)
    return changed
