"""grpo with the discriminator reward (the GAN set-up): the judge's accuracy rises, then falls as the generator
catches up; exact resume covers the judge; every step logs the rewards, KL, judge accuracy, length and looping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtailor.cli import main
from lmtailor.config import build_config
from lmtailor.errors import ConfigError

WORDS = ["list files", "extract archive", "find by name", "count lines", "disk usage", "search text", "copy folder",
         "show processes"]
GRPO = ["objective=grpo", "batch_size=4", "data.val_size=0", "grpo.group=4", "lora.target_modules=all-linear",
        "early_stopping_patience=0", "eval_every=0", "eval.before_after=false", "grpo.reward.stop=0", "--no-progress"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy where the generator can catch up: a tiny model first taught (SFT) to answer every question "a" one
    time in five and "b" otherwise; the real answers are all "a". The judge soon tells the many "b" samples from
    the references; rewarded by it, the policy shifts to answers it cannot tell apart, and its accuracy falls."""
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("toy")
    tiny = build_tiny(root / "tiny")
    sft = _jsonl(root / "sft.jsonl", [{"instruction": f"{w} {i}", "output": "a" if i % 5 == 0 else "b"}
                                      for i in range(10) for w in WORDS])
    assert main(["train", f"base_model={tiny}", f"data.path={sft}", f"output_dir={root / 'sft'}", "method=full",
                 "lr=1e-2", "max_steps=60", "batch_size=8", "data.val_size=0", "data.retrieved_examples=0",
                 "eval.before_after=false",
                 "early_stopping_patience=0", "eval_every=0", "--no-progress"]) == 0
    real = _jsonl(root / "real.jsonl", [{"instruction": f"{w} {i}", "output": "a"} for i in range(4) for w in WORDS])
    return root / "sft" / "model", real


def test_discriminator_settings_are_checked():
    cfg = build_config({"objective": "grpo", "grpo": {"reward": {"discriminator": {"steps_per_gen_step": 2}}}})
    assert cfg.settings.reward.discriminator.steps_per_gen_step == 2
    with pytest.raises(ConfigError, match="steps_per_gen_stepp"):
        build_config({"objective": "grpo", "grpo": {"reward": {"discriminator": {"steps_per_gen_stepp": 2}}}})


def test_discriminator_accuracy_rises_then_falls(toy, tmp_path):
    model, real = toy
    run = tmp_path / "gan"
    assert main(["train", f"base_model={model}", f"data.path={real}", f"output_dir={run}", *GRPO, "max_steps=30",
                 "lr=2e-2", "grpo.beta=0.0", "grpo.max_new_tokens=2", "grpo.reward.discriminator.lr=0.01",
                 "grpo.reward.discriminator.steps_per_gen_step=2"]) == 0
    hist = _history(run)
    for key in ("reward_mean", "reward_std", "kl", "answer_length", "looping", "disc_accuracy", "disc_real_prob",
                "disc_loss"):
        assert all(key in r for r in hist), key
    acc = [r["disc_accuracy"] for r in hist]
    assert acc[0] == 0.5  # the judge starts undecided (a zero head)
    windows = [sum(acc[i:i + 5]) / 5 for i in range(0, len(acc) - 4)]
    peak = max(range(len(windows)), key=windows.__getitem__)
    assert windows[peak] >= 0.75, acc  # it learns to tell the samples from the references ...
    assert min(windows[peak:]) <= windows[peak] - 0.25, acc  # ... until the generator catches up
    assert (run / "model" / "companion.safetensors").is_file()
    assert (run / "training_curves.png").is_file() and "Per-step curves" in (run / "report.html").read_text()
    assert (run / "tb").is_dir() or (run / "trackers.json").is_file()


def test_grpo_discriminator_resume_equals_an_uninterrupted_run(toy, tmp_path):
    model, real = toy
    full, part = tmp_path / "full", tmp_path / "part"
    extra = [*GRPO, "max_steps=6", "save_every=3", "keep_checkpoints=5", "lr=2e-2", "grpo.max_new_tokens=3",
             "grpo.reward.discriminator.lr=0.01", "grpo.reward.discriminator.steps_per_gen_step=2"]
    for out in (full, part):
        assert main(["train", f"base_model={model}", f"data.path={real}", f"output_dir={out}", *extra]) == 0
    shutil.rmtree(part / "model")
    hist = (part / "history.jsonl").read_text().splitlines()[:3]
    (part / "history.jsonl").write_text("".join(h + "\n" for h in hist))
    assert (part / "checkpoints" / "step-000003" / "companion.safetensors").is_file()
    assert main(["train", f"base_model={model}", f"data.path={real}", f"output_dir={part}", *extra,
                 "resume=true"]) == 0
    for name in ("adapter_model.safetensors", "companion.safetensors"):
        a, b = load_file(full / "model" / name), load_file(part / "model" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["disc_accuracy"] for r in _history(full)] == [r["disc_accuracy"] for r in _history(part)]


def test_discriminator_needs_an_adapter(toy, tmp_path, capsys):
    model, real = toy
    assert main(["train", f"base_model={model}", f"data.path={real}", f"output_dir={tmp_path / 'x'}", *GRPO,
                 "max_steps=1", "method=full", "grpo.beta=0", "grpo.reward.discriminator.lr=0.01"]) != 0
    assert "use method lora" in capsys.readouterr().err
