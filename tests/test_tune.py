"""Optuna search on a tiny classifier: study in SQLite, best recipe YAML, a pruned trial recorded as pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmtailor.errors import ConfigError


@pytest.fixture
def recipe(tiny_model, tmp_path) -> Path:
    from test_classify import _rows

    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({
        "objective": "classify", "base_model": str(tiny_model), "method": "full", "output_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "val_size": 8}, "max_steps": 12, "batch_size": 8, "eval_every": 4,
        "metric_for_best": "loss", "tune": {"lr": [1.0e-4, 1.0e-2, "log"], "weight_decay": [0.0, 0.1]},
    }))
    return path


def test_three_trials_write_study_best_yaml_and_a_pruned_trial(recipe, tmp_path):
    import optuna

    from lmtailor.cli import main
    from lmtailor.config import load_config
    from lmtailor.tune import tune

    run = tmp_path / "run"
    # two trials that learn, then one that cannot (lr 1e-9): it trails the median at its first report
    enqueue = [{"lr": 5e-3, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 0.1}, {"lr": 1e-9, "weight_decay": 0.0}]
    result = tune(str(recipe), trials=3, enqueue=enqueue, startup_trials=2)
    assert result["trials"] == {"complete": 2, "pruned": 1, "fail": 0}
    study = optuna.load_study(study_name=result["study_name"], storage=f"sqlite:///{run / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    assert list(study.trials[2].intermediate_values) == [4]  # stopped at the first evaluation
    assert result["best_params"]["lr"] in (5e-3, 3e-3) and (run / "trials.png").read_bytes()[:4] == b"\x89PNG"
    best = load_config(run / "best.yaml")  # a ready-to-run recipe
    assert best.lr == result["best_params"]["lr"] and best.name.endswith("-best") and best.tune == {}
    # resuming: the study already holds 3 finished trials, so asking for 3 runs none
    assert main(["tune", str(recipe), "--trials", "3"]) == 0
    assert len(optuna.load_study(study_name=result["study_name"], storage=f"sqlite:///{run / 'study.db'}").trials) == 3


def test_search_space_is_validated():
    from lmtailor.tune import parse_duration, parse_space

    space = parse_space({"lr": [1e-5, 1e-3, "log"], "lora.r": [4, 8, 16], "unfreeze_last_n": [1, 4, "int"]})
    assert space == {"lr": ("float", (1e-5, 1e-3, True)), "lora.r": ("choice", [4, 8, 16]),
                     "unfreeze_last_n": ("int", (1, 4, False))}
    with pytest.raises(ConfigError, match="unknown recipe key 'lora.rank'"):
        parse_space({"lora.rank": [4, 8]})
    with pytest.raises(ConfigError, match="log range needs low > 0"):
        parse_space({"lr": [0, 1e-3, "log"]})
    assert parse_duration("30m") == 1800 and parse_duration("2h") == 7200 and parse_duration("45") == 45
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration("soon")
