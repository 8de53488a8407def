"""Every metric lmtailor reports, defined once: perplexity, classification (scikit-learn) and generated text
against references (sacrebleu, rouge-score, exact match).

Each function takes plain Python lists and returns plain floats/dicts, so they are easy to test against the
libraries they wrap and can be written to JSON as they are. Scores on a 0-100 scale follow sacrebleu (BLEU,
chrF); ROUGE, exact match, accuracy and F1 are fractions in [0, 1].

Exact match compares `normalize_answer` forms: surrounding whitespace and backticks stripped, runs of whitespace
collapsed to one space; case and punctuation inside the answer count. chrF, BLEU and ROUGE see the raw texts.

An answer loops (`looping`) when its whitespace-separated words hold one n-gram of 1-8 words repeated right
after itself so that at least 3 copies in a row cover at least 6 words: "-r -o -r -o -r -o" (3 x 2 words) and
"de los hijos de los hijos de los hijos" (3 x 3) loop; "a a", "very very very good" (3 x 1 word), "* * * * *"
(5 x 1) and ordinary commands do not. A loop without spaces counts too: one word of at least 32 characters made
of 3 or more copies in a row of a 1-16-character chunk ("10000000000000000000000000000000000000000",
"^[0-9]{1,3}|^[0-9]{1,3}|^[0-9]{1,3}|"). Words and characters, not model tokens, so the share compares across
tokenizers.

Tool calls (`tool_call_metrics`): each answer is parsed by the server's rule (`lmtailor.toolcalls.parse_tool_calls`,
only the offered tools count) and its first call compared with the reference's first call: `tool_call_parsed`
(share of answers holding at least one valid call), `tool_name_accuracy` (first call names the reference's tool),
`tool_args_exact` (same name and arguments equal as JSON values) and `tool_args_chrf` (chrF of the argument values,
in key order, against the reference's; an answer without a call counts as empty).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

# Lower is better for these; every other metric is better when higher.
LOWER_IS_BETTER = ("loss", "perplexity", "looping")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric name (`val_` prefix allowed): loss-like metrics go down, the others up."""
    name = metric.removeprefix("val_")
    return not (name in LOWER_IS_BETTER or name.endswith("_loss"))


def perplexity(loss: float) -> float:
    """exp(mean token loss in nats), capped at exp(50) so a diverged loss stays a finite number."""
    return math.exp(min(loss, 50.0))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, a per-class report and the confusion matrix (rows: truth, columns: prediction).

    Macro-F1 averages over the labels that occur in `y_true` or `y_pred` (sklearn's own default): a label that
    neither the split nor the model has is not a mistake, and counting it as F1 0 capped a perfect model's score
    at the share of labels the split happens to hold (7 of 10 on python-docs-sections' 49 test pages: at most
    0.7). A label the model predicts but the split lacks still counts, at 0.

    Args:
        y_true: gold label ids.
        y_pred: predicted label ids.
        labels: label names in id order (classes absent from both lists still get a row in the report and the
            confusion matrix).
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    present = sorted({*map(int, y_true), *map(int, y_pred)}) or ids
    report = classification_report(y_true, y_pred, labels=ids, target_names=list(labels), output_dict=True,
                                   zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
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
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100; nan for no references."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score) if refs else float("nan")


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


def normalize_answer(text: str) -> str:
    """The form exact match compares: strip whitespace and surrounding backticks, collapse runs of whitespace."""
    return re.sub(r"\s+", " ", text.strip().strip("`").strip())


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize_answer` (nan for no references)."""
    if not refs:
        return float("nan")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs, strict=True)) / len(refs)


def text_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """BLEU, chrF, ROUGE-1/2/L and exact match of generated texts against one reference each."""
    if not refs:
        return {}
    return {"bleu": bleu(preds, refs), "chrf": chrf(preds, refs), **rouge(preds, refs),
            "exact_match": exact_match(preds, refs)}


# `looping`: >= LOOP_COPIES copies in a row of an n-gram of 1..LOOP_MAX_WORDS words covering >= LOOP_MIN_WORDS
# words, or, inside one word, of a chunk of 1..LOOP_MAX_CHARS characters covering >= LOOP_MIN_CHARS characters.
LOOP_COPIES = 3
LOOP_MAX_WORDS = 8
LOOP_MIN_WORDS = 6
LOOP_MAX_CHARS = 16
LOOP_MIN_CHARS = 32


def _repeats(items: Sequence[Any], max_n: int, floor: int) -> bool:
    """Whether `items` hold LOOP_COPIES or more copies in a row of one n-gram (n <= max_n) covering >= floor items."""
    for n in range(1, max_n + 1):
        need = max(LOOP_COPIES * n, floor)  # items the repeated stretch must cover
        if need > len(items):
            break
        run = 0  # consecutive items equal to the one n before them: the stretch holds run + n items
        for i in range(n, len(items)):
            run = run + 1 if items[i] == items[i - n] else 0
            if run + n >= need:
                return True
    return False


def looping(text: str) -> bool:
    """Whether a generated answer loops: see the module docstring for the rule and its examples."""
    words = text.split()
    return _repeats(words, LOOP_MAX_WORDS, LOOP_MIN_WORDS) or any(
        _repeats(w, LOOP_MAX_CHARS, LOOP_MIN_CHARS) for w in words if len(w) >= LOOP_MIN_CHARS)


def looping_share(preds: Sequence[str]) -> float:
    """Share of answers that loop (`looping`), in [0, 1]; nan for no answers."""
    return sum(looping(p) for p in preds) / len(preds) if preds else float("nan")


def tool_call_metrics(preds: Sequence[str], refs: Sequence[list[dict[str, Any]]],
                      tools: Sequence[list[dict[str, Any]] | None]) -> dict[str, float]:
    """Tool-call scores of answers against reference calls (see the module docstring); {} for no references.

    Args:
        preds: the model's answers as text.
        refs: per answer, the reference calls ({"function": {"name", "arguments": object}}).
        tools: per answer, the tools offered (None: any name parses).
    """
    from lmtailor.toolcalls import parse_tool_calls

    if not refs:
        return {}
    parsed = names = exact = 0
    got_args: list[str] = []
    ref_args: list[str] = []
    for pred, ref, offered in zip(preds, refs, tools, strict=True):
        _, calls = parse_tool_calls(pred, offered)
        want = ref[0]["function"]
        want_args = want["arguments"]
        ref_args.append("\n".join(str(want_args[k]) for k in sorted(want_args)))
        if not calls:
            got_args.append("")
            continue
        parsed += 1
        name = calls[0]["function"]["name"]
        args = json.loads(calls[0]["function"]["arguments"])
        names += name == want["name"]
        exact += name == want["name"] and args == want_args
        got_args.append("\n".join(str(args[k]) for k in sorted(args)))
    n = len(refs)
    return {"tool_call_parsed": parsed / n, "tool_name_accuracy": names / n, "tool_args_exact": exact / n,
            "tool_args_chrf": chrf(got_args, ref_args)}
