"""Hyperparameter search with Optuna over any recipe key: `lmtailor tune recipe.yaml --trials 20 --timeout 30m`.

The search space comes from the recipe's `tune:` section and/or `--param` options, one entry per dotted key:
    lr: [1.0e-5, 1.0e-3, log]      a float range, sampled on a log scale ("uniform": linear; "int": integers)
    lora.r: [4, 8, 16]             a choice among the values listed
    lora.target_modules: [[q_proj, v_proj], all-linear]
Each trial trains the recipe with its values into `<run>/trials/trial-NNN`; the validation metric the recipe names
(`metric_for_best`, reported every `eval_every` steps) is reported to Optuna, and a MedianPruner stops trials that
fall behind the median of earlier ones at the same step. The study lives in `<run>/study.db` (SQLite), so running
the same command again resumes it; `--trials` is the total the study should reach. The report: `best.yaml` (a
ready-to-run recipe with the best values), `trials.png` (values per trial and the intermediate curves) and
`tune.json`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from lmtailor.config import allowed_keys, apply_overrides, build_config, parse_duration, parse_override, read_yaml
from lmtailor.errors import ConfigError
from lmtailor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmtailor.metrics import higher_is_better
from lmtailor.report import png_bytes

RANGE_KINDS = ("log", "uniform", "int")


def parse_space(space: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Validate a search space: key -> ("float"|"int", (low, high, log)) or ("choice", [values]).

    Raises:
        ConfigError: a key that no recipe has, or a malformed entry.
    """
    keys = set(allowed_keys())
    out: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        if key not in keys or key == "tune":
            raise ConfigError(f"tune: unknown recipe key {key!r}", "search any key a recipe may set, e.g. lr, "
                              "lora.r, lora.alpha, lora.dropout, epochs, batch_size, unfreeze_last_n, weight_decay")
        if not isinstance(spec, list) or not spec:
            raise ConfigError(f"tune.{key}: expected a list, got {spec!r}",
                              "write [low, high, log|uniform|int] for a range or [a, b, ...] for choices")
        if len(spec) == 3 and spec[2] in RANGE_KINDS:
            low, high, kind = spec
            if not all(isinstance(v, int | float) for v in (low, high)) or not low < high:
                raise ConfigError(f"tune.{key}: range bounds must be numbers with low < high, got {spec!r}")
            if kind == "log" and low <= 0:
                raise ConfigError(f"tune.{key}: a log range needs low > 0, got {low}")
            out[key] = ("int" if kind == "int" else "float", (low, high, kind == "log"))
        else:
            out[key] = ("choice", spec)
    return out


