"""Experiment trackers through Accelerate: TensorBoard by default, MLflow, Weights & Biases (offline unless told
otherwise) and trackio where installed. The run folder's trackers.json records which were used and where."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lmtailor.config import RunConfig
from lmtailor.errors import ConfigError
from lmtailor.io import atomic_write_json

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


def make_trackers(cfg: RunConfig) -> list[Any]:
    """Accelerate tracker objects for `report_to` (for Accelerator(log_with=...)); started by `start_trackers`.

    Raises:
        ConfigError: a tracker whose package is not installed.
    """
    from accelerate import tracking

    made: list[Any] = []
    for name in dict.fromkeys(cfg.report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"config key 'report_to': {name} is not installed",
                              f"pip install {PACKAGES[name]}, or drop it from report_to")
        if name == "tensorboard":
            made.append(tracking.TensorBoardTracker("tb", cfg.run_dir))
        elif name == "mlflow":
            made.append(tracking.MLflowTracker(experiment_name=cfg.name, run_name=cfg.name))
        elif name == "wandb":
            made.append(tracking.WandBTracker(cfg.name, name=cfg.name))
        else:  # trackio reads its folder when first imported: set it before the tracker starts
            os.environ.setdefault("TRACKIO_DIR", str(Path(cfg.run_dir) / "trackio"))
            made.append(tracking.TrackioTracker(cfg.name))
    return made


def start_trackers(acc: Any, cfg: RunConfig, run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Start the trackers (main process; Accelerate was created with log_with=make_trackers(cfg)) and write
    `<run>/trackers.json`; returns what it records."""
    where: dict[str, Any] = {}
    names = [str(t) for t in cfg.report_to]
    if "mlflow" in names:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # a plain folder needs no server or database; MLflow asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        where["mlflow"] = uri
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; `wandb sync` uploads later
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        where["wandb"] = f"{os.environ['WANDB_MODE']} in {os.environ['WANDB_DIR']}"
    if "trackio" in names:
        where["trackio"] = os.environ["TRACKIO_DIR"]
    if "tensorboard" in names:
        where["tensorboard"] = str(run_dir / "tb")
    flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.items()}
    acc.init_trackers(cfg.name, config=flat)
    record = {"report_to": names, "where": where}
    atomic_write_json(run_dir / "trackers.json", record)
    return record
