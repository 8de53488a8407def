"""Masked language modelling for encoders (`objective: mlm`): BERT masking (15%, 80/10/10), optional whole-word
masking and next-sentence prediction, pseudo-perplexity."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmtailor.config import Strict
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.metrics import perplexity
from lmtailor.models import unwrap_peft
from lmtailor.objectives.common import (
    check_context,
    count_labels,
    masking_generator,
    pad,
    prepare_blocks,
    recipe_model,
    recipe_tokenizer,
    texts,
)
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import IGNORE, encode_long


class MlmSettings(Strict):
    """`mlm:` options."""

    probability: float = Field(0.15, gt=0, lt=1, description="share of tokens selected for prediction")
    whole_word_mask: bool = Field(False, description="select whole words, not single sub-tokens")
    nsp: bool = Field(False, description="add a next-sentence-prediction head and loss (bert from scratch)")


def word_start_table(tok: Any) -> torch.Tensor:
    """(V,) bool: the token begins a word (byte-level BPE 'Ġ', SentencePiece '▁', WordPiece not '##'), or is special."""
    vocab = tok.get_vocab()
    starts = torch.zeros(max(len(tok), max(vocab.values()) + 1), dtype=torch.bool)
    wordpiece = any(t.startswith("##") for t in list(vocab)[:5000])
    for text, i in vocab.items():
        starts[i] = (not text.startswith("##")) if wordpiece else text.startswith(("Ġ", "▁", "Ċ"))
    starts[list(tok.all_special_ids)] = True
    return starts


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, p: float = 0.15,
                generator: torch.Generator | None = None, word_start: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select p of the non-special tokens (or whole words); of those 80% -> mask, 10% -> random, 10% kept.

    Args:
        ids: (B, T) token ids. special: (B, T) bool, never selected (padding, <cls>, <sep>, ...).
        word_start: (B, T) bool, where a word begins; when given, a word is selected or not as a whole.

    Returns:
        (inputs, labels): labels hold the original id where selected and -100 elsewhere.
    """
    draw = torch.rand(ids.shape, generator=generator)  # (B, T)
    if word_start is None:
        selected = draw < p
    else:
        word = word_start.long().cumsum(-1)  # (B, T) word number per position (0 for a row's leading partial word)
        chosen = ((draw < p) & word_start).long()  # the draw at a word's first token decides for the word
        by_word = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        by_word.scatter_reduce_(1, word, chosen, reduce="amax")
        selected = by_word.gather(1, word).bool()
    selected &= ~special
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    how = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[selected & (how < 0.8)] = mask_id
    swap = selected & (how >= 0.8) & (how < 0.9)
    inputs[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return inputs, labels


@dataclass
class PairItem:
    """A sentence pair for next-sentence prediction: <cls> A <sep> B <sep>; next_label 1 if B is a random segment."""

    input_ids: list[int]
    token_type_ids: list[int]
    next_label: int


def prepare_pairs(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[PairItem], dict[str, Any]]:
    """NSP pairs: consecutive segments of a document (label 0) or a segment and one from elsewhere (label 1)."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    half = (cfg.max_length - 3) // 2
    docs = [[ids[i:i + half] for i in range(0, len(ids), half)]
            for ids in (encode_long(tok, t) for t in texts(examples))]
    segments = [s for d in docs for s in d]
    rng = random.Random(cfg.seed)
    items: list[PairItem] = []
    for doc in docs:
        for a, b in zip(doc, doc[1:], strict=False):
            label = int(rng.random() < 0.5 and len(segments) > len(doc))
            while label:
                b = rng.choice(segments)
                if not any(b is s for s in doc):
                    break
            ids = [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
            items.append(PairItem(ids, [0] * (len(a) + 2) + [1] * (len(b) + 1), label))
    return items, {"pairs": len(items), "random_pairs": sum(i.next_label for i in items),
                   "tokens": sum(len(i.input_ids) for i in items)}


def prepare(ctx: ObjectiveContext, examples: list[Example]) -> tuple[Any, dict[str, Any]]:
    check_mask(ctx.tokenizer)
    check_context(ctx.cfg)
    return prepare_pairs(ctx, examples) if ctx.settings.nsp else prepare_blocks(ctx, examples)


def check_mask(tok: Any) -> None:
    if tok.mask_token_id is None:
        raise ConfigError("objective mlm needs a tokenizer with a mask token",
                          "train the tokenizer with `lmtailor tokenizer train` (it adds <mask>)")


_WORD_STARTS: dict[int, torch.Tensor] = {}


def collate(ctx: ObjectiveContext, items: list[Any]) -> dict[str, torch.Tensor]:
    cfg, tok, s = ctx.cfg, ctx.tokenizer, ctx.settings
    ids = pad([list(i.input_ids) for i in items], tok.pad_token_id)  # (B, T)
    attention = pad([[1] * len(i.input_ids) for i in items], 0)
    special = (attention == 0) | torch.isin(ids, torch.tensor(tok.all_special_ids))
    starts = None
    if s.whole_word_mask:
        table = _WORD_STARTS.setdefault(id(tok), word_start_table(tok))
        starts = table[ids]
    inputs, labels = mask_tokens(ids, special, tok.mask_token_id, len(tok), s.probability,
                                 masking_generator(cfg), starts)
    batch = {"input_ids": inputs, "attention_mask": attention, "labels": labels}
    if isinstance(items[0], PairItem):
        batch["token_type_ids"] = pad([i.token_type_ids for i in items], 0)
        batch["next_sentence_label"] = torch.tensor([i.next_label for i in items])
    return batch


class MaskedLMLoss(nn.Module):
    """Cross-entropy on the selected tokens (plus NSP on each pair for a BertForPreTraining model).

    For BERT-style models the prediction head runs on the selected positions only (15% of the tokens).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, next_sentence_label: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hf = unwrap_peft(self.model)
        keep = labels != IGNORE  # (B, T)
        heads = getattr(hf, "cls", None)
        predictions = getattr(heads, "predictions", heads)
        if predictions is not None:
            out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            logits = predictions(out.last_hidden_state[keep])  # (N, V)
        else:  # other encoders: full logits
            out = None
            logits = hf(input_ids=input_ids, attention_mask=attention_mask).logits[keep]
        loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        n = keep.sum()
        if next_sentence_label is not None:
            if out is None or heads is None or getattr(heads, "seq_relationship", None) is None:
                raise ConfigError("pretrain.nsp needs a BERT pretraining model (built with pretrain.scratch arch bert)")
            nsp = heads.seq_relationship(out.pooler_output)  # (B, 2)
            loss = loss + F.cross_entropy(nsp.float(), next_sentence_label, reduction="sum")
            n = n + next_sentence_label.numel()
        return loss, n


def load_model(ctx: ObjectiveContext, dtype: torch.dtype) -> nn.Module:
    return recipe_model(ctx, dtype, "AutoModelForMaskedLM", nsp=ctx.settings.nsp)


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    return MaskedLMLoss(model)


@torch.inference_mode()
def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Any], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Masked-token loss and accuracy on fixed masks, and pseudo-perplexity on the first held-out tokens."""
    tok = ctx.tokenizer
    model.eval()
    if not items:
        return Evaluation()
    hf = unwrap_peft(model)
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(items), 8):
        b = collate(ctx, [items[j] for j in range(i, min(i + 8, len(items)))])
        keep = b["labels"] != IGNORE
        kwargs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = hf(**kwargs)
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (B, T, V)
        sel = logits[keep]  # (N, V)
        total += float(F.cross_entropy(sel.float(), b["labels"][keep], reduction="sum"))
        correct += int((sel.argmax(-1) == b["labels"][keep]).sum())
        count += int(keep.sum())
    loss = total / max(count, 1)
    seqs = [list(items[i].input_ids) for i in range(len(items))]
    return Evaluation({"loss": loss, "perplexity": perplexity(loss), "masked_accuracy": correct / max(count, 1),
                       "masked_tokens": count,
                       "pseudo_perplexity": pseudo_perplexity(model, tok, seqs, max_tokens=256)})


@torch.inference_mode()
def pseudo_perplexity(model: nn.Module, tok: Any, seqs: list[list[int]], max_tokens: int = 256, batch: int = 32
                      ) -> float:
    """Pseudo-perplexity of a masked LM (Salazar et al. 2020): mask each token in turn, score the original.

    Costs one forward pass per scored token, so only the first `max_tokens` non-special tokens are scored.
    """
    hf = unwrap_peft(model)
    hf.eval()
    device = next(hf.parameters()).device
    special = set(tok.all_special_ids)
    jobs = [(s, i) for s in seqs for i, t in enumerate(s) if t not in special][:max_tokens]
    total = 0.0
    for k in range(0, len(jobs), batch):
        group = jobs[k:k + batch]
        width = max(len(s) for s, _ in group)
        x = torch.full((len(group), width), tok.pad_token_id)
        attn = torch.zeros((len(group), width), dtype=torch.long)
        for r, (s, i) in enumerate(group):
            x[r, :len(s)] = torch.tensor(s)
            attn[r, :len(s)] = 1
            x[r, i] = tok.mask_token_id
        out = hf(input_ids=x.to(device), attention_mask=attn.to(device))
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (R, W, V)
        where = torch.tensor([i for _, i in group], device=device)
        picked = logits[torch.arange(len(group), device=device), where]  # (R, V)
        target = torch.tensor([s[i] for s, i in group], device=device)
        total += float(F.cross_entropy(picked.float(), target, reduction="sum"))
    return math.exp(min(total / max(len(jobs), 1), 50.0))


register_objective("mlm", "masked LM for encoders (15%, 80/10/10, optional whole words and NSP)", settings=MlmSettings,
                   tokenizer=recipe_tokenizer, model=load_model, prepare=prepare, collate=collate, count=count_labels,
                   build=build, evaluate=evaluate, train_on_prompt=True, metrics=("perplexity", "masked_accuracy"))
