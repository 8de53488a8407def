"""The real CLI end to end on a tiny model: files written, loss falls, resume is exact, errors are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtailor.cli import main

FAST = ["max_steps=12", "batch_size=4", "micro_batch_size=2", "lr=5e-3", "data.val_size=3",
        "eval.generate_examples=2", "generation.max_new_tokens=4", "--no-progress"]


def _train(tiny_model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={out}", *FAST, *extra])


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture
def data12(tmp_path):
    from conftest import PAIRS

    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"{q} {i}", "output": a} for i in range(3) for q, a in PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_run_writes_an_ordinary_hf_folder_and_learns(tiny_model, data12, tmp_path):
    run = tmp_path / "run"
    assert _train(tiny_model, data12, run, "eval_every=4", "lr=5e-2", "lora.r=8", "lora.target_modules=all-linear") == 0
    for name in ("model/adapter_model.safetensors", "model/adapter_config.json", "model/tokenizer.json",
                 "config.yaml", "metrics.json", "loss.png", "report.html", "history.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    hist = _history(run)
    assert len(hist) == 12 and hist[-1]["loss"] < hist[0]["loss"] - 0.2
    assert [h["step"] for h in hist if "val_loss" in h] == [4, 8, 12]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["trainable_params"] < metrics["total_params"] / 2
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the adapter folder opens with plain peft + transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "model")
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) > 0


def test_resume_reproduces_an_uninterrupted_run(tiny_model, data12, tmp_path):
    """Model, optimizer, scheduler, RNG (LoRA dropout) and data position all come back."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["save_every=5", "lora.dropout=0.2", "keep_checkpoints=5", "eval.before_after=false"]
    assert _train(tiny_model, data12, full, *extra) == 0
    assert _train(tiny_model, data12, part, *extra) == 0
    # pretend the second run died after its step-5 checkpoint
    shutil.rmtree(part / "model")
    shutil.rmtree(part / "checkpoints" / "step-000010")
    (part / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in _history(part)[:5]))
    assert _train(tiny_model, data12, part, *extra, "resume=true") == 0
    a = load_file(full / "model" / "adapter_model.safetensors")
    b = load_file(part / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in _history(full)] == [h["loss"] for h in _history(part)]


def test_resume_continues_a_budgets_refitted_schedule(tiny_model, data12, tmp_path, monkeypatch):
    """A budget that re-fitted its step count (12 -> 9 at step 3) before the step-5 checkpoint: the resumed run
    ends at the same step with the same schedule, weights and losses as the uninterrupted one."""
    import lmtailor.loop

    monkeypatch.setattr(lmtailor.loop, "measure_step", lambda *args, **kwargs: (0.001, 0.001))
    monkeypatch.setattr(lmtailor.loop, "refit_steps", lambda *args: 9)  # a re-fit that does not depend on the clock
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["save_every=5", "keep_checkpoints=5", "eval.before_after=false", "budget=1h"]
    assert _train(tiny_model, data12, full, *extra) == 0
    assert _train(tiny_model, data12, part, *extra) == 0
    shutil.rmtree(part / "model")
    (part / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in _history(part)[:5]))
    assert _train(tiny_model, data12, part, *extra, "resume=true") == 0
    a = load_file(full / "model" / "adapter_model.safetensors")
    b = load_file(part / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ran, resumed = _history(full), _history(part)
    assert [h["step"] for h in ran] == list(range(1, 10)) and ran[-1]["lr"] == 0.0 < ran[-2]["lr"]
    assert [(h["loss"], h["lr"]) for h in ran] == [(h["loss"], h["lr"]) for h in resumed]
    assert json.loads((full / "metrics.json").read_text())["budget_refits"] == [[3, 12, 9]]


def test_freeze_trains_only_the_last_layers(tiny_model, data12, tmp_path):
    run = tmp_path / "freeze"
    assert _train(tiny_model, data12, run, "method=freeze", "unfreeze_last_n=1", "eval.before_after=false") == 0
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(run / "model" / "model.safetensors")
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(before[q0], after[q0])
    assert not torch.equal(before["model.layers.1.self_attn.q_proj.weight"],
                           after["model.layers.1.self_attn.q_proj.weight"])


def test_early_stopping_stops_when_validation_stalls(tiny_model, data12, tmp_path):
    run = tmp_path / "es"
    assert _train(tiny_model, data12, run, "lr=1e-12", "eval_every=1", "early_stopping_patience=2",
                  "eval.before_after=false", "method=full") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["steps"] == 3


def test_finished_run_is_not_overwritten(tiny_model, data12, tmp_path, capsys):
    run = tmp_path / "keep"
    assert _train(tiny_model, data12, run, "max_steps=2", "eval.before_after=false") == 0
    stamp = (run / "metrics.json").read_text()
    assert _train(tiny_model, data12, run, "max_steps=2") == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run / "metrics.json").read_text() == stamp


