"""`lmtailor prompt run` and `lmtailor prompt optimize`: score one prompt, or search for the best one."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import yaml

from lmtailor import crypto
from lmtailor.errors import ConfigError, DataError
from lmtailor.io import atomic_write_text
from lmtailor.outputs import check_output, existing, staged_folder
from lmtailor.prompting.predict import PromptRunner, PromptSpec, task_spec
from lmtailor.prompting.scoring import ScoreCache, Scorer, default_cache, model_key
from lmtailor.prompting.search import make_candidates, paraphrase_templates, successive_halving
from lmtailor.prompting.task import Item, PromptTask, load_items, task_splits


def load_scorer(target: str, cache: bool = True, batch_size: int = 16, progress: bool = True) -> Scorer:
    """A Scorer for a model name, model folder or run folder (LoRA or soft-prompt adapters included)."""
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load()
    return Scorer(model, tok, model_key(target, run.info), default_cache() if cache else ScoreCache(), batch_size,
                  progress)


def outputs_key(task: PromptTask, model: str, *paths: str | None) -> crypto.Key | None:
    """The key a prompt verb seals its score cache entries and outputs with, or None: `task.encrypt_outputs`, which
    when unset follows the inputs (any data file encrypted, or the model a run with sealed weights: what a model
    trained on secret data answers may recite it)."""
    sealed = task.encrypt_outputs
    if sealed is None:
        data = [task.data.path, task.data.val_path, task.data.test_path] if task.data else []
        sealed = any(crypto.is_encrypted(f) for p in (*paths, *data) for f in _local_files(p)) or \
            crypto.has_encrypted_files(Path(model) / "model") or crypto.has_encrypted_files(Path(model))
    return crypto.active_keys().load() if sealed else None


def _local_files(path: str | None) -> list[Path]:
    from lmtailor.data.sources import local_files

    if not path or path.startswith("catalog:"):
        return []
    try:
        return local_files(path) or []
    except DataError:
        return []  # a hub id, or a path the reader will report itself


def resolve_items(task: PromptTask, data: str | None, pool: str | None, limit: int | None = None
                  ) -> tuple[list[Item], list[Item]]:
    """(evaluation items, few-shot pool): files when given, else the task data's held-out and training splits."""
    split: tuple[list[Item], list[Item]] | None = None

    def splits() -> tuple[list[Item], list[Item]]:
        nonlocal split
        split = split or task_splits(task)
        return split

    items = load_items(data, task) if data else splits()[1]
    pool_items = load_items(pool, task) if pool else (splits()[0] if task.data is not None else [])
    return items[:limit] if limit else items, pool_items


def _check_pool(spec: PromptSpec, pool: list[Item], task: PromptTask) -> None:
    if spec.k > 0 and not pool:
        raise ConfigError(f"few_shot.k is {spec.k} but task '{task.name}' has no example pool",
                          "pass --pool FILE, add a data section to the task file, or set few_shot.k=0")


def run_prompt(task: PromptTask, model: str, data: str | None = None, pool: str | None = None,
               template: int = 0, shots: bool = True, limit: int | None = None, out: str | None = None,
               cache: bool = True, say: Any = print, force: bool = False) -> dict[str, Any]:
    """Score the task's prompt (template `template`, its few_shot settings unless `shots` is False) on `data`.

    With sealed outputs (`outputs_key`), the score cache and `out`'s files are encrypted (`NAME.enc`). An existing
    `out` is an error unless `force` (then it is kept as a backup, see lmtailor.outputs).

    Returns:
        {"metrics": ..., "examples": n, "calls": model calls, "prompt": spec, "seconds": ...}.
    """
    with crypto.seal_outputs(outputs_key(task, model, data, pool)):
        return _run_prompt(task, model, data, pool, template, shots, limit, out, cache, say, force)


def _run_prompt(task: PromptTask, model: str, data: str | None, pool: str | None, template: int, shots: bool,
                limit: int | None, out: str | None, cache: bool, say: Any, force: bool) -> dict[str, Any]:
    inputs = existing(data, pool, task.data.path if task.data else None)
    folder = check_output(out, force, folder=True, inputs=inputs) if out else None
    if not 0 <= template < len(task.templates):
        raise ConfigError(f"--template {template}: task '{task.name}' has {len(task.templates)} template(s)",
                          f"allowed values are 0..{len(task.templates) - 1}")
    items, pool_items = resolve_items(task, data, pool, limit)
    spec = task_spec(task, template, shots)
    _check_pool(spec, pool_items, task)
    scorer = load_scorer(model, cache)
    t0 = time.time()
    scores, preds = PromptRunner(task, scorer, pool_items).evaluate(spec, items)
    result = {"task": task.name, "model": model, "examples": len(items), "metric": task.metric,
              "score": scores[task.metric], "metrics": scores, "calls": scorer.calls,
              "prompt_tokens": round(preds.prompt_tokens, 1), "prompt": spec.describe(),
              "seconds": round(time.time() - t0, 1)}
    if folder is not None:
        rows = [{"source": it.source, "reference": r, "prediction": p}
                for it, r, p in zip(items, preds.references, preds.predictions, strict=True)]
        with staged_folder(folder, force) as tmp:
            crypto.write_output(tmp / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            crypto.write_output(tmp / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                   for r in rows))
    say(f"{task.name}: {task.metric} {scores[task.metric]:.4f} on {len(items)} examples "
        f"({spec.k}-shot{' ' + spec.strategy if spec.k else ''}, {scorer.calls} model calls, "
        f"{result['seconds']} s)")
    return result


