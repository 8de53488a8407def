"""The objective registry: a leaf module (it imports only config and errors) that objectives register into.

An objective is a set of hooks the pipeline calls in this order:

    tokenizer(ctx) -> tokenizer                       what tokenizes the data (before any weights load)
    fit(ctx, train_examples) -> None                  learn what the data fixes (e.g. the label set) into ctx
    sample_weights(ctx, train_items) -> array | None  optional: draw an epoch by these weights, not a shuffle
    prepare(ctx, examples) -> (items, stats)          examples -> model-ready items (tokenized, labelled)
    model(ctx, dtype) -> nn.Module                    the pretrained or new model with the right head
    init(ctx, model, train_items) -> None             optional: fit new weights from the data before any adapter
                                                      is attached (e.g. a classification head as a linear probe)
    build(ctx, model) -> nn.Module                    loss module: forward(**batch) -> (loss sum, loss terms)
    collate(ctx, items) -> batch                      items -> tensors
    count(batch) -> int                               loss terms in a batch (the step normalizes by their total)
    evaluate(ctx, model, items, examples, progress) -> Evaluation     metrics and artifacts; the caller writes them
    baseline(ctx, train_examples, val_examples) -> {name: metrics}    optional: the obvious alternatives (e.g.
                                                      TF-IDF + logistic regression), scored like `evaluate` scores

Hooks share what they know through the `ObjectiveContext` passed to each, never through attributes set on a model
or a mutated config. Each objective module registers itself (`register_objective`); the package imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmtailor.config import RunConfig, register_metrics, register_settings
from lmtailor.errors import ConfigError


@dataclass
class ObjectiveContext:
    """What the hooks of one run know, passed explicitly to each.

    Attributes:
        cfg: the recipe.
        settings: the objective's own settings (the recipe's section under its name), or None.
        tokenizer: set once `tokenizer` ran.
        run_dir: the run folder, when there is one (None for validate/eval of a data file).
        labels: label names in id order (classification; set by `fit` or read back from a trained model).
        stats: facts about the training data that later hooks use (e.g. label counts), set by `fit`.
        train_on_prompt: the loss covers every token, not only the answers.
        step_log: scalars the loss module reports during an optimizer step (name -> one value per forward pass);
            the loop averages them (over passes and processes) into that step's history record, then clears them.
        companion: what trains alongside the model with its own optimizer (grpo's discriminator), or None: an object
            with `state() -> (tensors, json-able dict)` and `load_state(tensors, dict)`, which checkpoints save and
            resume restores, and `after_step() -> {name: scalar}`, which the loop calls after each optimizer step
            (its scalars join the step's record).
        step: the optimizer step (0-based) the loop is computing; online objectives seed their sampling by it.
    """

    cfg: RunConfig
    settings: Any = None
    tokenizer: Any = None
    run_dir: Path | None = None
    labels: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    train_on_prompt: bool = False
    step_log: dict[str, list[float]] = field(default_factory=dict)
    companion: Any = None
    step: int = 0

    def log(self, **values: float) -> None:
        """Report scalars of this forward pass into the step's history record."""
        for k, v in values.items():
            self.step_log.setdefault(k, []).append(float(v))


@dataclass
class Evaluation:
    """What an evaluate hook returns: scalar metrics (plus samples/per-class detail) and named artifacts (PNG
    bytes, e.g. {"confusion_matrix": b"..."}) that the caller writes where it wants."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)


def _no_fit(ctx: ObjectiveContext, examples: list[Any]) -> None:
    return None


@dataclass(frozen=True)
class Objective:
    """A registered training objective: its hooks (see the module docstring) and facts the pipeline needs."""

    name: str
    description: str
    tokenizer: Callable[[ObjectiveContext], Any]
    model: Callable[[ObjectiveContext, Any], Any]
    prepare: Callable[[ObjectiveContext, list[Any]], tuple[Any, dict[str, Any]]]
    build: Callable[[ObjectiveContext, Any], Any]
    collate: Callable[[ObjectiveContext, list[Any]], dict[str, Any]]
    count: Callable[[dict[str, Any]], int]
    evaluate: Callable[..., Evaluation]
    fit: Callable[[ObjectiveContext, list[Any]], None] = _no_fit
    settings: type[BaseModel] | None = None
    train_on_prompt: bool = False
    task_report: bool = False  # write task_report.html (task metrics, curves, per-class/sample tables)
    sample_weights: Callable[[ObjectiveContext, Any], Any] | None = None  # per-item draw weights of an epoch
    baseline: Callable[[ObjectiveContext, Any, Any], dict[str, dict[str, float]]] | None = None
    primary_metric: str | None = None  # the task metric a tuned model is judged by against the baselines
    init: Callable[[ObjectiveContext, Any, Any], None] | None = None  # new weights fitted from the data
    select: Callable[[RunConfig], str] | None = None  # an alias that picks a concrete objective per recipe

    def context(self, cfg: RunConfig, run_dir: Path | None = None) -> ObjectiveContext:
        return ObjectiveContext(cfg, cfg.settings, run_dir=run_dir,
                                train_on_prompt=cfg.train_on_prompt or self.train_on_prompt)


OBJECTIVES: dict[str, Objective] = {}
_HOOKS = ("tokenizer", "model", "prepare", "build", "collate", "count", "evaluate", "fit", "sample_weights", "baseline",
          "init", "select")


def register_objective(name: str, description: str, *, settings: type[BaseModel] | None = None,
                       metrics: tuple[str, ...] | None = None, **hooks: Any) -> Objective:
    """Make an objective selectable as `objective: NAME`; its settings (if any) are set under the key NAME.

    Args:
        name: lowercase letters, digits, - or _.
        description: one line for listings.
        settings: a pydantic model of the objective's own options.
        metrics: the validation metrics its evaluate hook reports that `metric_for_best` may name (loss is always
            allowed); a recipe naming another is refused when it is read.
        hooks: tokenizer, model, prepare, build, collate, count, evaluate (required unless `select` is given:
            then the name is an alias resolved per recipe), fit, sample_weights, baseline, init and select (optional),
            and the flags train_on_prompt, task_report and primary_metric.

    Raises:
        ValueError: a bad or taken name, a missing or non-callable hook, an unknown keyword.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"objective name must be lowercase letters, digits, - or _: {name!r}")
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    flags = {k: hooks.pop(k) for k in ("train_on_prompt", "task_report", "primary_metric") if k in hooks}
    unknown = set(hooks) - set(_HOOKS)
    if unknown:
        raise ValueError(f"objective {name!r}: unknown hook(s) {sorted(unknown)}; hooks are {', '.join(_HOOKS)}")
    required = () if "select" in hooks else ("tokenizer", "model", "prepare", "build", "collate", "count", "evaluate")
    missing = [h for h in required if h not in hooks]
    if missing:
        raise ValueError(f"objective {name!r}: missing hook(s) {', '.join(missing)}")
    if not all(callable(h) for h in hooks.values()):
        raise ValueError(f"objective {name!r}: every hook must be callable")
    if "select" in hooks:  # an alias: get_objective returns the objective it selects, whose hooks run
        hooks = dict.fromkeys(_HOOKS[:7], _alias_hook) | hooks
    if settings is not None:
        register_settings(name, settings)
    if metrics is not None:
        register_metrics(name, metrics)
    OBJECTIVES[name] = Objective(name, description, settings=settings, **hooks, **flags)
    return OBJECTIVES[name]


def _alias_hook(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("an alias objective's hooks are never called; get_objective resolves it first")


def get_objective(name_or_cfg: str | RunConfig) -> Objective:
    """The objective a name (or a recipe: aliases such as seq2seq resolve by its base model) stands for.

    Raises:
        ConfigError: no objective of that name (the message lists the registered ones).
    """
    cfg = name_or_cfg if isinstance(name_or_cfg, RunConfig) else None
    name = cfg.objective if cfg is not None else str(name_or_cfg)
    if name not in OBJECTIVES:
        raise ConfigError(f"config key 'objective': unknown objective {name!r}",
                          f"allowed values are {', '.join(sorted(OBJECTIVES))}")
    objective = OBJECTIVES[name]
    if objective.select is not None:
        if cfg is None:
            raise ConfigError(f"objective {name!r} depends on the recipe (its base model); pass the recipe")
        objective = OBJECTIVES[objective.select(cfg)]
    return objective
