"""Sequence classification on any backbone: `objective: classify`.

Encoder models (BERT-style) classify from their pooled first token; decoder models (llama-style, e.g. the bundled
SmolLM2) put the head on the last non-pad token, which transformers finds as the rightmost token that is not
`config.pad_token_id`. Batches are therefore right-padded, texts get no EOS appended (pad is EOS on SmolLM2),
and `pad_token_id` is always set in the model config.

Label names <-> ids live in the model config (id2label / label2id), which is saved with full models and, for
LoRA runs, next to the adapter (see models.save_model), so a run folder reloads with its labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError, DataError
from lmtailor.models import unwrap_peft
from lmtailor.objectives import register_objective
from lmtailor.tasks.augment import augment_batch

EVAL_BATCH = 32


@dataclass
class ClassItem:
    """One tokenized example: `label` is a class id, or a 0/1 vector for multi-label."""

    input_ids: list[int]
    label: int | list[float]


@dataclass
class LossSpec:
    """How the loss treats labels; set on the model by `load` (build only receives the model)."""

    weights: list[float] | None = None
    label_smoothing: float = 0.0
    multi_label: bool = False
    pad_id: int = 0
    p_drop: float = 0.0
    p_swap: float = 0.0


@dataclass
class _Labels:
    names: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}


def example_labels(ex: Example, cfg: RunConfig) -> list[str]:
    """The label name(s) of a labeled example (multi-label: split on task.label_separator)."""
    if ex.text is None or "label" not in ex.meta:
        raise DataError(f"{ex.source}: objective classify needs labeled records (fields text and label)",
                        "use data.format: labeled, with a text and a label column")
    raw = str(ex.meta["label"])
    if cfg.task.multi_label:
        return [p.strip() for p in raw.split(cfg.task.label_separator) if p.strip()]
    return [raw]


def label_names(examples: list[Example], cfg: RunConfig) -> list[str]:
    """task.labels if given, else the sorted distinct labels of the examples."""
    if cfg.task.labels:
        return list(cfg.task.labels)
    names = sorted({name for ex in examples for name in example_labels(ex, cfg)})
    if len(names) < 2:
        raise ConfigError(f"classification needs at least two labels; the training data has {names}",
                          "check data.path, or list them in task.labels")
    return names


def class_weights(examples: list[Example], names: list[str], cfg: RunConfig) -> list[float] | None:
    """Per-class loss weights: none, balanced (n / (classes * count)) or given per label name."""
    spec = cfg.task.class_weights
    if spec == "none":
        return None
    if isinstance(spec, dict):
        unknown = set(spec) - set(names)
        if unknown:
            raise ConfigError(f"config key 'task.class_weights': unknown label(s) {sorted(unknown)}",
                              f"labels are {names}")
        return [float(spec.get(n, 1.0)) for n in names]
    counts = Counter(name for ex in examples for name in example_labels(ex, cfg))
    total = sum(counts.values())
    return [total / (len(names) * counts[n]) if counts[n] else 1.0 for n in names]


def balanced_weights(items: list[ClassItem]) -> np.ndarray:
    """task.sampling=balanced: per-item draw probabilities 1 / count(label), normalized, so each label (multi-label:
    each distinct label set) is drawn equally often in expectation."""
    keys = [tuple(i.label) if isinstance(i.label, list) else i.label for i in items]
    counts = Counter(keys)
    weights = np.array([1.0 / counts[k] for k in keys])
    return weights / weights.sum()


def override_dropout(config: Any, p: float) -> list[str]:
    """Set every float dropout probability of a transformers config to p; returns the names changed."""
    changed = []
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float) and hasattr(config, key):
            setattr(config, key, p)
            changed.append(key)
    return changed


# ---- hooks --------------------------------------------------------------------------------------------------

def load(cfg: RunConfig, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A sequence-classification model on base_model with a new head sized from the labels of the training data."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lmtailor.data.validate import load_datasets
    from lmtailor.models import _load_errors, load_tokenizer, resolve_model

    tok = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    train_ex, _, _ = load_datasets(cfg.data)
    names = label_names(train_ex, cfg)
    cfg.task.labels = names  # one label <-> id mapping for training, validation and the saved config.yaml
    folder = resolve_model(cfg.base_model)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        config.problem_type = "multi_label_classification" if cfg.task.multi_label else "single_label_classification"
        config.pad_token_id = tok.pad_token_id  # decoder heads find the last token by it
        if cfg.task.dropout is not None:
            override_dropout(config, cfg.task.dropout)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _load_errors(cfg.base_model, e) from e
    aug = cfg.task.augment
    model.lmtailor_loss = LossSpec(class_weights(train_ex, names, cfg), cfg.task.label_smoothing,
                                   cfg.task.multi_label, tok.pad_token_id, aug.token_dropout, aug.token_swap)
    return model, tok


def prepare(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool = False
            ) -> tuple[list[ClassItem], dict[str, Any]]:
    """Tokenize texts (truncated at max_length, no EOS added) and map labels to ids in task.labels order.

    `load` writes the labels it found into cfg.task.labels, so training and validation share one mapping.
    """
    names = _Labels(label_names(examples, cfg))
    items: list[ClassItem] = []
    truncated = 0
    for ex in examples:
        wanted = example_labels(ex, cfg)
        unknown = [w for w in wanted if w not in names.index]
        if unknown:
            raise DataError(f"{ex.source}: label {unknown[0]!r} is not one of the labels {names.names}",
                            "list every label in task.labels, or fix the record")
        ids = tok(ex.text, add_special_tokens=True)["input_ids"]
        if len(ids) > cfg.max_length:
            truncated += 1
            # keep a closing special token (BERT's [SEP]) where the tokenizer adds one
            ids = ids[:cfg.max_length - 1] + ids[-1:] if ids[-1] in tok.all_special_ids else ids[:cfg.max_length]
        if cfg.task.multi_label:
            vec = [0.0] * len(names.names)
            for w in wanted:
                vec[names.index[w]] = 1.0
            items.append(ClassItem(ids, vec))
        else:
            items.append(ClassItem(ids, names.index[wanted[0]]))
    counts = Counter(n for ex in examples for n in example_labels(ex, cfg))
    return items, {"examples": len(items), "tokens": sum(len(i.input_ids) for i in items), "truncated": truncated,
                   "labels": dict(sorted(counts.items()))}


def collate(items: list[ClassItem], tok: Any, cfg: RunConfig | None = None) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids and attention_mask, and labels (B,) ids or (B, C) 0/1 floats."""
    width = max(len(i.input_ids) for i in items)
    ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, item in enumerate(items):
        ids[r, :len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[r, :len(item.input_ids)] = 1
    multi = isinstance(items[0].label, list)
    labels = torch.tensor([i.label for i in items], dtype=torch.float32 if multi else torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].shape[0])


