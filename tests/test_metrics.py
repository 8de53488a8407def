"""Task metrics equal what sacrebleu, rouge-score and scikit-learn compute on fixed inputs."""

from __future__ import annotations

import math

import pytest

from lmtailor import metrics as M

PREDS = ["the cat sat on the mat", "a quick brown fox", "hello world", "ls -la /tmp"]
REFS = ["the cat is on the mat", "the quick brown fox jumps", "hello world", "ls -l /tmp"]


def test_text_metrics_match_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    got = M.text_metrics(PREDS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expect = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS, strict=True)) / len(REFS)
        assert got[key] == pytest.approx(expect)
    assert got["exact_match"] == 0.25
    # hand-checked anchors: identical texts score perfectly
    same = M.text_metrics(REFS, REFS)
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(1.0) and same["exact_match"] == 1
    assert M.exact_match(["a  b "], ["a b"]) == 1.0 and M.text_metrics([], []) == {}


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    y_true = [0, 0, 1, 1, 2, 2, 2, 0]
    y_pred = [0, 1, 1, 1, 2, 0, 2, 0]
    got = M.classification_metrics(y_true, y_pred, ["ham", "spam", "other"])
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == 0.75
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert got["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert got["confusion_matrix"] == confusion_matrix(y_true, y_pred).tolist()
    assert got["per_class"]["spam"]["recall"] == 1.0 and got["per_class"]["spam"]["support"] == 2
    # a class neither the split nor the model has still gets its row, but is no mistake: a perfect model scores 1
    unseen = M.classification_metrics([0, 1], [0, 1], ["a", "b", "c"])
    assert unseen["macro_f1"] == 1.0 and unseen["weighted_f1"] == 1.0 and len(unseen["confusion_matrix"]) == 3
    assert unseen["per_class"]["c"]["support"] == 0
    # a class the model predicts but the split lacks counts, at 0 (sklearn's default label set)
    spurious = M.classification_metrics([0, 1, 1], [0, 1, 2], ["a", "b", "c"])
    assert spurious["macro_f1"] == pytest.approx(f1_score([0, 1, 1], [0, 1, 2], average="macro")) == pytest.approx(
        (1 + 2 / 3 + 0) / 3)


def test_multilabel_metrics_match_sklearn():
    from sklearn.metrics import f1_score

    y_true = [[1, 0], [1, 1], [0, 1]]
    y_pred = [[1, 0], [1, 0], [0, 1]]
    got = M.multilabel_metrics(y_true, y_pred, ["a", "b"])
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_metric_direction_and_confusion_png(tmp_path):
    assert not M.higher_is_better("loss") and not M.higher_is_better("val_loss")
    assert M.higher_is_better("macro_f1") and M.higher_is_better("val_rougeL")
    from lmtailor.report import confusion_png

    assert confusion_png([[3, 1], [0, 2]], ["ham", "spam"], "test")[:4] == b"\x89PNG"


@pytest.mark.parametrize(("text", "loops"), [
    # the two loops of the issue, and others: 3 copies of 2+ words, 6 of one word
    ("apparmor -r -o -r -o -r -o -r -o", True),
    ("apparmor -r -o -r -o -r -o", True),
    ("de los hijos de los hijos de los hijos de los", True),
    ("ls -la\nls -la\nls -la", True),
    ("no no no no no no", True),
    ("find . -name a b c d e f g h a b c d e f g h a b c d e f g h", True),  # 8 words x 3
    ("jq -l -r 10000000000000000000000000000000000000000", True),  # no spaces: one character x 40
    ('grep -r "^[0-9]{1,3}|^[0-9]{1,3}|^[0-9]{1,3}|^[0', True),  # 12 characters x 3
    # ordinary commands and prose, short repeats
    ("tar -xzvf a.tar.gz", False),
    ("ls -la", False),
    ("find . -name x -type f", False),
    ("a a", False),
    ("very very very good", False),  # 3 copies of one word cover 3 < 6 words
    ("* * * * * /usr/bin/backup.sh", False),  # a crontab line: 5 copies of one word
    ("ssh -v -v host", False),
    ("echo hi; echo hi", False),  # 2 copies
    ("git add . && git commit -m 'fix' && git push", False),
    ("To search a package using apt, you can use the following command: apt search package", False),
    ("a b c d e f g h i a b c d e f g h i a b c d e f g h i", False),  # a 9-word n-gram is not looked for
    ("dd if=/dev/zero of=disk.img bs=1000000 count=1", False),  # 6 zeros
    ("sha256sum: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", False),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", False),  # 31 characters, below the 32-character floor
    ("", False),
])
def test_looping_rule(text: str, loops: bool) -> None:
    assert M.looping(text) is loops


def test_looping_share() -> None:
    assert M.looping_share(["ls -la", "x y x y x y", "pwd", "pwd"]) == 0.25
    assert math.isnan(M.looping_share([]))
