"""Sequence classification on any backbone: `objective: classify`.

Encoder models (BERT-style) classify from their pooled first token; decoder models (llama-style, e.g. the bundled
SmolLM2) put the head on the last non-pad token, which transformers finds as the rightmost token that is not
`config.pad_token_id`. Batches are therefore right-padded, texts get no EOS appended (pad is EOS on SmolLM2),
and `pad_token_id` is always set in the model config.

The label set is fixed by `fit` from the training data (or `classify.labels`) into the context; label names <-> ids
then live in the model config (id2label / label2id), which is saved with full models and, for LoRA runs, next to
the adapter (see models.save_model), so a run folder reloads with its labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmtailor.config import Strict
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError, DataError
from lmtailor.metrics import classification_metrics, multilabel_metrics
from lmtailor.models import unwrap_peft
from lmtailor.objectives.augment import augment_batch
from lmtailor.objectives.common import override_dropout, recipe_tokenizer
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import clip_text

EVAL_BATCH = 32


class AugmentSettings(Strict):
    token_dropout: float = Field(0.0, ge=0, lt=1, description="chance each training token is dropped")
    token_swap: float = Field(0.0, ge=0, lt=1, description="chance each training token swaps places with the next")


class ClassifySettings(Strict):
    """`classify:` options."""

    labels: list[str] | None = Field(None, description="label names in id order (default: the sorted labels of "
                                     "the training data)")
    multi_label: bool = Field(False, description="an example may carry several labels (joined by label_separator); "
                              "sigmoid outputs")
    label_separator: str = Field(",", min_length=1, description="multi_label: separator inside a label")
    threshold: float = Field(0.5, gt=0, lt=1, description="multi_label: probability that switches a label on")
    class_weights: Literal["none", "balanced"] | dict[str, float] = Field(
        "none", description="loss weight per label: none, balanced (inverse frequency) or {label: w}")
    sampling: Literal["shuffle", "balanced"] = Field(
        "shuffle", description="training order per epoch: shuffle (each example once), or balanced (as many "
        "examples drawn with replacement, weighted 1 / count of their label, so labels come about equally often; "
        "multi_label: of their label set)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    dropout: float | None = Field(None, ge=0, lt=1, description="override every dropout probability of the model "
                                  "config")
    augment: AugmentSettings = Field(default_factory=AugmentSettings)


@dataclass
class ClassItem:
    """One tokenized example: `label` is a class id, or a 0/1 vector for multi-label."""

    input_ids: list[int]
    label: int | list[float]


def example_labels(ex: Example, s: ClassifySettings) -> list[str]:
    """The label name(s) of a labeled example (multi-label: split on classify.label_separator)."""
    if ex.text is None or "label" not in ex.meta:
        raise DataError(f"{ex.source}: objective classify needs labeled records (fields text and label)",
                        "use data.format: labeled, with a text and a label column")
    raw = str(ex.meta["label"])
    if s.multi_label:
        return [p.strip() for p in raw.split(s.label_separator) if p.strip()]
    return [raw]


def class_weights(names: list[str], counts: dict[str, int], s: ClassifySettings) -> list[float] | None:
    """Per-class loss weights: none, balanced (n / (classes * count)) or given per label name."""
    spec = s.class_weights
    if spec == "none":
        return None
    if isinstance(spec, dict):
        unknown = set(spec) - set(names)
        if unknown:
            raise ConfigError(f"config key 'classify.class_weights': unknown label(s) {sorted(unknown)}",
                              f"labels are {names}")
        return [float(spec.get(n, 1.0)) for n in names]
    total = sum(counts.values())
    return [total / (len(names) * counts[n]) if counts.get(n) else 1.0 for n in names]


# ---- hooks --------------------------------------------------------------------------------------------------

def fit(ctx: ObjectiveContext, examples: list[Example]) -> None:
    """Fix the label set (classify.labels, else the sorted labels of the training data) and count the labels."""
    s: ClassifySettings = ctx.settings
    counts = Counter(name for ex in examples for name in example_labels(ex, s))
    names = list(s.labels) if s.labels else sorted(counts)
    if len(names) < 2:
        raise ConfigError(f"classification needs at least two labels; the training data has {names}",
                          "check data.path, or list them in classify.labels")
    ctx.labels = names
    ctx.stats["label_counts"] = dict(sorted(counts.items()))


def load_model(ctx: ObjectiveContext, dtype: torch.dtype) -> nn.Module:
    """A sequence-classification model on base_model with a new head sized from the label set."""
    from lmtailor.models import load_model_config, load_pretrained

    cfg, s, names = ctx.cfg, ctx.settings, ctx.labels
    assert names is not None, "fit sets the labels before the model loads"
    config = load_model_config(cfg.base_model, cfg.trust_remote_code)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = "multi_label_classification" if s.multi_label else "single_label_classification"
    config.pad_token_id = ctx.tokenizer.pad_token_id  # decoder heads find the last token by it
    if s.dropout is not None:
        override_dropout(config, s.dropout)
    return load_pretrained(cfg.base_model, "AutoModelForSequenceClassification", dtype=dtype, config=config,
                           trust_remote_code=cfg.trust_remote_code)


def prepare(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[ClassItem], dict[str, Any]]:
    """Tokenize texts (truncated at max_length, no EOS added) and map labels to ids in the label set's order."""
    s: ClassifySettings = ctx.settings
    tok, max_length = ctx.tokenizer, ctx.cfg.max_length
    assert ctx.labels is not None, "fit (or the trained model) sets the labels before prepare"
    index = {n: i for i, n in enumerate(ctx.labels)}
    items: list[ClassItem] = []
    truncated = 0
    counts: Counter[str] = Counter()
    for ex in examples:
        wanted = example_labels(ex, s)
        counts.update(wanted)
        unknown = [w for w in wanted if w not in index]
        if unknown:
            raise DataError(f"{ex.source}: label {unknown[0]!r} is not one of the labels {ctx.labels}",
                            "list every label in classify.labels, or fix the record")
        ids = tok(clip_text(tok, ex.text or "", max_length), add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            truncated += 1
            # keep a closing special token (BERT's [SEP]) where the tokenizer adds one
            ids = ids[:max_length - 1] + ids[-1:] if ids[-1] in tok.all_special_ids else ids[:max_length]
        if s.multi_label:
            vec = [0.0] * len(index)
            for w in wanted:
                vec[index[w]] = 1.0
            items.append(ClassItem(ids, vec))
        else:
            items.append(ClassItem(ids, index[wanted[0]]))
    return items, {"examples": len(items), "tokens": sum(len(i.input_ids) for i in items), "truncated": truncated,
                   "labels": dict(sorted(counts.items()))}


def collate_items(items: list[ClassItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids and attention_mask, and labels (B,) ids or (B, C) 0/1 floats."""
    width = max(len(i.input_ids) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, item in enumerate(items):
        ids[r, :len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[r, :len(item.input_ids)] = 1
    multi = isinstance(items[0].label, list)
    labels = torch.tensor([i.label for i in items], dtype=torch.float32 if multi else torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(ctx: ObjectiveContext, items: list[ClassItem]) -> dict[str, torch.Tensor]:
    return collate_items(items, ctx.tokenizer.pad_token_id)


def count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].shape[0])


def sample_weights(ctx: ObjectiveContext, items: Sequence[ClassItem]) -> np.ndarray | None:
    """classify.sampling=balanced: per-item draw probabilities 1 / count(label), normalized, so each label
    (multi-label: each distinct label set) is drawn equally often in expectation; None for a plain shuffle."""
    if ctx.settings.sampling != "balanced":
        return None
    keys = [tuple(i.label) if isinstance(i.label, list) else i.label for i in items]
    counts = Counter(keys)
    weights = np.array([1.0 / counts[k] for k in keys])
    return weights / weights.sum()


@dataclass
class LossSpec:
    """How the loss treats labels (built from the settings and the label counts)."""

    weights: list[float] | None = None
    label_smoothing: float = 0.0
    multi_label: bool = False
    pad_id: int = 0
    p_drop: float = 0.0
    p_swap: float = 0.0


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    s: ClassifySettings = ctx.settings
    names = ctx.labels or []
    spec = LossSpec(class_weights(names, ctx.stats.get("label_counts", {}), s), s.label_smoothing, s.multi_label,
                    ctx.tokenizer.pad_token_id, s.augment.token_dropout, s.augment.token_swap)
    return ClassifyLoss(model, spec)


class ClassifyLoss(nn.Module):
    """Summed (weighted, smoothed) cross-entropy over examples, or mean-over-classes BCE for multi-label."""

    def __init__(self, model: nn.Module, spec: LossSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        if torch.is_grad_enabled() and (s.p_drop or s.p_swap):  # training batches only, never evaluation
            input_ids, attention_mask = augment_batch(input_ids, attention_mask, s.pad_id, s.p_drop, s.p_swap)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, C)
        weight = torch.tensor(s.weights, device=logits.device) if s.weights else None
        if s.multi_label:
            target = labels * (1 - s.label_smoothing) + s.label_smoothing / 2
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, C)
            if weight is not None:
                loss = loss * weight
            loss = loss.mean(-1).sum()
        else:
            loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=s.label_smoothing, reduction="sum")
        return loss, torch.tensor(labels.shape[0], device=logits.device)


@torch.inference_mode()
def probabilities(model: nn.Module, tok: Any, items: list[ClassItem], multi_label: bool,
                  batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """(N, C) class probabilities (softmax, or sigmoid for multi-label), in the order of `items`."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # similar lengths share a batch
    out = torch.zeros(len(items), 0)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_items([items[i] for i in idx], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()  # (b, C)
        if out.shape[1] == 0:
            out = torch.zeros(len(items), logits.shape[1])
        out[idx] = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
    return out


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[ClassItem], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Loss, accuracy, macro-F1, per-class report and confusion matrix (also as a PNG artifact) on held-out items."""
    from lmtailor.report import confusion_png

    if not items:
        return Evaluation()
    s: ClassifySettings = ctx.settings
    config = unwrap_peft(model).config
    names = [config.id2label[i] for i in range(config.num_labels)]
    probs = probabilities(model, ctx.tokenizer, list(items), s.multi_label)
    if s.multi_label:
        gold = torch.tensor([i.label for i in items])
        loss = float(F.binary_cross_entropy_with_logits(torch.logit(probs.clamp(1e-7, 1 - 1e-7)), gold))
        pred = (probs >= s.threshold).int()
        metrics: dict[str, Any] = {"loss": loss, **multilabel_metrics(gold.int().tolist(), pred.tolist(), names)}
    else:
        gold_ids = [int(i.label) for i in items]  # type: ignore[arg-type]
        loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), torch.tensor(gold_ids)))
        metrics = {"loss": loss, **classification_metrics(gold_ids, probs.argmax(-1).tolist(), names)}
    metrics["examples"] = len(items)
    artifacts = {}
    if "confusion_matrix" in metrics:
        title = f"{desc + ': ' if desc else ''}accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
        artifacts["confusion_matrix"] = confusion_png(metrics["confusion_matrix"], names, title)
    return Evaluation(metrics, artifacts)


def baseline(ctx: ObjectiveContext, train: Sequence[Example], val: Sequence[Example]) -> dict[str, dict[str, float]]:
    """The majority class and TF-IDF + logistic regression, trained on the training texts, scored on the held-out
    ones with the metrics `evaluate` reports."""
    from lmtailor.baselines import classification_baselines, multilabel_baselines

    s: ClassifySettings = ctx.settings
    names = ctx.labels or []
    index = {n: i for i, n in enumerate(names)}
    if not val or not names:
        return {}
    texts = [str(ex.text) for ex in train]
    held = [str(ex.text) for ex in val]
    if s.multi_label:
        def rows(exs: Sequence[Example]) -> list[list[int]]:
            return [[int(n in example_labels(ex, s)) for n in names] for ex in exs]
        return multilabel_baselines(texts, rows(train), held, rows(val), names)
    return classification_baselines(texts, [index[example_labels(ex, s)[0]] for ex in train], held,
                                    [index[example_labels(ex, s)[0]] for ex in val], names)


def predict(run: Any, texts: list[str], batch_size: int = EVAL_BATCH
            ) -> list[tuple[str | list[str], dict[str, float]]]:
    """Classify texts with a trained run (a folder or an opened `Run`): [(label, {label: probability})];
    multi-label runs give a list of labels."""
    from lmtailor.runs import Run

    opened = run if isinstance(run, Run) else Run.open(run)
    model, tok = opened.load()
    hf = unwrap_peft(model)
    names = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    multi = hf.config.problem_type == "multi_label_classification"
    threshold = float((opened.config.get("classify") or {}).get("threshold", 0.5))
    max_length = int(opened.config.get("max_length", 512))
    items = [ClassItem(tok(t, add_special_tokens=True)["input_ids"][:max_length], 0) for t in texts]
    probs = probabilities(model, tok, items, multi, batch_size)
    out: list[tuple[str | list[str], dict[str, float]]] = []
    for row in probs.tolist():
        scores = dict(zip(names, row, strict=True))
        chosen: str | list[str] = ([n for n, p in scores.items() if p >= threshold] if multi
                                   else names[max(range(len(row)), key=row.__getitem__)])
        out.append((chosen, scores))
    return out


register_objective("classify", "sequence classification: a label per text (labeled data), head on any backbone",
                   settings=ClassifySettings, tokenizer=recipe_tokenizer, fit=fit, model=load_model, prepare=prepare,
                   collate=collate, count=count, build=build, evaluate=evaluate, sample_weights=sample_weights,
                   baseline=baseline, task_report=True, primary_metric="macro_f1")
