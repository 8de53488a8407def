"""Sequence to sequence (`objective: seq2seq`), judged by generation: BLEU, chrF, ROUGE-1/2/L and exact match.

`seq2seq` is an alias that picks one of two objectives from the base model's config:
  seq2seq_encdec (T5/BART-style encoder-decoder): the source goes to the encoder, the loss is the token
      cross-entropy of the target (EOS appended) through the decoder;
  seq2seq_causal (decoder-only): the `sft` path (chat rendering, loss on the completion only, packing).
Both share the `seq2seq:` settings and the generation metrics. Data: any chat-shaped format; the last user turn is
the source and the last assistant turn the target (`paired` gives source/target records, `prompt_completion` and
`alpaca` work too).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmtailor.config import RunConfig, Strict
from lmtailor.data.example import Example
from lmtailor.errors import DataError
from lmtailor.generate import generate, loop_cut, repeat_stops
from lmtailor.metrics import looping_share, text_metrics
from lmtailor.models import unwrap_peft
from lmtailor.objectives import causal
from lmtailor.objectives.common import loss_over, override_dropout, recipe_tokenizer
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import IGNORE, clip_text


class Seq2SeqSettings(Strict):
    """`seq2seq:` options."""

    max_target_length: int = Field(128, ge=1, description="target tokens kept (encoder-decoder)")
    num_beams: int = Field(1, ge=1, description="beam width of evaluation decoding (1: greedy; encoder-decoder)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing (encoder-decoder)")
    dropout: float | None = Field(None, ge=0, lt=1, description="override every dropout probability of the model "
                                  "config (encoder-decoder)")


@functools.lru_cache(maxsize=16)
def _encoder_decoder(base_model: str, trust_remote_code: bool = False) -> bool:
    from lmtailor.models import load_model_config

    return bool(getattr(load_model_config(base_model, trust_remote_code), "is_encoder_decoder", False))


def select(cfg: RunConfig) -> str:
    """seq2seq_encdec for an encoder-decoder base model, else seq2seq_causal."""
    encdec = _encoder_decoder(cfg.base_model, cfg.trust_remote_code)
    return "seq2seq_encdec" if encdec else "seq2seq_causal"


def source_target(ex: Example) -> tuple[str, str]:
    """(source, target) of an example: its last user turn and last assistant turn."""
    if ex.messages is None:
        raise DataError(f"{ex.source}: objective seq2seq needs source/target records",
                        "use data.format paired (source, target), prompt_completion or alpaca")
    users = [m["content"] for m in ex.messages if m["role"] == "user"]
    answers = [m["content"] for m in ex.messages if m["role"] == "assistant"]
    if not users or not answers:
        raise DataError(f"{ex.source}: needs a user turn and an assistant turn")
    return users[-1], answers[-1]


class EncoderDecoderLoss(nn.Module):
    """Summed target-token cross-entropy of an encoder-decoder (teacher forcing). The decoder input is the target
    shifted right (the model's own rule) unless the batch brings it (span corruption does)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                decoder_input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if decoder_input_ids is None:
            decoder_input_ids = unwrap_peft(self.model).prepare_decoder_input_ids_from_labels(labels=labels)  # (B, T)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                            use_cache=False).logits  # (B, T, V)
        keep = labels != IGNORE
        loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum",
                               label_smoothing=self.label_smoothing)
        return loss, keep.sum()


# ---- encoder-decoder hooks ----------------------------------------------------------------------------------

@dataclass
class Seq2SeqItem:
    input_ids: list[int]  # source tokens (encoder)
    labels: list[int]  # target tokens + EOS (decoder)
    source: str = ""


def load_model(ctx: ObjectiveContext, dtype: torch.dtype) -> nn.Module:
    from lmtailor.models import load_model_config, load_pretrained

    cfg = ctx.cfg
    config = load_model_config(cfg.base_model, cfg.trust_remote_code)
    if ctx.settings.dropout is not None:
        override_dropout(config, ctx.settings.dropout)
    return load_pretrained(cfg.base_model, "AutoModelForSeq2SeqLM", dtype=dtype, config=config,
                           trust_remote_code=cfg.trust_remote_code)


def prepare(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[Seq2SeqItem], dict[str, Any]]:
    tok, max_target = ctx.tokenizer, ctx.settings.max_target_length
    items = []
    cut = 0
    for ex in examples:
        src, tgt = source_target(ex)
        ids = tok(clip_text(tok, src, ctx.cfg.max_length), add_special_tokens=True)["input_ids"]
        labels = tok(clip_text(tok, tgt, max_target), add_special_tokens=True)["input_ids"]
        if not labels or labels[-1] != tok.eos_token_id:  # the decoder must learn where to stop
            labels = [*labels, tok.eos_token_id]
        cut += len(ids) > ctx.cfg.max_length or len(labels) > max_target
        items.append(Seq2SeqItem(ids[:ctx.cfg.max_length], labels[:max_target], ex.source))
    return items, {"pairs": len(items), "tokens": sum(len(i.input_ids) + len(i.labels) for i in items),
                   "target_tokens": sum(len(i.labels) for i in items), "truncated": cut}