def optimize_prompt(task: PromptTask, model: str, dev: str | None = None, pool: str | None = None,
                    budget: int | None = None, out: str | None = None, cache: bool = True,
                    say: Any = print, force: bool = False) -> dict[str, Any]:
    """Search instruction wording, example selection, shots and order on a dev set within a budget of model calls.

    Writes to `out` (default runs/<task>-prompt-search): best_task.yaml (a ready-to-run task file with the winning
    prompt), candidates.json (every candidate and its scores), search.png and report.html. With sealed outputs
    (`outputs_key`) the score cache and all but best_task.yaml (a task file other verbs read: instructions and
    settings, no data) are encrypted (`NAME.enc`). An existing `out` is an error unless `force` (then it is kept as
    a backup).
    """
    with crypto.seal_outputs(outputs_key(task, model, dev, pool)):
        return _optimize_prompt(task, model, dev, pool, budget, out, cache, say, force)


def _optimize_prompt(task: PromptTask, model: str, dev: str | None, pool: str | None, budget: int | None,
                     out: str | None, cache: bool, say: Any, force: bool) -> dict[str, Any]:
    folder = check_output(out or f"runs/{task.name}-prompt-search", force, folder=True,
                          inputs=existing(dev, pool, task.data.path if task.data else None))  # before the model calls
    s = task.search
    budget = budget or s.budget
    # Subsets of the search are prefixes of the dev set, so it is put in one seeded random order.
    if dev:
        dev_items = load_items(dev, task)
        random.Random(s.seed).shuffle(dev_items)
        pool_items = load_items(pool, task) if pool else (task_splits(task)[0] if task.data else [])
    else:  # dev examples come from the training split; the rest of it is the pool
        shuffled = list(task_splits(task)[0])
        random.Random(s.seed).shuffle(shuffled)
        dev_items, pool_items = shuffled[: task.dev_size], shuffled[task.dev_size:]
        if pool:
            pool_items = load_items(pool, task)
    if not dev_items:
        raise ConfigError(f"task '{task.name}': the dev set is empty", "pass --dev FILE or raise dev_size")
    scorer = load_scorer(model, cache, progress=False)
    runner = PromptRunner(task, scorer, pool_items)
    t0 = time.time()

    templates = [(t, f"template {i}") for i, t in enumerate(task.templates)]
    paraphrase_calls = 0
    if s.paraphrases:
        before = scorer.calls  # cached paraphrases cost nothing
        extra = paraphrase_templates(task, lambda msgs: scorer.generate(msgs, 60), s.paraphrases)
        paraphrase_calls = scorer.calls - before
        templates += extra
        say(f"instructions: {len(task.templates)} given + {len(extra)} written by the model "
            f"({paraphrase_calls} model calls)")
    candidates = make_candidates(task, templates)
    if not pool_items:
        candidates = [c for c in candidates if c.spec.k == 0]

    def evaluate(spec: PromptSpec, n: int) -> tuple[float, int]:
        before = scorer.calls
        scores, _ = runner.evaluate(spec, dev_items[:n])
        return float(scores[task.metric]), scorer.calls - before

    result = successive_halving(candidates, evaluate, len(dev_items), budget, s.min_examples, s.eta, s.seed,
                                calls_so_far=paraphrase_calls,
                                progress=say)
    best = result.best
    seconds = round(time.time() - t0, 1)
    best_task = task.model_copy(deep=True)
    best_task.templates = [best.spec.template] + [t for t in task.templates if t != best.spec.template]
    best_task.few_shot.k = best.spec.k
    best_task.few_shot.strategy = best.spec.strategy
    best_task.few_shot.order = best.spec.order  # type: ignore[assignment]
    best_task.calibrate = best.spec.calibrate
    summary = {"task": task.name, "model": model, "metric": task.metric, "budget": budget, "calls": result.calls,
               "stopped_by_budget": result.stopped_by_budget, "dev_examples": len(dev_items),
               "pool_examples": len(pool_items), "candidates": len(candidates),
               "rounds": result.rounds, "seconds": seconds, "best": best.row(), "table": result.table()}
    from lmtailor.prompting.report import search_report

    with staged_folder(folder, force) as tmp:
        atomic_write_text(tmp / "best_task.yaml",
                          f"# best prompt of `lmtailor prompt optimize` on {model}: dev {task.metric} "
                          f"{best.best_score:.4f} on {max(best.scores, default=0)} examples\n"
                          + yaml.safe_dump(best_task.model_dump(mode="json", exclude_none=True), sort_keys=False,
                                           allow_unicode=True))
        crypto.write_output(tmp / "candidates.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        search_report(tmp, summary)
    say(f"best: candidate {best.id} ({best.origin}, {best.spec.k}-shot"
        f"{' ' + best.spec.strategy + ', ' + best.spec.order if best.spec.k else ''}) dev {task.metric} "
        f"{best.best_score:.4f} on {max(best.scores, default=0)} examples; {len(result.table())} candidates, "
        f"{result.calls}/{budget} model calls, {seconds} s -> {folder / 'best_task.yaml'}")
    return summary
