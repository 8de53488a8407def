"""`lmtailor compare`: zero-shot, few-shot, optimized prompts, soft prompts and fine-tuned runs on one test split.

Systems are named on the command line:
  zero-shot / few-shot   the task's first template without / with its few_shot settings, on the base model
  optimized              runs/<task>-prompt-search/best_task.yaml (written by `lmtailor prompt optimize`)
  FILE.yaml or FOLDER    a task file (or a folder holding best_task.yaml): its first template and few_shot settings
  RUN                    a run folder of `lmtailor train`: a classification run predicts with its head (from the
                         task's first input field); any other
                         (LoRA or soft prompt on the task's prompts) is scored zero-shot with the template it was
                         trained on (data.prompt_template)
  SYSTEM+kb              any prompt or fine-tuned system above, open book: each query's turn gets passages of a
                         knowledge base (the run's own `retrieval:` section when it trained with one, else the
                         task file's), placed as training and serving place them
  NAME=SYSTEM            any of the above, shown as NAME
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtailor import crypto
from lmtailor.errors import ConfigError
from lmtailor.outputs import check_output, existing, staged_folder
from lmtailor.prompting.predict import PromptRunner, PromptSpec, metrics, task_spec
from lmtailor.prompting.task import Item, PromptTask, load_task
from lmtailor.prompting.workflows import load_scorer, outputs_key, resolve_items


@dataclass
class System:
    name: str
    kind: str  # prompt | classifier | fine-tuned
    model: str
    spec: PromptSpec | None
    detail: str


def _spec_text(spec: PromptSpec) -> str:
    shots = f"{spec.k}-shot {spec.strategy} ({spec.order})" if spec.k else "zero-shot"
    return f"{shots}{', calibrated' if spec.calibrate else ''}: {spec.template!r}"


def resolve_system(text: str, task: PromptTask, base_model: str) -> System:
    """Turn one command-line system name into what to run (see the module docstring).

    Raises:
        ConfigError: an unknown name or path, or a task file whose labels differ from the task's.
    """
    if text.endswith("+kb"):
        return _open_book(resolve_system(text[:-len("+kb")], task, base_model), text, task)
    name, _, what = text.rpartition("=") if "=" in text else ("", "", text)
    if what == "zero-shot":
        spec = task_spec(task, 0, shots=False)
        return System(name or what, "prompt", base_model, spec, _spec_text(spec))
    if what == "few-shot":
        if task.few_shot.k == 0:
            raise ConfigError(f"system 'few-shot': task '{task.name}' has few_shot.k = 0",
                              "set few_shot.k in the task file (or few_shot.k=4 on the command line)")
        spec = task_spec(task, 0, shots=True)
        return System(name or what, "prompt", base_model, spec, _spec_text(spec))
    path = Path(f"runs/{task.name}-prompt-search") if what == "optimized" else Path(what)
    if path.is_dir() and (path / "best_task.yaml").is_file():
        path = path / "best_task.yaml"
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        other = load_task(path)
        if other.output.labels != task.output.labels or other.inputs != task.inputs:
            raise ConfigError(f"system {text!r}: {path} is a different task (inputs or labels differ)",
                              "compare prompts of the same task")
        spec = task_spec(other, 0, shots=True)
        label = name or ("optimized" if path.name == "best_task.yaml" else path.stem)
        return System(label, "prompt", base_model, spec, _spec_text(spec))
    if path.is_dir() and (path / "config.yaml").is_file():
        from lmtailor.runs import Run

        cfg = Run.open(path).config
        label = name or path.name
        if cfg.get("objective") == "classify":
            return System(label, "classifier", str(path), None, f"{cfg.get('method')} classification head "
                                                                  f"on {cfg.get('base_model')}")
        template = int((cfg.get("data") or {}).get("prompt_template") or 0)
        if template >= len(task.templates):
            raise ConfigError(f"system {text!r}: the run was trained on template {template}, but task "
                              f"'{task.name}' has {len(task.templates)}")
        spec = task_spec(task, template, shots=False)
        return System(label, "fine-tuned", str(path), spec,
                      f"{cfg.get('method')} on {cfg.get('base_model')}; " + _spec_text(spec))
    if what == "optimized":
        raise ConfigError(f"system 'optimized': {path}/best_task.yaml not found",
                          f"run `lmtailor prompt optimize` on task '{task.name}' first, or give the path")
    raise ConfigError(f"unknown system {text!r}",
                      "use zero-shot, few-shot, optimized, a task .yaml, a prompt-search folder or a run folder")


def _open_book(closed: System, text: str, task: PromptTask) -> System:
    """The same system with knowledge-base passages in each query's turn."""
    import dataclasses

    from lmtailor.config import RetrievalSettings

    if closed.spec is None:
        raise ConfigError(f"system {text!r}: a classification head reads no prompt, so it cannot be open book",
                          "add +kb to prompt systems and generation runs only")
    settings = task.retrieval
    if closed.kind == "fine-tuned":
        from lmtailor.runs import Run

        own = Run.open(closed.model).config.get("retrieval") or {}
        if own.get("kb"):  # the passages exactly as the run trained with them
            settings = RetrievalSettings.model_validate(own)
    if not settings.kb:
        raise ConfigError(f"system {text!r}: no knowledge base", f"set retrieval.kb in task '{task.name}' "
                          "(or on the command line: retrieval.kb=kb/)")
    spec = dataclasses.replace(closed.spec, retrieval=settings.model_dump_json())
    name = closed.name if closed.name != text[:-len("+kb")] else text
    return dataclasses.replace(closed, name=name, spec=spec,
                               detail=f"{closed.detail}; open book: {settings.k} passages of {settings.kb} "
                                      f"({settings.mode})")


