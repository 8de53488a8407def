"""Baselines beside every evaluation: majority class and TF-IDF + logistic regression for classification, the
nearest training question's answer (BM25) and copying the input for generation; the verdict against them."""

from __future__ import annotations

import json
import random

import pytest

from lmtailor.baselines import classification_baselines, generation_baselines, multilabel_baselines, nearest_answers
from lmtailor.cli import main
from lmtailor.data.example import Example
from lmtailor.data.retrieve import with_retrieved
from lmtailor.objectives.causal import sample
from lmtailor.report import comparison_table, likely_reasons, verdict

KEYWORDS = {"sport": ["goal", "match", "league"], "money": ["bank", "loan", "interest"]}
FILLER = ["the", "a", "of", "and", "to", "in", "that", "it", "with", "for", "on", "as", "was", "this", "by", "at"]


def _texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of filler words with one planted keyword of their label: TF-IDF separates them, word order does not."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 8) + [rng.choice(KEYWORDS[["sport", "money"][label]])]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_tfidf_separates_planted_keywords_and_majority_does_not():
    train, y_train = _texts(60, 0)
    extra, y_extra = _texts(40, 4)
    train += [t for t, y in zip(extra, y_extra, strict=True) if y == 0]  # label 0 becomes the majority
    y_train += [0] * (len(train) - len(y_train))
    test, y_test = _texts(20, 1)
    out = classification_baselines(train, y_train, test, y_test, ["sport", "money"])
    assert out["tfidf_logreg"]["accuracy"] >= 0.9 and out["tfidf_logreg"]["macro_f1"] >= 0.9
    assert out["majority"]["accuracy"] == pytest.approx(0.5) and out["majority"]["macro_f1"] < 0.5


def test_multilabel_baseline_finds_each_planted_label():
    train, y = _texts(40, 2)
    rows = [[1, 0] if label == 0 else [0, 1] for label in y]
    train += [t + " goal bank" for t in train[:10]]
    rows += [[1, 1]] * 10
    test, y_test = _texts(10, 3)
    out = multilabel_baselines(train, rows, test, [[1, 0] if v == 0 else [0, 1] for v in y_test], ["s", "m"])
    assert out["tfidf_logreg"]["micro_f1"] >= 0.8 and out["majority"]["micro_f1"] <= 0.6


def test_nearest_answer_returns_the_planted_answer():
    questions = ["how do I list files in a folder", "extract a tar archive", "count lines of a file"]
    answers = ["ls -la", "tar -xzvf a.tar.gz", "wc -l f.txt"]
    assert nearest_answers(questions, answers, ["please count the lines in my file", "list the files"]) == [
        "wc -l f.txt", "ls -la"]
    out = generation_baselines(questions, answers, ["count lines in a file", "extract the archive"],
                               ["wc -l f.txt", "tar -xzvf a.tar.gz"])
    assert out["nearest_answer"]["exact_match"] == 1.0 and out["copy_input"]["exact_match"] == 0.0
    assert out["nearest_answer"]["chrf"] > out["copy_input"]["chrf"]


def test_verdict_says_when_the_model_loses_and_why():
    baselines = {"majority": {"macro_f1": 0.4}, "tfidf_logreg": {"macro_f1": 0.96}}
    history = [{"step": i + 1, "loss": 2.0 - 0.05 * i} for i in range(30)]
    reasons = likely_reasons(history, {"train_truncated": 30, "train_examples": 100}, "macro_f1")
    text = verdict({"macro_f1": 0.76}, baselines, "macro_f1", reasons)
    assert text is not None and text.startswith("The tuned model does NOT beat the baseline tfidf_logreg on macro_f1")
    assert "0.760 vs 0.960" in text and "still falling" in text and "30% of the training examples were cut" in text
    assert "only 30 optimizer steps" in text
    won = verdict({"macro_f1": 0.97}, baselines, "macro_f1", reasons)
    assert won is not None and won.startswith("The tuned model beats the best baseline on macro_f1")
    assert verdict({"loss": 1.0}, baselines, None) is None  # language modelling: the base model is the baseline
    table = comparison_table({"loss": 1.0, "macro_f1": 0.5}, {"loss": 0.5, "macro_f1": 0.76}, 0, baselines, text)
    head, rule, *rest = table.splitlines()
    assert head.split() == ["metric", "majority", "tfidf_logreg", "before", "after", "change"]
    assert any(r.split()[:4] == ["macro_f1", "0.400", "0.960", "0.500"] for r in rest) and text in table


