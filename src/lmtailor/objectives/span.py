"""Span corruption for encoder-decoders (`objective: span`, T5's pretraining): noise spans become sentinels in the
input, and the decoder writes each sentinel followed by its span."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lmtailor.config import Strict
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.metrics import perplexity
from lmtailor.objectives.common import (
    check_context,
    count_labels,
    loss_over,
    masking_generator,
    pad,
    prepare_blocks,
    recipe_model,
    recipe_tokenizer,
)
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.objectives.seq2seq import EncoderDecoderLoss
from lmtailor.render import IGNORE


class SpanSettings(Strict):
    """`span:` options."""

    density: float = Field(0.15, gt=0, lt=1, description="share of tokens corrupted")
    mean_length: float = Field(3.0, ge=1, description="mean corrupted span length")


def random_spans_mask(length: int, density: float, mean_length: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """(length,) bool noise mask of about density·length tokens in spans of mean `mean_length` (T5's recipe).

    Noise and non-noise stretches alternate, starting with non-noise; both are random partitions.
    """
    n_noise = min(max(1, round(length * density)), length - 1)
    n_spans = max(1, min(round(n_noise / mean_length), length - n_noise))

    def partition(total: int, parts: int) -> list[int]:
        cuts = (torch.randperm(total - 1, generator=generator)[:parts - 1] + 1).sort().values.tolist()
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    noise, keep = partition(n_noise, n_spans), partition(length - n_noise, n_spans)
    mask: list[bool] = []
    for k, z in zip(keep, noise, strict=True):
        mask += [False] * k + [True] * z
    return torch.tensor(mask)


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, density: float = 0.15, mean_length: float = 3.0,
                 generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """T5 span corruption: each noise span becomes one sentinel in the input; the target lists sentinel + span.

    Returns:
        (inputs, targets), both ending with EOS; `reconstruct(inputs, targets)` gives `ids` back.
    """
    ids = [t for t in ids if t != eos] or ids  # the separator inside a block stays text; EOS ends the sequences
    mask = random_spans_mask(len(ids), density, mean_length, generator).tolist() if len(ids) > 1 else [False]
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (t, noisy) in enumerate(zip(ids, mask, strict=True)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                if span >= len(sentinels):
                    raise ConfigError(f"span corruption needs more than {len(sentinels)} sentinel tokens",
                                      "lower max_length or span_density, or raise span_mean_length")
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(t)
        else:
            inputs.append(t)
    return inputs + [eos], targets + [eos]


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """Undo span_corrupt: put each sentinel's span from the targets back into the inputs."""
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets:
        if t in sentinels:
            current = spans.setdefault(t, [])
        elif t != eos and current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs:
        if t in spans:
            out += spans[t]
        elif t != eos:
            out.append(t)
    return out


def sentinel_ids(tok: Any) -> list[int]:
    from lmtailor.tokenizers import SENTINELS

    vocab = tok.get_vocab()
    ids = [vocab[s] for s in SENTINELS if s in vocab]
    if not ids:
        raise ConfigError("objective span needs sentinel tokens <extra_id_N> in the tokenizer",
                          "train it with `lmtailor tokenizer train` or use pretrain.scratch with arch t5")
    return ids


def collate(ctx: ObjectiveContext, items: list[Any]) -> dict[str, torch.Tensor]:
    tok, s = ctx.tokenizer, ctx.settings
    sentinels, gen = sentinel_ids(tok), masking_generator(ctx.cfg)
    pairs = [span_corrupt(list(i.input_ids), sentinels, tok.eos_token_id, s.density, s.mean_length, gen)
             for i in items]
    start = tok.pad_token_id  # T5 starts decoding from pad (decoder_start_token_id in scratch.build_model)
    return {
        "input_ids": pad([p[0] for p in pairs], tok.pad_token_id),  # (B, Te)
        "attention_mask": pad([[1] * len(p[0]) for p in pairs], 0),
        "decoder_input_ids": pad([[start, *p[1][:-1]] for p in pairs], tok.pad_token_id),  # (B, Td)
        "labels": pad([p[1] for p in pairs], IGNORE),
    }


def prepare(ctx: ObjectiveContext, examples: list[Example]) -> tuple[Any, dict[str, Any]]:
    check_context(ctx.cfg)
    return prepare_blocks(ctx, examples)


def load_model(ctx: ObjectiveContext, dtype: torch.dtype) -> nn.Module:
    return recipe_model(ctx, dtype, "AutoModelForSeq2SeqLM")


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    return EncoderDecoderLoss(model)


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Any], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Target-token loss and perplexity on fixed corruptions of the held-out blocks."""
    model.eval()
    total, count = loss_over(EncoderDecoderLoss(model), items, lambda b: collate(ctx, b))
    loss = total / max(count, 1)
    return Evaluation({"loss": loss, "perplexity": perplexity(loss), "target_tokens": count} if count else {})


register_objective("span", "T5 span corruption for encoder-decoders", settings=SpanSettings,
                   tokenizer=recipe_tokenizer, model=load_model, prepare=prepare, collate=collate, count=count_labels,
                   build=build, evaluate=evaluate, train_on_prompt=True, metrics=("perplexity",))
