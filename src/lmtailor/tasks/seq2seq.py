"""Sequence to sequence: `objective: seq2seq`, judged by generation (BLEU, chrF, ROUGE-1/2/L, exact match).

Two model shapes behind one objective name, picked from the base model's config:
  encoder-decoder (T5/BART-style config or checkpoint): the source goes to the encoder, the loss is the token
      cross-entropy of the target (EOS appended) through the decoder;
  decoder-only: the existing `sft` path (chat rendering, loss on the completion only, packing) is reused as is.
Data: any chat-shaped format; the last user turn is the source and the last assistant turn the target (`paired`
gives source/target records, `prompt_completion` and `alpaca` work too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.errors import DataError
from lmtailor.models import unwrap_peft
from lmtailor.objectives import (
    CausalLMLoss,
    collate_packed,
    count_targets,
    load_causal_lm,
    prepare_render,
    register_objective,
)
from lmtailor.render import IGNORE


@dataclass
class Seq2SeqItem:
    input_ids: list[int]  # source tokens (encoder)
    labels: list[int]  # target tokens + EOS (decoder)
    source: str = ""


@functools.lru_cache(maxsize=16)
def _encoder_decoder(base_model: str, trust_remote_code: bool = False) -> bool:
    from transformers import AutoConfig

    from lmtailor.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(base_model), trust_remote_code=trust_remote_code)
    return bool(getattr(config, "is_encoder_decoder", False))


def is_encoder_decoder(cfg: RunConfig) -> bool:
    return _encoder_decoder(cfg.base_model, cfg.trust_remote_code)


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


# ---- hooks --------------------------------------------------------------------------------------------------

def load(cfg: RunConfig, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    if not is_encoder_decoder(cfg):
        return load_causal_lm(cfg, dtype)  # the sft path: task.dropout / label_smoothing do not apply
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from lmtailor.models import _load_errors, load_tokenizer, resolve_model
    from lmtailor.tasks.classify import override_dropout

    tok = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    folder = resolve_model(cfg.base_model)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        if cfg.task.dropout is not None:
            override_dropout(config, cfg.task.dropout)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, config=config, dtype=dtype,
                                                      trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _load_errors(cfg.base_model, e) from e
    model.lmtailor_label_smoothing = cfg.task.label_smoothing
    return model, tok


def prepare(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool = False
            ) -> tuple[list[Any], dict[str, Any]]:
    if not is_encoder_decoder(cfg):
        return prepare_render(tok, examples, cfg, train_on_prompt)
    items = []
    cut = 0
    for ex in examples:
        src, tgt = source_target(ex)
        ids = tok(src, add_special_tokens=True)["input_ids"]
        labels = tok(tgt, add_special_tokens=True)["input_ids"]
        if not labels or labels[-1] != tok.eos_token_id:  # the decoder must learn where to stop
            labels = [*labels, tok.eos_token_id]
        cut += len(ids) > cfg.max_length or len(labels) > cfg.task.max_target_length
        items.append(Seq2SeqItem(ids[:cfg.max_length], labels[:cfg.task.max_target_length], ex.source))
    return items, {"pairs": len(items), "tokens": sum(len(i.input_ids) + len(i.labels) for i in items),
                   "target_tokens": sum(len(i.labels) for i in items), "truncated": cut}


def collate(items: list[Any], tok: Any, cfg: RunConfig) -> dict[str, torch.Tensor]:
    if not isinstance(items[0], Seq2SeqItem):
        return collate_packed(items, tok, cfg)
    src_w = max(len(i.input_ids) for i in items)
    tgt_w = max(len(i.labels) for i in items)
    ids = torch.full((len(items), src_w), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), src_w), dtype=torch.long)
    labels = torch.full((len(items), tgt_w), IGNORE, dtype=torch.long)
    for r, item in enumerate(items):  # right padding; padded target positions carry no loss
        ids[r, :len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[r, :len(item.input_ids)] = 1
        labels[r, :len(item.labels)] = torch.tensor(item.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum()) if "labels" in batch else count_targets(batch)


class Seq2SeqLoss(nn.Module):
    """Summed target-token cross-entropy of an encoder-decoder (teacher forcing)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.smoothing = float(getattr(unwrap_peft(model), "lmtailor_label_smoothing", 0.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder_input_ids = unwrap_peft(self.model).prepare_decoder_input_ids_from_labels(labels=labels)  # (B, T)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            decoder_input_ids=decoder_input_ids).logits  # (B, T, V)
        keep = labels != IGNORE
        loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum", label_smoothing=self.smoothing)
        return loss, keep.sum()


def build(model: nn.Module) -> nn.Module:
    if getattr(unwrap_peft(model).config, "is_encoder_decoder", False):
        return Seq2SeqLoss(model)
    return CausalLMLoss(model)


@torch.inference_mode()
def generate_targets(model: nn.Module, tok: Any, sources: list[str], cfg: RunConfig, progress: bool = False
                     ) -> list[str]:
    """Decode a target for each source: beam search (task.num_beams) or greedy, up to generation.max_new_tokens."""
    if not getattr(unwrap_peft(model).config, "is_encoder_decoder", False):
        from lmtailor.generate import generate

        return generate(model, tok, [[{"role": "user", "content": s}] for s in sources], cfg.generation,
                        progress=progress)
    model.eval()
    device = next(model.parameters()).device
    enc = [tok(s, add_special_tokens=True)["input_ids"][:cfg.max_length] for s in sources]
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
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),  # type: ignore[operator]
                             max_new_tokens=cfg.generation.max_new_tokens, num_beams=cfg.task.num_beams,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r], skip_special_tokens=True).strip()
    return out