def _classifier_predictions(system: System, items: list[Item], task: PromptTask) -> list[str]:
    from lmtailor.objectives.classify import predict

    field = task.inputs[0]
    out = predict(system.model, [str(it.fields[field]) for it in items])
    preds = [str(label) for label, _ in out]
    unknown = sorted(set(preds) - set(task.label_names))
    if unknown:
        raise ConfigError(f"system {system.name!r} predicts labels {unknown} that task '{task.name}' does not have",
                          f"task labels: {task.label_names}")
    return preds


def compare(task: PromptTask, systems: list[str], model: str = "smollm2-135m-instruct", test: str | None = None,
            pool: str | None = None, limit: int | None = None, out: str | None = None, cache: bool = True,
            say: Any = print, force: bool = False) -> dict[str, Any]:
    """Score every system on the same test items with the same metric; write a table, a bar chart and a report.

    Returns:
        {"rows": [{"system", "kind", "metrics", "calls", "seconds", "detail"}], ...}; also written to
        `out` (default runs/<task>-compare) as compare.json, compare.md, compare.png and report.html (sealed as
        `NAME.enc`, with the score cache, when the test data, the pool or a compared run is encrypted, or
        `task.encrypt_outputs`). An existing `out` is an error unless `force` (then it is kept as a backup).
    """
    runs = [s.rpartition("=")[2] for s in systems]
    key = outputs_key(task, model, test, pool)
    for run in runs:
        key = key or outputs_key(task, run)
    with crypto.seal_outputs(key):
        return _compare(task, systems, model, test, pool, limit, out, cache, say, force)


def _compare(task: PromptTask, systems: list[str], model: str, test: str | None, pool: str | None,
             limit: int | None, out: str | None, cache: bool, say: Any, force: bool) -> dict[str, Any]:
    folder = check_output(out or f"runs/{task.name}-compare", force, folder=True,  # before any model call
                          inputs=existing(test, pool, task.data.path if task.data else None,
                                          *(s.rpartition("=")[2] for s in systems)))
    if not systems:
        raise ConfigError("name at least one system to compare", "e.g. zero-shot few-shot optimized runs/my-run")
    resolved = [resolve_system(s, task, model) for s in systems]
    items, pool_items = resolve_items(task, test, pool, limit)
    if any(s.spec is not None and s.spec.k > 0 for s in resolved) and not pool_items:
        raise ConfigError("few-shot systems need an example pool", "pass --pool FILE or give the task a data section")
    shown = ["accuracy", "macro_f1"] if task.is_classification else ["exact_match", "chrf", "rougeL"]
    shown = [task.metric, *[m for m in shown if m != task.metric]]
    rows = []
    scorers: dict[str, Any] = {}
    for system in resolved:
        t0 = time.time()
        scores: dict[str, Any]
        calls = 0
        if system.kind == "classifier":
            preds = _classifier_predictions(system, items, task)
            refs = [it.reference(task) for it in items]
            scores = metrics(task, preds, refs)
        else:
            if system.model not in scorers:
                scorers.clear()  # one model in memory at a time
                gc.collect()
                scorers[system.model] = load_scorer(system.model, cache, progress=False)
            scorer = scorers[system.model]
            before = scorer.calls
            assert system.spec is not None
            scores, _ = PromptRunner(task, scorer, pool_items).evaluate(system.spec, items)
            calls = scorer.calls - before
        values = {k: float(v) for k, v in scores.items() if isinstance(v, float | int)}
        row: dict[str, Any] = {"system": system.name, "kind": system.kind, "detail": system.detail, "metrics": values,
               "calls": calls, "seconds": round(time.time() - t0, 1)}
        if "confusion_matrix" in scores:
            row["confusion_matrix"] = scores["confusion_matrix"]
        rows.append(row)
        say(f"{system.name:>16}: " + "  ".join(f"{m} {values.get(m, float('nan')):.4f}" for m in shown)
            + f"  ({row['seconds']} s, {calls} model calls)")
    summary = {"task": task.name, "model": model, "test": test or "held-out split of the task data",
               "examples": len(items), "metric": task.metric, "metrics": shown, "rows": rows}
    from lmtailor.prompting.report import compare_report

    with staged_folder(folder, force) as tmp:
        crypto.write_output(tmp / "compare.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        compare_report(tmp, summary)
    say(f"table, bar chart and report: {folder}/compare.md, compare.png, report.html")
    return summary