class ClassifyLoss(nn.Module):
    """Summed (weighted, smoothed) cross-entropy over examples, or mean-over-classes BCE for multi-label."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spec: LossSpec = getattr(unwrap_peft(model), "lmtailor_loss", None) or LossSpec()

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
        batch = collate([items[i] for i in idx], tok)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()  # (b, C)
        if out.shape[1] == 0:
            out = torch.zeros(len(items), logits.shape[1])
        out[idx] = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
    return out


def evaluate(model: nn.Module, tok: Any, items: list[ClassItem], examples: list[Example], cfg: RunConfig,
             label: str = "", progress: bool = True, out_dir: Path | None = None) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, per-class report and confusion matrix on the held-out items.

    "before:" and "after:" evaluations also draw the confusion matrix PNG into the run folder (or out_dir) and
    feed the task report.
    """
    from lmtailor.tasks.metrics import classification_metrics, confusion_png, multilabel_metrics
    from lmtailor.tasks.report import record_eval

    if not items:
        return {}
    names = [unwrap_peft(model).config.id2label[i] for i in range(unwrap_peft(model).config.num_labels)]
    probs = probabilities(model, tok, items, cfg.task.multi_label)
    if cfg.task.multi_label:
        gold = torch.tensor([i.label for i in items])
        loss = float(F.binary_cross_entropy_with_logits(torch.logit(probs.clamp(1e-7, 1 - 1e-7)), gold))
        pred = (probs >= cfg.task.threshold).int()
        metrics: dict[str, Any] = {"loss": loss, **multilabel_metrics(gold.int().tolist(), pred.tolist(), names)}
    else:
        gold_ids = [int(i.label) for i in items]  # type: ignore[arg-type]
        loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), torch.tensor(gold_ids)))
        metrics = {"loss": loss, **classification_metrics(gold_ids, probs.argmax(-1).tolist(), names)}
    metrics["examples"] = len(items)
    folder = out_dir or cfg.run_dir
    stage = label.rstrip(":").strip()
    images = []
    if (stage in ("before", "after") or out_dir is not None) and "confusion_matrix" in metrics and folder.is_dir():
        name = "confusion_matrix.png" if stage == "after" else f"confusion_matrix_{stage}.png"
        confusion_png(metrics["confusion_matrix"], names, folder / name,
                      f"{stage}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        images = ["confusion_matrix_before.png", "confusion_matrix.png"]
    if out_dir is None:
        record_eval(cfg.run_dir, label, metrics, images)
    return metrics


# ---- using a trained run ------------------------------------------------------------------------------------

def load_classifier(run: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a classification run folder (full model or LoRA adapter + head); returns (model, tokenizer, run config)."""
    from lmtailor.errors import CheckpointError
    from lmtailor.models import load_head_run, run_config

    run = Path(run)
    folder = run / "model" if (run / "model").is_dir() else run
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no classification model in {run} (config.json missing)",
                              "give a run folder written by `lmtailor train` with objective: classify")
    model, tok = load_head_run(run, folder, "AutoModelForSequenceClassification", dtype)
    return model, tok, run_config(run)


def predict(run: str | Path, texts: list[str], batch_size: int = EVAL_BATCH
            ) -> list[tuple[str | list[str], dict[str, float]]]:
    """Classify texts with a trained run: [(label, {label: probability})]; multi-label runs give a list of labels."""
    model, tok, info = load_classifier(run)
    hf = unwrap_peft(model)
    names = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    multi = hf.config.problem_type == "multi_label_classification"
    threshold = float((info.get("task") or {}).get("threshold", 0.5))
    max_length = int(info.get("max_length", 512))
    items = [ClassItem(tok(t, add_special_tokens=True)["input_ids"][:max_length], 0) for t in texts]
    probs = probabilities(model, tok, items, multi, batch_size)
    out: list[tuple[str | list[str], dict[str, float]]] = []
    for row in probs.tolist():
        scores = dict(zip(names, row, strict=True))
        chosen: str | list[str] = ([n for n, p in scores.items() if p >= threshold] if multi
                                   else names[max(range(len(row)), key=row.__getitem__)])
        out.append((chosen, scores))
    return out


def evaluate_run(target: str | Path, data: str, fmt: str = "auto", out: str | None = None) -> dict[str, Any]:
    """`lmtailor eval` for a classification run: metrics on a labeled data file, confusion matrix PNG beside out."""
    from lmtailor.config import build_config
    from lmtailor.data.validate import load_examples
    from lmtailor.io import atomic_write_json

    model, tok, info = load_classifier(target)
    cfg = build_config({k: v for k, v in info.items() if k in RunConfig.model_fields}, f"{target}/config.yaml")
    hf = unwrap_peft(model)
    cfg.task.labels = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    examples = load_examples(data, "labeled" if fmt == "auto" else fmt)
    items, _ = prepare(tok, examples, cfg)
    folder = Path(out).parent if out else Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(model, tok, items, examples, cfg, label="eval:", progress=False, out_dir=folder)
    metrics.update(model=str(target), data=data)
    if out:
        atomic_write_json(out, metrics)
    return metrics


register_objective("classify", "sequence classification: a label per text (labeled data), head on any backbone",
                   ClassifyLoss, load=load, prepare=prepare, collate=collate, count=count, evaluate=evaluate)
