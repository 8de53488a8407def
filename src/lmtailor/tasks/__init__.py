"""Task objectives: sequence classification (`classify`) and sequence-to-sequence (`seq2seq`), their metrics,
text augmentation and reports. Importing a submodule registers its objective (objectives.py imports both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASK_OBJECTIVES = ("classify", "seq2seq")


def run_objective(target: str | Path) -> str | None:
    """The objective a run folder was trained with (None for a plain model folder or name)."""
    from lmtailor.models import run_config

    path = Path(target)
    return run_config(path).get("objective") if path.is_dir() else None


def evaluate_run(target: str, data: str, fmt: str = "auto", n_generate: int = 200,
                 out: str | None = None) -> dict[str, Any]:
    """`lmtailor eval` of a classify or seq2seq run: its task metrics on a data file (JSON written to `out`)."""
    from lmtailor.errors import ConfigError

    objective = run_objective(target)
    if objective == "classify":
        from lmtailor.tasks.classify import evaluate_run as evaluate_classify

        return evaluate_classify(target, data, fmt, out)
    if objective == "seq2seq":
        from lmtailor.tasks.seq2seq import evaluate_run as evaluate_seq2seq

        return evaluate_seq2seq(target, data, fmt, n_generate, out)
    raise ConfigError(f"{target} is not a run of a task objective ({', '.join(TASK_OBJECTIVES)})")
