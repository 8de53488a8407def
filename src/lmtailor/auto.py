"""`lmtailor auto DATA --budget 20m`: pick the objective for the data, search the few settings that matter on a
dev split carved from the training data, train the winner, and report every candidate and the final run against
the baselines on a held-out test split.

Steps (each writes into the output folder):
1. data/: the records read once (format detected), split into train.jsonl and test.jsonl (the recipe's split rule:
   a seeded hash of each example; 10% held out, at most 300 examples). The test split is never seen by the search.
2. search/: an Optuna study (`lmtailor tune` machinery) over lr, LoRA rank and epochs; each trial trains on
   train.jsonl less a dev split (20%, at most 200 examples) it is judged on; successive halving stops weak trials
   early. The
   study gets `search_share` of the budget; each trial a slice of it (its steps fitted with `budget=`).
3. final/: the best settings trained on all of train.jsonl with the rest of the budget, evaluated on test.jsonl:
   its report holds the baselines, before and after.
4. auto.json and auto.md: what was chosen and why, every candidate, the final table and the verdict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from lmtailor.config import build_config, parse_duration
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.io import atomic_write_json, atomic_write_text
from lmtailor.report import comparison_table

# The objective for each record format, and what the search explores for it.
FORMAT_OBJECTIVES = {"labeled": "classify", "text": "clm"}  # every chat-shaped format: sft
SPACES: dict[str, dict[str, list[Any]]] = {
    "classify": {"lr": [2.0e-4, 3.0e-3, "log"], "lora.r": [8, 16], "epochs": [1, 3, "int"]},
    "sft": {"lr": [5.0e-5, 1.0e-3, "log"], "lora.r": [8, 16, 32], "epochs": [1, 3, "int"]},
    "clm": {"lr": [5.0e-5, 1.0e-3, "log"], "lora.r": [8, 16]},
}
SEARCH_METRIC = {"classify": "macro_f1", "sft": "loss", "clm": "loss"}  # cheap to measure at every validation
RESERVE = 0.15  # of the budget, kept for loading models and the final before/after evaluation
DEV_MAX = 200  # dev examples each search trial is judged on (a larger split costs the search most of its time)


def _record(ex: Example) -> dict[str, Any]:
    """An example back as a record of the format it came from (chat, text or labeled)."""
    if ex.messages is not None:
        return {"messages": ex.messages}
    if "label" in ex.meta:
        return {"text": ex.text, "label": ex.meta["label"]}
    return {"text": ex.text}


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    atomic_write_text(path, "".join(json.dumps(_record(ex), ensure_ascii=False) + "\n" for ex in examples))


def auto(data: str, budget: str | float, out: str | None = None, base_model: str = "smollm2-135m-instruct",
         fmt: str = "auto", trials: int = 6, search_share: float = 0.4, progress: bool = False,
         seed: int = 42) -> dict[str, Any]:
    """Tailor a model to a data file within a wall-clock budget; returns the summary written to auto.json.

    Args:
        data: a data file, folder, hub id or catalog:NAME (any supported format; detected).
        budget: wall-clock time for the whole job ('20m', '2h', seconds).
        out: output folder (default runs/auto-<data name>).
        base_model: the model to tailor.
        fmt: the data format, or auto.
        trials: candidates the search may start.
        search_share: part of the budget for the search (the rest trains and evaluates the winner).

    Raises:
        ConfigError: a bad budget or too little time; DataError: bad records.
    """
    from lmtailor.data.validate import load_datasets, load_examples_with_format
    from lmtailor.train import train
    from lmtailor.tune import tune

    total = parse_duration(budget, "--budget")
    if not total or total < 10:
        raise ConfigError(f"--budget {budget!r} leaves no time to train", "give at least a minute, e.g. 20m")
    start = time.monotonic()
    root = Path(out or f"runs/auto-{Path(data.removeprefix('catalog:')).stem}")
    _, detected = load_examples_with_format(data, fmt)
    objective = FORMAT_OBJECTIVES.get(detected, "sft")
    held = build_config({"base_model": base_model, "objective": objective, "seed": seed,
                         "data": {"path": data, "format": detected, "val_fraction": 0.1}}, "auto")
    train_ex, test_ex, stats = load_datasets(held.data)
    test_ex = test_ex[:300]
    if len(train_ex) < 10 or not test_ex:
        raise ConfigError(f"{data}: {len(train_ex)} training and {len(test_ex)} test examples are too few for auto",
                          "give at least a few dozen records")
    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "train.jsonl", train_ex)
    _write_jsonl(folder / "test.jsonl", test_ex)
    print(f"auto: {len(train_ex)} training / {len(test_ex)} test examples ({detected} format) -> objective "
          f"{objective}; budget {total:.0f} s, {search_share:.0%} for the search")

    # ---- search on a dev split of the training data ----------------------------------------------------------
    search_s = total * search_share
    recipe = {"name": "search", "output_dir": str(root / "search"), "base_model": base_model,
              "objective": objective, "method": "lora", "seed": seed,
              # a dev split of at most 200 examples: its evaluations are charged to each trial's time
              "data": {"path": str(folder / "train.jsonl"), "format": detected,
                       "val_size": min(DEV_MAX, max(10, len(train_ex) // 5))},
              "metric_for_best": SEARCH_METRIC[objective], "budget": search_s / max(2, trials) * 1.5,
              "eval": {"generate_examples": 0}, "tune": SPACES[objective]}
    recipe_file = root / "search.yaml"
    atomic_write_text(recipe_file, yaml.safe_dump(recipe, sort_keys=False))
    study = tune(str(recipe_file), trials=trials, timeout=search_s, halving=True, progress=progress)
    if "best_params" not in study:
        raise ConfigError("auto: no search trial finished within the budget", "give a larger --budget")

    # ---- the winner, trained on all the training data, judged on the test split -------------------------------
    left = total - (time.monotonic() - start)
    final: dict[str, Any] = {k: v for k, v in recipe.items() if k not in ("tune", "metric_for_best", "eval")}
    final.update(name="final", output_dir=str(root / "final"), overwrite=True, budget=max(10.0, left * (1 - RESERVE)),
                 data={"path": str(folder / "train.jsonl"), "format": detected,
                       "val_path": str(folder / "test.jsonl")})
    for key, value in study["best_params"].items():
        node: dict[str, Any] = final
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    atomic_write_text(root / "final.yaml", yaml.safe_dump(final, sort_keys=False))
    summary = train(build_config(final, str(root / "final.yaml")), progress=progress)
    return _report(root, data, detected, objective, total, time.monotonic() - start, stats, study, summary)


def _report(root: Path, data: str, detected: str, objective: str, budget: float, elapsed: float,
            stats: dict[str, Any], study: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """auto.json and auto.md: the choices, every candidate and the final table against the baselines."""
    candidates = [{k: t[k] for k in ("number", "state", "value", "params")} for t in study.get("all", [])]
    out = {"data": data, "format": detected, "objective": objective, "budget_s": budget,
           "elapsed_s": round(elapsed, 1), "data_stats": stats, "search_metric": study["metric"],
           "candidates": candidates, "best_params": study["best_params"], "final_run": summary.get("run_dir"),
           "baselines": summary.get("baselines"), "before": _scalars(summary.get("before")),
           "after": _scalars(summary.get("after")), "verdict": summary.get("verdict")}
    atomic_write_json(root / "auto.json", out)
    rows = "\n".join(f"| {c['number']} | {c['state']} | {_fmt(c['value'])} | "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in c["params"].items()) + " |" for c in candidates)
    table = comparison_table(summary.get("before") or {}, summary.get("after") or {}, 0, summary.get("baselines"),
                             summary.get("verdict"))
    atomic_write_text(root / "auto.md", f"""# lmtailor auto: {data}

{detected} records -> objective **{objective}**; {elapsed:.0f} s of a {budget:.0f} s budget.

## Candidates (dev split of the training data; {study['metric']})

| trial | state | {study['metric']} | settings |
|---|---|---|---|
{rows}

## Final run on the test split ({out['final_run']})

```
{table}
```
""")
    print(f"\nauto: {len(candidates)} candidates; best {study['best_params']}; report {root / 'auto.md'}")
    return out


def _scalars(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
