"""The obvious alternatives a tuned model must beat, scored on the same held-out split with the same metrics.

- Classification: the majority class, and TF-IDF (word 1-2-grams, sublinear tf) + logistic regression trained on
  the training split (scikit-learn; seconds on thousands of texts).
- Generation: the answer of the most similar training prompt (BM25 over the training prompts, `rank-bm25`), and
  copying the input (for tasks whose output restates or transforms the input).

Inputs are plain lists, so the functions are easy to test and cost nothing to call from an evaluation.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lmtailor.metrics import classification_metrics, multilabel_metrics, text_metrics

# The metrics a baseline row reports (per-class reports and confusion matrices stay with the tuned model).
CLASSIFICATION_KEYS = ("accuracy", "macro_f1", "weighted_f1", "micro_f1")


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in CLASSIFICATION_KEYS if k in metrics}


def classification_baselines(train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str],
                             test_labels: Sequence[int], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{"majority": metrics, "tfidf_logreg": metrics} for single-label data (labels are ids into `names`)."""
    majority = Counter(train_labels).most_common(1)[0][0]
    out = {"majority": _summary(classification_metrics(test_labels, [majority] * len(test_labels), names))}
    if len(set(train_labels)) > 1:
        pred = tfidf_logreg_predictions(train_texts, train_labels, test_texts)
        out["tfidf_logreg"] = _summary(classification_metrics(test_labels, pred, names))
    return out


def tfidf_logreg_predictions(train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str]
                             ) -> list[int]:
    """The TF-IDF (word 1-2 grams, sublinear tf) + logistic regression baseline's label ids for `test_texts`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x = vectorizer.fit_transform(train_texts)
    model = LogisticRegression(max_iter=2000, C=10.0)
    model.fit(x, list(train_labels))
    return [int(v) for v in model.predict(vectorizer.transform(test_texts))]


def multilabel_baselines(train_texts: Sequence[str], train_sets: Sequence[Sequence[int]], test_texts: Sequence[str],
                         test_sets: Sequence[Sequence[int]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Multi-label (0/1 rows): the most frequent label set, and one TF-IDF + logistic regression per label."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    common = list(Counter(tuple(r) for r in train_sets).most_common(1)[0][0])
    out = {"majority": _summary(multilabel_metrics(test_sets, [common] * len(test_sets), names))}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x = vectorizer.fit_transform(train_texts)
    usable = [j for j in range(len(names)) if 0 < sum(r[j] for r in train_sets) < len(train_sets)]
    pred = [[0] * len(names) for _ in test_texts]
    if usable:
        model = OneVsRestClassifier(LogisticRegression(max_iter=2000, C=10.0))
        model.fit(x, [[r[j] for j in usable] for r in train_sets])
        for i, row in enumerate(model.predict(vectorizer.transform(test_texts)).tolist()):
            for j, v in zip(usable, row, strict=True):
                pred[i][j] = int(v)
    for j in range(len(names)):  # a label every training example carries (or none does) is predicted as such
        if j not in usable and train_sets:
            for row in pred:
                row[j] = int(train_sets[0][j])
    out["tfidf_logreg"] = _summary(multilabel_metrics(test_sets, pred, names))
    return out


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lowercased word tokens (what the BM25 baselines and retrieval index)."""
    return _WORD.findall(text.lower())


def nearest_answers(train_prompts: Sequence[str], train_answers: Sequence[str], prompts: Sequence[str]) -> list[str]:
    """For each prompt, the answer of the most similar training prompt by BM25 (lowercased word tokens)."""
    from rank_bm25 import BM25Okapi

    if not train_prompts:
        return ["" for _ in prompts]
    index = BM25Okapi([words(p) or [""] for p in train_prompts])
    out = []
    for prompt in prompts:
        scores = index.get_scores(words(prompt))
        best = max(range(len(scores)), key=scores.__getitem__)
        out.append(train_answers[best])
    return out


def generation_baselines(train_prompts: Sequence[str], train_answers: Sequence[str], prompts: Sequence[str],
                         refs: Sequence[str], nearest: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """{"nearest_answer": metrics, "copy_input": metrics}: BLEU, chrF, ROUGE and exact match of each baseline's
    answers against the references (`metrics.text_metrics`); `nearest`: the nearest answers when already found."""
    if not refs:
        return {}
    nearest = list(nearest) if nearest is not None else nearest_answers(train_prompts, train_answers, prompts)
    return {"nearest_answer": text_metrics(nearest, refs), "copy_input": text_metrics(list(prompts), refs)}


def answer_baselines(train_prompts: Sequence[str], train_answers: Sequence[str], prompts: Sequence[str],
                     refs: Sequence[str], nearest: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """The sft view of `generation_baselines`: exact match and chrF (the metrics its evaluation reports)."""
    full = generation_baselines(train_prompts, train_answers, prompts, refs, nearest)
    return {name: {"exact_match": m["exact_match"], "chrf": m["chrf"]} for name, m in full.items()}