def test_sample_answers_show_the_request_as_written_and_indent_multiline_text():
    def chat(q, a):
        return Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    train = [chat("list files", "ls"), chat("show hidden files", "ls -a"), chat("copy a file", "cp a b")]
    _, [[ex]] = with_retrieved(train, [[chat("show all hidden files", "ls -a\n# OR\nls -A")]], 1)
    prompt = ex.messages[0]["content"]
    before = {"samples": [sample(ex, prompt, "ls -a\n# OR\nls -A", "Here is how:\n\nls -la")]}
    after = {"samples": [sample(ex, prompt, "ls -a\n# OR\nls -A", "ls -a")]}
    lines = comparison_table(before, after, 1).splitlines()
    assert "Q: show all hidden files" in lines and not any("Similar requests" in r for r in lines)
    assert "   shown:     its nearest training pair: show hidden files -> ls -a" in lines
    i = lines.index("   reference: ls -a")
    assert lines[i + 1:i + 5] == ["              # OR", "              ls -A", "   before:    Here is how:",
                                  "              ls -la"]
    assert lines[i + 5] == "   after:     ls -a"


def test_classification_run_reports_baselines_and_the_verdict(tiny_model, tmp_path, capsys, monkeypatch):
    rows = [{"text": " ".join(random.Random(i).sample(FILLER, 6) + [KEYWORDS[lab][i % 3]]), "label": lab}
            for i in range(60) for lab in ("sport", "money")]
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={run}", "objective=classify",
                 "max_steps=2", "data.val_size=20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["baselines"]) == {"majority", "tfidf_logreg"} and m["baselines"]["tfidf_logreg"]["macro_f1"] == 1.0
    # two steps of a random tiny model cannot match a keyword classifier: the run says so, with reasons
    assert m["verdict"].startswith("The tuned model does NOT beat the baseline tfidf_logreg on macro_f1")
    assert "only 2 optimizer steps" in m["verdict"] and m["verdict"] in out
    assert "tfidf_logreg" in out.split("metric")[1].splitlines()[0]
    report = (run / "report.html").read_text()
    assert "baseline: tfidf_logreg" in report and "does NOT beat" in report

    # the quality benchmark's test of the same run on a new split: the model's macro-F1 as `eval` reports it, the
    # keyword baseline's, and a p-value that calls a random head's gap to a perfect baseline real
    split = tmp_path / "split"
    split.mkdir()
    held = [{"text": " ".join(random.Random(100 + i).sample(FILLER, 6) + [KEYWORDS[lab][i % 3]]), "label": lab}
            for i in range(30) for lab in ("sport", "money")]
    (split / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    from lmtailor.evaluate import evaluate_run

    full = _quality(monkeypatch).classification_test(str(run), split)
    assert full["examples"] == 60 and full["baseline_macro_f1"] == 1.0
    assert full["macro_f1"] == pytest.approx(evaluate_run(str(run), str(split / "test.jsonl"))["macro_f1"])
    assert full["macro_f1"] < 0.9 and full["p_value"] < 0.01


def test_sft_run_scores_the_nearest_answer_baseline(tiny_model, pairs_file, tmp_path):
    run = tmp_path / "sft"
    assert main(["train", f"base_model={tiny_model}", f"data.path={pairs_file}", f"output_dir={run}",
                 "max_steps=1", "data.val_size=3", "generation.max_new_tokens=4", "--no-progress"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["baselines"]) == {"nearest_answer", "copy_input"}
    assert set(m["baselines"]["nearest_answer"]) == {"exact_match", "chrf"} and m["verdict"]


def _quality(monkeypatch):  # noqa: ANN202
    from conftest import load_benchmark

    return load_benchmark("quality", monkeypatch)


def test_macro_f1_rows_agree_with_the_reported_metric(monkeypatch):
    import numpy as np

    from lmtailor.metrics import classification_metrics

    quality = _quality(monkeypatch)
    rng = random.Random(3)
    gold = [rng.randrange(4) for _ in range(60)]  # label 4 of 5 is not gold: averaged only where predicted
    preds = [[g if rng.random() < p else rng.randrange(5) for g in gold] for p in (0.2, 0.6, 0.9)]
    rows = quality.macro_f1_rows(np.asarray(gold), np.asarray(preds), 5)
    names = ["a", "b", "c", "d", "e"]
    assert rows.tolist() == pytest.approx([classification_metrics(gold, p, names)["macro_f1"] for p in preds])
    perfect = quality.macro_f1_rows(np.asarray(gold), np.asarray([gold]), 5)
    assert perfect.tolist() == [1.0]  # the label no one has does not count against it


def test_paired_macro_f1_test_tells_a_real_difference_from_noise(monkeypatch):
    quality = _quality(monkeypatch)
    rng = random.Random(5)
    gold = [rng.randrange(3) for _ in range(200)]
    good = [g if rng.random() < 0.9 else (g + 1) % 3 for g in gold]
    weak = [g if rng.random() < 0.5 else (g + 1) % 3 for g in gold]
    twin = [g if rng.random() < 0.9 else (g + 1) % 3 for g in gold]  # as good as `good`, wrong elsewhere
    assert quality.paired_macro_f1_test(gold, weak, good, 3, trials=2000) < 0.01
    assert quality.paired_macro_f1_test(gold, twin, good, 3, trials=2000) > 0.05
    assert quality.paired_macro_f1_test(gold, good, good, 3, trials=500) == 1.0  # identical systems
