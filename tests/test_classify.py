"""Sequence classification on a tiny decoder: loss falls, a separable set is learned, labels survive save/load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtailor.cli import main

WORDS = {
    "files": ["list files", "find files", "copy folder", "show disk usage", "count lines", "extract archive"],
    "animals": ["quick brown fox", "lazy dog", "brown dog jumps", "the fox", "fox over dog", "dog and fox"],
}


def _rows(n_per_label: int = 12) -> list[dict]:
    rows = []
    for label, phrases in WORDS.items():
        for i in range(n_per_label):
            rows.append({"text": f"{phrases[i % len(phrases)]} {phrases[(i * 5 + 1) % len(phrases)]} {i}",
                         "label": label})
    return rows


@pytest.fixture
def labeled(tmp_path: Path) -> Path:
    path = tmp_path / "labeled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path


FAST = ["objective=classify", "max_steps=30", "batch_size=8", "lr=3e-3", "data.val_size=8", "eval_every=10",
        "--no-progress"]


def _train(tiny_model: Path, data: Path, out: Path, *extra: str) -> dict:
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={out}", *FAST, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_full_finetune_learns_a_separable_set_and_labels_round_trip(tiny_model, labeled, tmp_path, capsys):
    run = tmp_path / "full"
    m = _train(tiny_model, labeled, run, "method=full", "metric_for_best=macro_f1")
    # one before/after table, printed and in report.html, with the task metrics and not only the loss
    out = capsys.readouterr().out
    assert out.count("metric ") == 1, out
    table = out[out.index("metric "):]
    for name in ("loss", "accuracy", "macro_f1", "weighted_f1"):
        assert f"\n{name} " in table, (name, table)
    assert f"{m['before']['accuracy']:.1%}" in table.split("\naccuracy ")[1].split("\n")[0]
    rows = (run / "report.html").read_text().split("<h2>Before / after")[1].split("</table>")[0]
    for name in ("loss", "accuracy", "macro_f1"):
        assert f"<td>{name}</td>" in rows
    assert "<td>100.0%</td>" in rows and "confusion_matrix" not in rows and "examples" not in rows
    assert m["after"]["accuracy"] == 1.0 and m["after"]["macro_f1"] == 1.0
    assert m["after"]["loss"] < m["before"]["loss"]
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert [h["step"] for h in hist if "val_macro_f1" in h] == [10, 20, 30]
    assert m["best"]["metric"] == "macro_f1" and m["best"]["value"] == 1.0
    for name in ("confusion_matrix.png", "confusion_matrix_before.png", "task_report.html", "metric_curves.png"):
        assert (run / name).read_bytes()[:4] in (b"\x89PNG", b"<!do"), name
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "animals", "1": "files"} and config["label2id"]["files"] == 1

    from lmtailor.objectives.classify import predict

    out = predict(run, ["quick brown fox 3", "list files copy folder 1"])
    assert [label for label, _ in out] == ["animals", "files"]
    assert set(out[0][1]) == {"animals", "files"} and abs(sum(out[0][1].values()) - 1) < 1e-5


def test_lora_trains_and_saves_the_head_with_its_labels(tiny_model, labeled, tmp_path):
    run = tmp_path / "lora"
    m = _train(tiny_model, labeled, run, "method=lora", "lr=1e-2", "lora.r=8", "lora.target_modules=all-linear")
    assert m["after"]["accuracy"] == 1.0
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    from safetensors.torch import load_file

    weights = load_file(run / "model" / "adapter_model.safetensors")
    assert any("score" in k for k in weights)
    from lmtailor.objectives.classify import predict

    assert predict(run, ["lazy dog the fox 2"])[0][0] == "animals"
    # `lmtailor eval` on a classification run gives task metrics and a confusion matrix
    out = tmp_path / "eval" / "m.json"
    assert main(["eval", str(run), "--data", str(labeled), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["macro_f1"] == 1.0
    assert (out.parent / "confusion_matrix_eval.png").is_file()


def test_freeze_trains_the_head_and_options_change_the_loss(tiny_model, labeled, tmp_path):
    from lmtailor.config import load_config
    from lmtailor.data.validate import load_datasets
    from lmtailor.models import freeze_all_but_last
    from lmtailor.objectives import get_objective

    obj = get_objective("classify")
    base = [f"base_model={tiny_model}", f"data.path={labeled}", "objective=classify"]

    def context(*extra: str):  # what train does: context, tokenizer, fit on the training examples
        c = load_config(None, [*base, *extra])
        ctx = obj.context(c)
        ctx.tokenizer = obj.tokenizer(ctx)
        obj.fit(ctx, load_datasets(c.data)[0])
        return ctx

    ctx = context()
    tok = ctx.tokenizer
    model = obj.model(ctx, torch.float32)
    freeze_all_but_last(model, 0)
    assert model.score.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad

    train_ex, _, _ = load_datasets(ctx.cfg.data)
    items, stats = obj.prepare(ctx, train_ex)
    assert set(stats["labels"]) == {"animals", "files"} and sum(stats["labels"].values()) == len(train_ex)
    assert all(isinstance(i.label, int) for i in items) and ctx.labels == ["animals", "files"]
    batch = obj.collate(ctx, items[:8])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and obj.count(batch) == 8
    assert tok.pad_token_id is not None

    def loss_with(*extra: str, aug: bool = False) -> float:
        c = context(*extra)
        m = obj.model(c, torch.float32)
        torch.manual_seed(0)
        with torch.set_grad_enabled(aug):
            return float(obj.build(c, m)(**batch)[0])

    plain = loss_with()
    assert loss_with("classify.label_smoothing=0.3") != pytest.approx(plain)
    assert loss_with("classify.class_weights={animals: 3.0, files: 1.0}") != pytest.approx(plain)
    assert loss_with("classify.class_weights=balanced") != pytest.approx(plain)  # the split left 12 / 10 examples
    assert loss_with("classify.augment.token_dropout=0.5", aug=True) != pytest.approx(loss_with(aug=True))
    # dropout override reaches the model config
    m = obj.model(context("classify.dropout=0.3"), torch.float32)
    assert m.config.attention_dropout == 0.3


def test_multi_label(tiny_model, tmp_path):
    path = tmp_path / "multi.jsonl"
    rows = [{"text": f"{a} {b} {i}", "label": lab} for i in range(6) for a, b, lab in
            [("quick fox", "lazy dog", "animals"), ("list files", "copy folder", "files"),
             ("the fox", "count lines", "animals;files")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "multi"
    m = _train(tiny_model, path, run, "method=full", "classify.multi_label=true", "classify.label_separator=;",
               "max_steps=40", "data.val_size=6")
    assert m["after"]["macro_f1"] > 0.9
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    from lmtailor.objectives.classify import predict

    labels, probs = predict(run, ["the fox count lines 9"])[0]
    assert isinstance(labels, list) and set(probs) == {"animals", "files"}


def test_augment_keeps_ends_and_is_seeded():
    from lmtailor.objectives.augment import augment_batch, augment_ids

    ids = list(range(1, 21))
    g = torch.Generator().manual_seed(0)
    dropped = augment_ids(ids, 0.5, 0.0, g)
    assert dropped[0] == 1 and dropped[-1] == 20 and len(dropped) < 20 and set(dropped) <= set(ids)
    swapped = augment_ids(ids, 0.0, 0.5, torch.Generator().manual_seed(0))
    assert sorted(swapped) == ids and swapped != ids and swapped[0] == 1 and swapped[-1] == 20
    assert all(abs(swapped.index(t) - ids.index(t)) <= 1 for t in ids)
    assert augment_ids(ids, 0.0, 0.0) == ids
    x = torch.tensor([[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]])
    mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    new, new_mask = augment_batch(x, mask, 0, 0.9, 0.0)
    assert new[0, 0] == 5 and new[0, new_mask[0].sum() - 1] == 8 and new.shape[1] <= 6


def test_balanced_sampling_draws_labels_about_equally():
    import numpy as np

    from lmtailor.config import load_config
    from lmtailor.loop import batch_at, plan_steps
    from lmtailor.objectives import get_objective
    from lmtailor.objectives.classify import ClassItem

    items = [ClassItem([5, 6], 1 if i < 100 else 0) for i in range(1000)]  # 900 of label 0, 100 of label 1
    labels = np.array([i.label for i in items])
    cfg = load_config(None, ["objective=classify", "classify.sampling=balanced", "batch_size=10"])
    per_epoch, _ = plan_steps(cfg, len(items), 1)
    objective = get_objective(cfg)
    ctx = objective.context(cfg)

    def balanced_weights(items):
        return objective.sample_weights(ctx, items)

    weights = balanced_weights(items)

    def epoch(e: int, w: np.ndarray | None) -> np.ndarray:
        return np.concatenate([batch_at(e * per_epoch + k, per_epoch, len(items), cfg, 1, w)
                               for k in range(per_epoch)])

    for e in (0, 1):
        drawn = epoch(e, weights)
        assert len(drawn) == len(items) and 0.45 < labels[drawn].mean() < 0.55  # 90/10 -> about 50/50
    # a pure function of seed and epoch (what resume relies on); each epoch draws anew
    assert np.array_equal(epoch(1, weights), epoch(1, weights)) and not np.array_equal(epoch(0, weights),
                                                                                       epoch(1, weights))
    # shuffle: every example exactly once, so the skew stays
    assert sorted(epoch(0, None).tolist()) == list(range(len(items)))
    # multi-label: each distinct label set counts as one class
    multi = [ClassItem([1], [1.0, 0.0])] * 6 + [ClassItem([1], [1.0, 1.0])] * 2
    assert np.allclose(balanced_weights(multi), [1 / 12] * 6 + [1 / 4] * 2)


def test_balanced_sampling_is_for_classify_only():
    from lmtailor.config import load_config
    from lmtailor.errors import ConfigError

    with pytest.raises(ConfigError, match="classify.sampling.*belongs to objective classify.*objective is seq2seq"):
        load_config(None, ["objective=seq2seq", "classify.sampling=balanced"])


def test_balanced_sampling_resumes_exactly(tiny_model, tmp_path):
    """A run with balanced sampling, stopped after a checkpoint and resumed, ends with the uninterrupted weights."""
    from safetensors.torch import load_file

    rows = [r for r in _rows(27) if r["label"] == "files"] + [r for r in _rows(3) if r["label"] == "animals"]
    data = tmp_path / "skewed.jsonl"  # 90% files, 10% animals
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["method=full", "max_steps=12", "eval_every=0", "save_every=5", "keep_checkpoints=5",
             "eval.before_after=false", "data.val_size=4"]
    full, part, plain = tmp_path / "full", tmp_path / "part", tmp_path / "plain"
    _train(tiny_model, data, full, *extra, "classify.sampling=balanced")
    _train(tiny_model, data, part, *extra, "classify.sampling=balanced")
    _train(tiny_model, data, plain, *extra)
    # pretend the second run died after its step-5 checkpoint
    shutil.rmtree(part / "model")
    shutil.rmtree(part / "checkpoints" / "step-000010")
    hist = (part / "history.jsonl").read_text().splitlines()
    (part / "history.jsonl").write_text("".join(h + "\n" for h in hist[:5]))
    _train(tiny_model, data, part, *extra, "classify.sampling=balanced", "resume=true")
    a, b, c = (load_file(r / "model" / "model.safetensors") for r in (full, part, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the setting reaches the loop: another order than shuffle


def test_fit_probe_separates_planted_features_and_folds_the_scaling():
    from lmtailor.objectives.classify import fit_probe

    rng = np.random.default_rng(0)
    n, h = 60, 16
    y = np.arange(n) % 3  # labels 0..2 of a 4-label head: label 3 never occurs
    x = rng.normal(size=(n, h)) * 5 + 100  # far from standardized: the fold must undo it
    x[np.arange(n), y] += 40  # label k raises feature k
    w, b, facts = fit_probe(x, y, 4)
    pred = (x @ w.T + b).argmax(1)
    assert (pred == y).all() and facts["C"] in (0.01, 0.1, 1.0) and facts["folds"] == 3
    assert ((x @ w.T + b)[:, 3] < (x @ w.T + b)[:, :3].min(1)).all()  # the absent label never wins
    # two labels: sklearn's single row becomes two, and the larger logit is the predicted label
    w2, b2, _ = fit_probe(x[y < 2], y[y < 2], 2)
    assert ((x[y < 2] @ w2.T + b2).argmax(1) == y[y < 2]).all()


def test_probe_head_with_mean_pooling_starts_trained_and_reloads(tiny_model, tmp_path):
    # long texts whose label word comes first, then filler cut by max_length: the frozen model's mean-pooled
    # features separate them, so the probe-initialised head is right before any step
    filler = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    rows = [{"text": f"{'files' if i % 2 else 'animals'} {filler} {i}", "label": "files" if i % 2 else "animals"}
            for i in range(40)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "probe"
    m = _train(tiny_model, data, run, "method=lora", "max_length=24", "max_steps=4", "lr=1e-4",
               "classify.pooling=mean", "classify.head_init=probe")
    assert m["before"]["accuracy"] == 1.0, m["before"]  # the probe alone (adapter off, head fitted)
    assert m["after"]["accuracy"] == 1.0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["lmtailor_pooling"] == "mean" and len(config["lmtailor_head_bias"]) == 2

    from lmtailor.objectives.classify import predict

    texts = [r["text"] for r in rows[:6]]
    out = predict(run, texts)
    assert [label for label, _ in out] == [r["label"] for r in rows[:6]]
    # the reloaded run computes the logits training computed: drop the bias and the answers change
    config["lmtailor_head_bias"] = [0.0, 0.0]
    (run / "model" / "config.json").write_text(json.dumps(config))
    probs = [p for _, p in predict(run, texts)]
    assert any(abs(p["files"] - q["files"]) > 1e-4 for p, (_, q) in zip(probs, out, strict=True))


def test_probe_head_is_refused_for_multi_label(tiny_model, labeled, tmp_path, capsys):
    code = main(["train", f"base_model={tiny_model}", f"data.path={labeled}", f"output_dir={tmp_path / 'r'}", *FAST,
                 "classify.multi_label=true", "classify.head_init=probe"])
    assert code != 0 and "classify.head_init" in capsys.readouterr().err


def test_a_budget_pays_for_the_heads_fitting(tiny_model, labeled, tmp_path, monkeypatch, capsys):
    """budget= covers the probe's fitting: a fit that takes longer leaves fewer seconds for the steps, so the run
    ends on time instead of late (auto charges the probe to the final run's budget this way)."""
    import dataclasses
    import re
    import time as time_mod

    from lmtailor.objectives.registry import OBJECTIVES

    real = OBJECTIVES["classify"]

    def slow_init(ctx, model, items):  # the real probe fit, then 1.5 s more, as on a busy machine
        real.init(ctx, model, items)
        time_mod.sleep(1.5)

    monkeypatch.setitem(OBJECTIVES, "classify", dataclasses.replace(real, init=slow_init))
    run = tmp_path / "budgeted"
    assert main(["train", f"base_model={tiny_model}", f"data.path={labeled}", f"output_dir={run}", *FAST,
                 "classify.head_init=probe", "budget=4s"]) == 0
    out = capsys.readouterr().out
    took = float(re.search(r"the head's fitting took (\d+) s", out).group(1))
    fitted = float(re.search(r"budget ([\d.]+) s: a step takes", out).group(1))
    assert took >= 1 and fitted <= 4 - 1.5 + 1e-6, out


# `lmtailor train` in a process of its own (Accelerate fixes the precision per process), recording whether CPU
# autocast is on at each call of the classification objective's evaluate hook
RECORD_EVALUATIONS = textwrap.dedent("""
    import dataclasses, json, sys, torch
    from lmtailor.cli import main
    from lmtailor.objectives import registry

    seen, real = [], registry.OBJECTIVES["classify"]

    def evaluate(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real.evaluate(*args, **kwargs)

    registry.OBJECTIVES["classify"] = dataclasses.replace(real, evaluate=evaluate)
    assert main(sys.argv[1:]) == 0
    print("AUTOCAST " + json.dumps(seen))
""")


def test_probe_and_validation_run_in_the_steps_precision(tiny_model, tmp_path):
    """The probe's forward passes over the training texts and the validation passes that pick the best checkpoint
    run under the run's mixed precision (bf16 autocast where the steps use it); in float32 they ran several times
    slower on bf16 units. The report's before and after evaluations stay in float32, as `eval` and `predict` run,
    except in an adapter run under bf16, whose frozen base is kept in bf16: there they run in bf16 too."""
    filler = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    rows = [{"text": f"{'files' if i % 2 else 'animals'} {filler} {i}", "label": "files" if i % 2 else "animals"}
            for i in range(40)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"base_model={tiny_model}", f"data.path={data}", *FAST, "method=lora", "max_length=24", "max_steps=2",
            "eval_every=1", "metric_for_best=macro_f1", "classify.pooling=mean", "classify.head_init=probe"]
    seen = {}
    for mode, dtype in (("bf16", "bfloat16"), ("no", "float32")):
        done = subprocess.run([sys.executable, "-c", RECORD_EVALUATIONS, "train", *args,
                               f"output_dir={tmp_path / mode}", f"mixed_precision={mode}"], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"(mean-pooled, {dtype} features, C=" in done.stdout
        seen[mode] = json.loads(done.stdout.split("AUTOCAST ")[-1].splitlines()[0])
    # before, the validations at steps 1 and 2, after (LoRA under bf16: a bf16 base, so all four in bf16)
    assert seen == {"bf16": [True] * 4, "no": [False] * 4}, seen
    bf16, m = (json.loads((tmp_path / mode / "metrics.json").read_text()) for mode in ("bf16", "no"))
    for run in (bf16, m):  # the probe separates them in either precision
        assert run["before"]["accuracy"] == 1.0, run["before"]
    assert (bf16["head_probe"]["features_dtype"], m["head_probe"]["features_dtype"]) == ("bfloat16", "float32")
    assert m["head_probe"]["examples"] == 40 - 8 and m["head_probe"]["seconds"] >= 0


def test_a_budget_charges_a_task_metric_validation_its_second_pass(tiny_model, labeled, tmp_path, capsys,
                                                                  monkeypatch):
    """A validation with metric_for_best set to a task metric runs the loss pass and the metric's own pass over the
    validation items: budget= charges both (here from a fixed step and pass time, so the arithmetic is exact)."""
    import lmtailor.loop

    monkeypatch.setattr(lmtailor.loop, "measure_step", lambda *args, **kwargs: (0.01, 0.5))
    monkeypatch.setattr(lmtailor.loop, "_refit", lambda loop, here, step, total, bar: total)  # the first fit only
    steps = {}
    for metric, charged in (("loss", "0.5"), ("macro_f1", "1.0")):
        m = _train(tiny_model, labeled, tmp_path / metric, "budget=1s", f"metric_for_best={metric}")
        out = capsys.readouterr().out
        assert f"validation {charged} s every 10 steps" in out, out
        steps[metric] = m["steps"]
    # 1 s at 0.01 s a step plus one validation per 10 steps: 0.06 s or 0.11 s a step
    assert steps == {"loss": 16, "macro_f1": 9}, steps
