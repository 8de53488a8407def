"""Task metrics: classification (scikit-learn) and generated text against references (sacrebleu, rouge-score).

Each function takes plain Python lists and returns plain floats/dicts, so they are easy to test against the
libraries they wrap and can be written to JSON as they are. Scores on a 0-100 scale follow sacrebleu (BLEU,
chrF); ROUGE, exact match, accuracy and F1 are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Lower is better for these; every other metric is better when higher.
LOWER_IS_BETTER = ("loss", "perplexity")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric name (`val_` prefix allowed): loss-like metrics go down, the others up."""
    name = metric.removeprefix("val_")
    return not (name in LOWER_IS_BETTER or name.endswith("_loss"))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, a per-class report and the confusion matrix (rows: truth, columns: prediction).

    Args:
        y_true: gold label ids.
        y_pred: predicted label ids.
        labels: label names in id order (classes absent from both lists still get a row).
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    report = classification_report(y_true, y_pred, labels=ids, target_names=list(labels), output_dict=True,
                                   zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in labels},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def multilabel_metrics(y_true: Sequence[Sequence[int]], y_pred: Sequence[Sequence[int]],
                       labels: Sequence[str]) -> dict[str, Any]:
    """Multi-label: subset accuracy (all labels right), micro/macro F1 and per-class report over 0/1 rows."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    report = classification_report(y_true, y_pred, target_names=list(labels), output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in labels},
    }


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, one reference per prediction), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score)


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over pairs (rouge-score, with stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for p, r in zip(preds, refs, strict=True):
        scores = scorer.score(r, p)  # (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / max(len(refs), 1) for k, v in totals.items()}


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Share of predictions equal to their reference after whitespace normalization."""
    if not refs:
        return float("nan")
    return sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(preds, refs, strict=True)) / len(refs)


def text_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """BLEU, chrF, ROUGE-1/2/L and exact match of generated texts against one reference each."""
    if not refs:
        return {}
    return {"bleu": bleu(preds, refs), "chrf": chrf(preds, refs), **rouge(preds, refs),
            "exact_match": exact_match(preds, refs)}


def confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], out: Path, title: str = "") -> Path:
    """Draw a confusion matrix (rows: truth, columns: prediction) with counts in the cells into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmtailor.io import atomic_write_bytes
    from lmtailor.report import png_bytes

    n = len(labels)
    size = min(2.5 + 0.5 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write_bytes(out, png_bytes(fig))
    return out