def collate(ctx: ObjectiveContext, items: list[Seq2SeqItem]) -> dict[str, torch.Tensor]:
    pad_id = ctx.tokenizer.pad_token_id
    src_w = max(len(i.input_ids) for i in items)
    tgt_w = max(len(i.labels) for i in items)
    ids = torch.full((len(items), src_w), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), src_w), dtype=torch.long)
    labels = torch.full((len(items), tgt_w), IGNORE, dtype=torch.long)
    for r, item in enumerate(items):  # right padding; padded target positions carry no loss
        ids[r, :len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[r, :len(item.input_ids)] = 1
        labels[r, :len(item.labels)] = torch.tensor(item.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    return EncoderDecoderLoss(model, ctx.settings.label_smoothing)


@torch.inference_mode()
def generate_targets(ctx: ObjectiveContext, model: nn.Module, sources: list[str], progress: bool = False
                     ) -> list[str]:
    """Decode a target for each source: beam search (seq2seq.num_beams) or greedy, up to
    generation.max_new_tokens; a decoder-only model answers through the chat template."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    if not getattr(unwrap_peft(model).config, "is_encoder_decoder", False):
        return generate(model, tok, [[{"role": "user", "content": s}] for s in sources], cfg.generation,
                        progress=progress)
    model.eval()
    device = next(model.parameters()).device
    enc = [tok(clip_text(tok, s, cfg.max_length), add_special_tokens=True)["input_ids"][:cfg.max_length]
           for s in sources]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [""] * len(enc)
    size = cfg.generation.batch_size
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            mask[r, :len(enc[i])] = 1
        beams, repeats = ctx.settings.num_beams, cfg.generation.stop_repeats
        # the repetition stop ends greedy rows early; beams are cut afterwards (the same rule, see generate.loop_cut)
        stops = repeat_stops(1, repeats) if beams == 1 else None  # decoder rows start with the decoder start token
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),  # type: ignore[operator]
                             max_new_tokens=cfg.generation.max_new_tokens, num_beams=beams, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, stopping_criteria=stops)
        for r, i in enumerate(idx):
            row = gen[r, 1:].tolist()
            out[i] = tok.decode(row[:loop_cut(row, repeats)], skip_special_tokens=True).strip()
    return out


def generated_pairs(ctx: ObjectiveContext, examples: Sequence[Example]) -> list[tuple[str, str]]:
    """(source, target) of the held-out examples answered by generation: the first eval.generate_examples (200)."""
    limit = ctx.cfg.eval.generate_examples if ctx.cfg.eval.generate_examples is not None else 200
    return [source_target(examples[i]) for i in range(min(limit, len(examples)))]


def baseline(ctx: ObjectiveContext, train: Sequence[Example], val: Sequence[Example]) -> dict[str, dict[str, float]]:
    """The target of the nearest training source (BM25), and copying the source, scored like the model."""
    from lmtailor.baselines import generation_baselines

    pairs = [source_target(ex) for ex in train]
    held = generated_pairs(ctx, val)
    return generation_baselines([s for s, _ in pairs], [t for _, t in pairs], [s for s, _ in held],
                                [t for _, t in held])


def generation_metrics(ctx: ObjectiveContext, model: nn.Module, examples: Sequence[Example], progress: bool
                       ) -> dict[str, Any]:
    """BLEU, chrF, ROUGE-1/2/L and exact match of generated targets for the first eval.generate_examples examples,
    with sample predictions."""
    pairs = generated_pairs(ctx, examples)
    if not pairs:
        return {}
    sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    preds = generate_targets(ctx, model, sources, progress=progress)
    return {**text_metrics(preds, refs), "looping": looping_share(preds), "examples": len(pairs),
            "samples": [{"prompt": s, "reference": r, "prediction": p}
                        for s, r, p in zip(sources, refs, preds, strict=True)][:max(ctx.cfg.eval.samples, 20)]}


def _evaluate(ctx: ObjectiveContext, model: nn.Module, loss_module: nn.Module, collate_fn: Any, items: Sequence[Any],
              examples: Sequence[Example], progress: bool) -> Evaluation:
    model.eval()
    metrics: dict[str, Any] = {}
    if items:
        size = ctx.cfg.micro_batch_size or ctx.cfg.batch_size
        total, n = loss_over(loss_module, items, lambda b: collate_fn(ctx, b), batch=size)
        metrics["loss"] = total / max(n, 1)
    return Evaluation({**metrics, **generation_metrics(ctx, model, examples, progress)})


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Any], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Held-out target loss, and the generation metrics."""
    return _evaluate(ctx, model, build(ctx, model), collate, items, examples, progress)


# ---- decoder-only: the sft path, judged by generation -------------------------------------------------------

def evaluate_causal(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Any], examples: Sequence[Example],
                    progress: bool = True, desc: str = "") -> Evaluation:
    """Held-out loss of the completions (the sft loss), and the generation metrics."""
    return _evaluate(ctx, model, causal.CausalLMLoss(model), causal.collate, items, examples, progress)


METRICS = ("perplexity", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "looping")
register_objective("seq2seq", "source -> target generation (paired data): encoder-decoder, or decoder-only with the "
                   "loss on the completion; BLEU/chrF/ROUGE/exact-match evaluation", settings=Seq2SeqSettings,
                   select=select, metrics=METRICS)
register_objective("seq2seq_encdec", "seq2seq on an encoder-decoder (T5/BART): source to the encoder, target loss "
                   "through the decoder", settings=Seq2SeqSettings, tokenizer=recipe_tokenizer, model=load_model,
                   prepare=prepare, collate=collate, count=count, build=build, evaluate=evaluate, baseline=baseline,
                   task_report=True, primary_metric="chrf",
                   metrics=METRICS)
register_objective("seq2seq_causal", "seq2seq on a decoder-only model: the sft loss on the completion, judged by "
                   "generation", settings=Seq2SeqSettings, tokenizer=recipe_tokenizer, model=causal.load_model,
                   prepare=causal.prepare_chats, collate=causal.collate, count=causal.count, build=causal.build,
                   evaluate=evaluate_causal, baseline=baseline, task_report=True, primary_metric="chrf",
                   metrics=METRICS)