def test_bad_data_reports_file_line_field_and_count(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(10)]
    lines[2] = json.dumps({"instruction": "q", "output": 5})
    lines[6] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    assert _train(tiny_model, bad, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 bad record(s)")
    assert f"{bad}:3: output" in err and f"{bad}:7: not valid JSON" in err
    assert "Traceback" not in err


def test_validate_generate_and_eval_verbs(tiny_model, data12, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_model: {tiny_model}\ndata:\n  path: {data12}\n  val_size: 3\nbatch_size: 4\n")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "recipe OK" in out and "27 train / 3 validation" in out
    run = tmp_path / "run"
    assert _train(tiny_model, data12, run, "max_steps=3", "eval.before_after=false") == 0
    capsys.readouterr()
    assert main(["generate", str(run), "list files", "--compare", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "> list files" in out and "[base]" in out and "[tuned]" in out
    metrics_file = tmp_path / "m.json"
    assert main(["eval", str(run), "--data", str(data12), "--generate", "2", "--out", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["loss"] > 0 and 0 <= metrics["exact_match"] <= 1 and metrics["examples"] == 30


def test_console_script_prints_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmtailor", "train", "lora.rank=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown config key 'lora.rank'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_budget_fits_the_steps_to_the_measured_step_time(tiny_model, pairs_file, tmp_path, capsys, monkeypatch):
    """budget= measures a step before training, cuts the step count to fit, writes it to the resolved config, and
    the measurement leaves the run unchanged: the same max_steps without a budget gives identical weights.
    (The re-fit on the way is held off here, so the step count stays the first fit's.)"""
    import yaml

    import lmtailor.loop

    monkeypatch.setattr(lmtailor.loop, "_refit", lambda loop, here, step, total, bar: total)

    common = [f"base_model={tiny_model}", f"data.path={pairs_file}", "data.val_size=2", "batch_size=2",
              "epochs=5000", "method=full", "eval.before_after=false", "--no-progress"]
    # 20,000 planned steps: more than 1.5 s holds even on a fast machine; a budget far above them never raises them
    roomy = tmp_path / "roomy"
    assert main(["train", *common, f"output_dir={roomy}", "budget=2h", "max_steps=3"]) == 0
    assert json.loads((roomy / "metrics.json").read_text())["steps"] == 3
    fitted = tmp_path / "fitted"
    assert main(["train", *common, f"output_dir={fitted}", "budget=1.5s"]) == 0
    out = capsys.readouterr().out
    steps = json.loads((fitted / "metrics.json").read_text())["steps"]
    assert "budget 1.5 s: a step takes" in out and f"-> {steps} steps" in out and 1 <= steps < 20000
    assert yaml.safe_load((fitted / "config.yaml").read_text())["max_steps"] == steps
    plain = tmp_path / "plain"
    assert main(["train", *common, f"output_dir={plain}", f"max_steps={steps}"]) == 0
    a, b = (load_file(r / "model" / "model.safetensors") for r in (fitted, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refit_steps_fits_the_remaining_steps_and_validations():
    """The most steps whose remaining steps and validations (every eval_every steps and one at the end) fit."""
    from lmtailor.loop import refit_steps

    # from step 10: n=70 costs 60 steps + validations at 20, 40, 60 and 70 = 100 s; n=71 costs 101 s
    assert refit_steps(100.0, 10, 1000, 1.0, 10.0, 20) == 70
    assert refit_steps(100.0, 10, 1000, 1.0, 0.0, 0) == 110  # no validations
    assert refit_steps(1e9, 10, 500, 1.0, 10.0, 20) == 500  # never beyond the planned steps
    assert refit_steps(-5.0, 10, 500, 1.0, 10.0, 20) == 11  # out of time: one more step (and its validation)


def test_stretch_schedule_ends_the_schedule_at_the_new_last_step():
    """A re-fitted step count keeps the schedule's shape: the rest of it is compressed (or stretched) to end at
    the new last step, and the steps before stay as they were."""
    from transformers import get_scheduler

    from lmtailor.loop import stretch_schedule

    def lrs(total, refit=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler("linear", opt, num_warmup_steps=10, num_training_steps=total)
        seen = []
        for step in range(1, (refit or (0, total, total))[2] + 1):
            opt.step()
            sched.step()
            seen.append(sched.get_last_lr()[0])
            if refit and step == refit[0]:
                stretch_schedule(sched, *refit)
        return seen

    plain, cut, longer = lrs(100), lrs(100, (40, 100, 70)), lrs(100, (40, 100, 130))
    assert cut[:40] == plain[:40] and longer[:40] == plain[:40]
    assert cut[-1] == 0.0 and longer[-1] == 0.0 and min(cut[:-1]) > 0 and min(longer[:-1]) > 0
    assert cut[54] == pytest.approx(plain[69])  # step 55 of 70 is step 70 of 100: 15 of 30 steps = 30 of 60
    assert longer[84] == pytest.approx(plain[69])  # step 85 of 130 likewise


def test_a_budget_refits_the_steps_when_they_run_slower_than_measured(tiny_model, pairs_file, tmp_path, capsys,
                                                                      monkeypatch):
    """The budget's timed steps said 1 ms a step (a machine that slowed down after them): the run re-fits its
    step count on the way to the times it sees, ends with fewer steps, its schedule still decays to 0 at the new
    last step, and the re-fit is in the log and metrics.json."""
    import re

    import lmtailor.loop

    monkeypatch.setattr(lmtailor.loop, "measure_step", lambda *args, **kwargs: (0.001, 0.001))
    run = tmp_path / "refit"
    assert main(["train", f"base_model={tiny_model}", f"data.path={pairs_file}", "data.val_size=2", "batch_size=2",
                 "epochs=5000", "method=full", f"output_dir={run}", "budget=2s", "eval.before_after=false",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    fitted = int(re.search(r"-> (\d+) steps \(", out).group(1))
    refits = re.findall(r"budget: at step (\d+) a step takes [\d.]+ s and a validation [\d.]+ s: (\d+) -> (\d+) steps",
                        out)
    assert refits, out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == int(refits[-1][2]) < fitted
    assert metrics["budget_refits"] == [[int(a), int(b), int(c)] for a, b, c in refits]
    history = _history(run)
    assert history[-1]["step"] == metrics["steps"] and history[-1]["lr"] == 0.0 and history[-2]["lr"] > 0
    assert "val_loss" in history[-1]  # the last step still validates


def test_a_budget_that_covers_the_run_pays_for_loading_and_evaluations(tiny_model, pairs_file, tmp_path, capsys):
    """budget_covers=run (what auto gives its final run): the steps get what is left of the budget once the time
    before training is spent and as much as the before evaluation took is kept for the after one."""
    import re

    run = tmp_path / "whole"
    assert main(["train", f"base_model={tiny_model}", f"data.path={pairs_file}", "data.val_size=2", "batch_size=2",
                 "epochs=50", "method=full", f"output_dir={run}", "budget=25s", "budget_covers=run",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    spent, kept = (float(v) for v in re.search(
        r"budget 25 s for the run: (\d+) s spent before training, (\d+) s kept for the after evaluation", out).groups())
    fitted = float(re.search(r"budget ([\d.]+) s: a step takes", out).group(1))
    assert 0 < fitted <= max(0.05 * 25, 25 - spent - kept - 15 + 1.0), out  # 15 s for saving; whole seconds printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"], "the after evaluation still runs"
    # where the time went: every phase, in order, adding up to the total; the closing line compares it to the budget
    seconds = metrics["seconds"]
    phases = [k for k in seconds if k != "total"]
    assert phases == ["load", "baselines", "before", "schedule", "steps", "gather", "save", "after"], seconds
    assert abs(sum(seconds[k] for k in phases) - seconds["total"]) < 0.1 * len(phases)
    assert seconds["steps"] > 0 and seconds["total"] >= spent
    line = re.search(r"time: load \d+ s, .*, report \d+ s; (\d+) s in all \((.*)\)", out)
    assert line and int(line.group(1)) >= round(seconds["total"]) - 1, out
    over = re.fullmatch(r"(\d+) s over the budget of 25 s", line.group(2))
    assert line.group(2) == "within the budget of 25 s" if int(line.group(1)) < 25 else \
        (over and abs(int(over.group(1)) - (int(line.group(1)) - 25)) <= 1), out
    elapsed = [r["elapsed_s"] for r in _history(run)]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= seconds["steps"] + 0.05  # seconds: rounded to 0.1 s


def test_a_test_split_is_reported_on_and_never_selected_on(tiny_model, data12, tmp_path):
    """data.test_path: validation (best checkpoint, early stopping) stays on the validation split; the baselines
    and before/after are judged on the test file, and a training example equal to a test one is dropped."""
    rows = [json.loads(line) for line in data12.read_text().splitlines()]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # two of the training examples, leaked
    run = tmp_path / "r"
    assert _train(tiny_model, data12, run, f"data.test_path={test}", "eval_every=4", "max_steps=4",
                  "data.retrieved_examples=0") == 0  # the samples' prompts as written
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert metrics["data"]["test_overlap"] == 2 and metrics["data"]["test"] == 2
    assert metrics["data"]["train"] == len(rows) - 3 - 2  # val_size=3 held out, the 2 leaked test rows dropped
    assert [x["prompt"] for x in metrics["after"]["samples"]] == [r["instruction"] for r in rows[:2]]
    assert metrics["before"]["samples"][0]["prompt"] == rows[0]["instruction"]
    history = _history(run)
    assert any("val_loss" in r for r in history)  # validation ran on its own split
    # without a test file the report is judged on the validation split
    plain = tmp_path / "plain"
    assert _train(tiny_model, data12, plain, "max_steps=2") == 0
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert plain_metrics["evaluated_on"] == "validation" and len(plain_metrics["after"]["samples"]) == 2


def test_snapshot_of_the_best_weights_is_a_copy_that_later_steps_leave_alone(tiny_model):
    """On CPU the live parameters' `.cpu()` is the parameter itself: a snapshot must copy, or the 'best' weights
    restored at the end are the last step's."""
    from transformers import AutoModelForCausalLM

    from lmtailor.checkpoint import snapshot_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.lm_head.weight.requires_grad_(False)
    snap = snapshot_trainable(model)
    again = snapshot_trainable(model, snap)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(snap) == names and set(again) == names
    before = {n: t.clone() for n, t in snap.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(snap[n], before[n]) for n in names)
    assert all(snap[n].data_ptr() != p.data_ptr() for n, p in model.named_parameters() if n in names)


def test_a_run_that_keeps_its_best_checkpoint_ends_on_the_best_steps_weights(tiny_model, data12, tmp_path):
    """Early stopping's patience not reached, validation every step, a learning rate high enough that validation
    gets worse after its best step: the model written is the best step's checkpoint, not the last step's."""
    run = tmp_path / "best"
    assert _train(tiny_model, data12, run, "method=full", "lr=3.0", "max_steps=8", "eval_every=1",
                  "early_stopping_patience=100", "save_every=1", "keep_checkpoints=8", "warmup_ratio=0",
                  "eval.before_after=false") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    best = metrics["best"]["step"]
    assert 1 <= best < metrics["steps"] == 8  # the last step is not the best: restoring it is visible
    final = load_file(run / "model" / "model.safetensors")
    at_best = load_file(run / "checkpoints" / f"step-{best:06d}" / "trainable.safetensors")
    last = load_file(run / "checkpoints" / "step-000007" / "trainable.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(final[name], at_best[name]) and not torch.equal(final[name], last[name])