def evaluate(model: nn.Module, tok: Any, items: list[Any], examples: list[Example], cfg: RunConfig,
             label: str = "", progress: bool = True, record: bool = True) -> dict[str, Any]:
    """Held-out loss, and BLEU, chrF, ROUGE-1/2/L and exact match of generated targets (first
    task.generate_examples examples), with sample predictions."""
    from lmtailor.tasks.metrics import text_metrics
    from lmtailor.tasks.report import record_eval

    model.eval()
    metrics: dict[str, Any] = {}
    if items:
        total, n = 0.0, 0
        loss_module = build(model)
        size = cfg.micro_batch_size or cfg.batch_size
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(items), size):
                batch = collate(items[start:start + size], tok, cfg)
                loss, k = loss_module(**{key: v.to(device) for key, v in batch.items()})
                total, n = total + float(loss), n + int(k)
        metrics["loss"] = total / max(n, 1)
    pairs = [source_target(ex) for ex in examples[:cfg.task.generate_examples]]
    if pairs:
        sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
        preds = generate_targets(model, tok, sources, cfg, progress=progress)
        metrics.update(text_metrics(preds, refs))
        metrics["examples"] = len(pairs)
        metrics["samples"] = [{"prompt": s, "reference": r, "prediction": p}
                              for s, r, p in zip(sources, refs, preds, strict=True)][:max(cfg.eval.samples, 20)]
    if record:
        record_eval(cfg.run_dir, label, metrics)
    return metrics


# ---- using a trained run ------------------------------------------------------------------------------------

def load_seq2seq(run: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a seq2seq run (encoder-decoder or decoder-only, full or LoRA); returns (model, tokenizer, run config)."""
    from lmtailor.models import load_head_run, load_run, run_config

    run = Path(run)
    info = run_config(run)
    folder = run / "model" if (run / "model").is_dir() else run
    if not _encoder_decoder(info.get("base_model", str(folder))):
        model, tok, _ = load_run(run, dtype=dtype)
        return model, tok, info
    model, tok = load_head_run(run, folder, "AutoModelForSeq2SeqLM", dtype)
    return model, tok, info


def evaluate_run(target: str | Path, data: str, fmt: str = "auto", n_generate: int = 200,
                 out: str | None = None) -> dict[str, Any]:
    """`lmtailor eval` for a seq2seq run: loss and generation metrics on a data file."""
    from lmtailor.config import build_config
    from lmtailor.data.validate import load_examples
    from lmtailor.io import atomic_write_json

    model, tok, info = load_seq2seq(target)
    cfg = build_config({k: v for k, v in info.items() if k in RunConfig.model_fields}, f"{target}/config.yaml")
    cfg.task.generate_examples = n_generate
    examples = load_examples(data, fmt)
    items, _ = prepare(tok, examples, cfg)
    metrics = evaluate(model, tok, items, examples, cfg, label="eval:", progress=False, record=False)
    metrics.update(model=str(target), data=data)
    if out:
        atomic_write_json(out, metrics)
    return metrics


register_objective("seq2seq", "source -> target generation (paired data): encoder-decoder, or decoder-only "
                   "with the loss on the completion; BLEU/chrF/ROUGE/exact-match evaluation", build,
                   load=load, prepare=prepare, collate=collate, count=count, evaluate=evaluate)