def _suggest(trial: Any, key: str, dist: tuple[str, Any]) -> Any:
    kind, arg = dist
    if kind == "choice":
        # Optuna stores categorical values that are JSON scalars; lists (e.g. target_modules) go by index.
        if all(v is None or isinstance(v, str | int | float | bool) for v in arg):
            return trial.suggest_categorical(key, arg)
        return arg[trial.suggest_categorical(f"{key}#", list(range(len(arg))))]
    low, high, log = arg
    if kind == "int":
        return trial.suggest_int(key, int(low), int(high), log=log)
    return trial.suggest_float(key, float(low), float(high), log=log)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _values(trial_params: dict[str, Any], space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Recipe values of a finished trial (choices stored by index are mapped back)."""
    out = {}
    for key, (_kind, arg) in space.items():
        if f"{key}#" in trial_params:
            out[key] = arg[trial_params[f"{key}#"]]
        elif key in trial_params:
            out[key] = trial_params[key]
    return out


def tune(recipe: str | None, overrides: list[str] | None = None, trials: int = 20, timeout: str | float | None = None,
         params: list[str] | None = None, prune: bool = True, startup_trials: int = 2,
         enqueue: list[dict[str, Any]] | None = None, progress: bool = False, halving: bool = False
         ) -> dict[str, Any]:
    """Search hyperparameters of a recipe; returns the summary also written to `<run>/tune.json`.

    Args:
        recipe: YAML recipe (its `tune:` section is the search space).
        overrides: key=value overrides applied to the recipe first.
        trials: the number of finished trials the study should reach (a resumed study counts its earlier ones).
        timeout: stop starting trials after this long ('30m', '2h', seconds).
        params: more search-space entries as `key=[...]` (YAML lists), added to or replacing the recipe's.
        prune: stop trials whose intermediate metric falls below the median of earlier trials (needs eval_every).
        startup_trials: trials that run to the end before pruning starts.
        enqueue: parameter sets to try first (e.g. the recipe's current values), as {key: value}.
        progress: show training progress bars.
        halving: prune by successive halving (Optuna's SuccessiveHalvingPruner: at each rung, only the best third
            of the trials that reached it go on) instead of the median rule.

    Raises:
        ConfigError: empty or malformed search space, unknown keys.
    """
    import optuna

    data = read_yaml(recipe) if recipe else {}
    data = apply_overrides(data, overrides or [])
    space_spec: dict[str, Any] = dict(data.pop("tune", None) or {})
    for text in params or []:
        path, value = parse_override(text)
        space_spec[".".join(path)] = value
    space = parse_space(space_spec)
    if not space:
        raise ConfigError("nothing to tune: the search space is empty",
                          "add a `tune:` section to the recipe (e.g. tune: {lr: [1.0e-5, 1.0e-3, log]}) or --param")
    base = build_config(data, str(recipe or "config"))
    if recipe and "output_dir" not in data and "name" not in data:
        data["name"] = Path(recipe).stem
        base = build_config(data, str(recipe))
    run_dir = base.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    metric = base.metric_for_best
    maximize = higher_is_better(metric)
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.NopPruner() if not prune else
        optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3) if halving else
        optuna.pruners.MedianPruner(n_startup_trials=startup_trials))
    study = optuna.create_study(study_name=base.name, storage=f"sqlite:///{run_dir / 'study.db'}",
                                load_if_exists=True, direction="maximize" if maximize else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=base.seed), pruner=pruner)
    for values in enqueue or []:
        study.enqueue_trial({k: v for k, v in values.items()}, skip_if_exists=True)

    from lmtailor.train import train

    def objective(trial: optuna.Trial) -> float:
        trial_data = copy.deepcopy(data)
        values = {key: _suggest(trial, key, dist) for key, dist in space.items()}
        for key, value in values.items():
            _set(trial_data, key, value)
        trial_dir = run_dir / "trials" / f"trial-{trial.number:03d}"
        trial_data.update(name=f"{base.name}-trial-{trial.number:03d}", output_dir=str(trial_dir), overwrite=True,
                          resume=False)
        _set(trial_data, "eval.before_after", False)
        cfg = build_config(trial_data, f"trial {trial.number}")
        trial.set_user_attr("run_dir", str(trial_dir))

        def on_eval(step: int, record: dict[str, Any]) -> None:
            value = record.get(f"val_{metric}")
            if value is None or math.isnan(value):
                return
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4g} at step {step}")

        summary = train(cfg, progress=progress, on_eval=on_eval)
        best = summary.get("best", {}).get("value")
        return float(best if best is not None else summary["after"][metric])

    finished = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, trials - len(finished))
    if remaining:
        study.optimize(objective, n_trials=remaining, timeout=parse_duration(timeout), gc_after_trial=True)
    return report(study, space, data, run_dir, metric, eval_every=base.eval_every)


def report(study: Any, space: dict[str, tuple[str, Any]], data: dict[str, Any], run_dir: Path, metric: str,
           eval_every: int = 0) -> dict[str, Any]:
    """Write best.yaml, trials.png and tune.json for a study; return the summary."""
    import optuna

    states = {s.name.lower(): 0 for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                          optuna.trial.TrialState.FAIL)}
    for t in study.trials:
        if t.state.name.lower() in states:
            states[t.state.name.lower()] += 1
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": _values(t.params, space),
             "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
             "run_dir": t.user_attrs.get("run_dir")} for t in study.trials]
    summary: dict[str, Any] = {"study": str(run_dir / "study.db"), "study_name": study.study_name, "metric": metric,
                               "direction": study.direction.name.lower(), "trials": states, "all": rows,
                               "pruning": bool(eval_every)}
    if states["complete"]:
        best = study.best_trial
        best_values = _values(best.params, space)
        recipe = copy.deepcopy(data)
        for key, value in best_values.items():
            _set(recipe, key, value)
        name = str(recipe.get("name", run_dir.name))
        recipe["name"] = f"{name}-best"
        recipe.pop("output_dir", None)
        header = (f"# best of {len(study.trials)} trials of study {study.study_name} ({run_dir / 'study.db'}):\n"
                  f"# {metric} = {best.value:.6g} (trial {best.number}); tuned: "
                  + ", ".join(f"{k}={v}" for k, v in best_values.items()) + "\n")
        atomic_write_text(run_dir / "best.yaml", header + yaml.safe_dump(recipe, sort_keys=False))
        summary.update(best_value=best.value, best_params=best_values, best_trial=best.number,
                       best_yaml=str(run_dir / "best.yaml"))
    atomic_write_bytes(run_dir / "trials.png", trials_png(rows, metric))
    atomic_write_json(run_dir / "tune.json", summary)
    return summary


def trials_png(rows: list[dict[str, Any]], metric: str) -> bytes:
    """Two panels: final value per trial (colour = state) and the intermediate metric curves."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"complete": "#1f77b4", "pruned": "#ff7f0e", "fail": "#d62728", "running": "#7f7f7f"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for state, color in colors.items():
        pts = [(r["number"], r["value"] if r["value"] is not None else
                (list(r["intermediate"].values())[-1] if r["intermediate"] else math.nan))
               for r in rows if r["state"] == state]
        if pts:
            a.scatter(*zip(*pts, strict=True), color=color, label=state)
    a.set_xlabel("trial")
    a.set_ylabel(metric)
    a.set_title("final (pruned: last reported) value")
    a.legend()
    a.grid(alpha=0.3)
    for r in rows:
        if r["intermediate"]:
            steps = [int(s) for s in r["intermediate"]]
            b.plot(steps, list(r["intermediate"].values()), "o-", color=colors.get(r["state"], "#7f7f7f"), alpha=0.7)
    b.set_xlabel("step")
    b.set_ylabel(f"validation {metric}")
    b.set_title("intermediate values (orange: pruned)")
    b.grid(alpha=0.3)
    return png_bytes(fig)
