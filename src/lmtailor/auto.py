"""`lmtailor auto DATA --budget 20m`: pick the objective for the data, search the few settings that matter on a
dev split carved from the training data, train the winner, and report every candidate and the final run against
the baselines on a held-out test split.

Steps (each writes into the output folder):
1. data/: the records read once (format detected), split into train.jsonl and test.jsonl (the recipe's split rule:
   a seeded hash of each example; 10% held out, at most 300 examples). The test split is never seen by the search.
   An encrypted input gets encrypted splits (train.jsonl.enc, test.jsonl.enc, with the key it was read with), and
   the runs on them seal their outputs (encrypt_outputs follows encrypted data).
2. the plan: one recipe's step is timed on its own first batches (`measure_recipe`); a search runs only when the
   budget pays for at least MIN_TRIALS trials of MIN_TRIAL_STEPS steps each in its `search_share` (on 2 CPU cores
   a 20-minute budget does not: its few hundred steps all go to one run of the data-fitted defaults).
   Documents longer than the budget lets a step read (max_length cut, see `shorter_length`) get a head that reads
   the mean over the text and starts as a linear probe on the frozen model's features (classify.pooling=mean,
   classify.head_init=probe), as the data-fitted recipe chooses itself for documents cut at max_length
   (lmtailor.fitting.choose_head); the probe's forward pass over the training texts is charged to the budget.
   An sft run's LoRA adapters go on every linear layer when a second timed probe shows the budget still fits every
   planned step with them (`widen_adapters`).
3. search/: an Optuna study (`lmtailor tune` machinery) over lr, LoRA rank and epochs; each trial trains on
   train.jsonl less a dev split (10%, at most 200 examples) it is judged on; successive halving stops weak trials
   early. Each trial's steps are fitted to its slice of the search time with `budget=`.
4. final/: the best settings (or the data-fitted defaults) trained on train.jsonl less the same dev split, which
   picks the best checkpoint, with the rest of the budget; the report (baselines, before and after) is judged on
   test.jsonl (data.test_path), which nothing was selected on.
5. auto.json and auto.md: what was chosen and why, every candidate, the final table and the verdict.
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
from lmtailor.fitting import choose_retrieval
from lmtailor.io import atomic_write_json, atomic_write_text
from lmtailor.outputs import check_output, existing, set_aside
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
MIN_TRIAL_STEPS = 100  # a search trial shorter than this says little about its settings
MIN_TRIALS = 3
PROBE_SHARE = 0.02  # of the budget, after which timing a step stops probing (long documents: 40 s a step)
MIN_LENGTH = 128  # the shortest max_length auto cuts long classification documents to
GENERATED = 60  # test requests an sft run answers by generation (chrF, exact match, looping share)
# kept back from the final run's budget for auto's own report; the final run pays the rest itself
# (budget_covers=run): a fixed reserve for its before/after passes ran 60-160 s over on the 20-minute generation
# runs, whose 60 answered requests took 135-290 s a pass
FINISH_S = 20.0
DEV_MAX = 200  # dev examples each search trial is judged on (a larger split costs the search most of its time)


def _record(ex: Example) -> dict[str, Any]:
    """An example back as a record of the format it came from (chat, text or labeled)."""
    if ex.messages is not None:
        return {"messages": ex.messages}
    if "label" in ex.meta:
        return {"text": ex.text, "label": ex.meta["label"]}
    return {"text": ex.text}


def written_format(detected: str) -> str:
    """The format of the records `_record` writes for data read in `detected` format: labeled and text stay, every
    chat-shaped format (alpaca, paired, prompt_completion, sharegpt) is written as chat."""
    return detected if detected in ("labeled", "text") else "chat"


def _write_jsonl(path: Path, examples: list[Example], sealed: bool = False) -> Path:
    """The examples as JSON Lines at `path`, or, `sealed`, encrypted at `path`.enc with the key the input was read
    with (an encrypted input never gets a plaintext copy of its splits)."""
    text = "".join(json.dumps(_record(ex), ensure_ascii=False) + "\n" for ex in examples)
    if not sealed:
        atomic_write_text(path, text)
        return path
    from lmtailor.crypto import SUFFIX, write_bytes

    return write_bytes(path.with_name(path.name + SUFFIX), text.encode("utf-8"))


def _is_sealed(data: str) -> bool:
    """Whether the input is an encrypted file, or a folder holding one."""
    from lmtailor.crypto import has_encrypted_files, is_encrypted

    path = Path(data)
    return (path.is_file() and is_encrypted(path)) or (path.is_dir() and has_encrypted_files(path))


def auto(data: str, budget: str | float, out: str | None = None, base_model: str = "smollm2-135m-instruct",
         fmt: str = "auto", trials: int = 6, search_share: float = 0.4, progress: bool = False,
         seed: int = 42, force: bool = False) -> dict[str, Any]:
    """Tailor a model to a data file within a wall-clock budget; returns the summary written to auto.json.

    Args:
        data: a data file, folder, hub id or catalog:NAME (any supported format; detected).
        budget: wall-clock time for the whole job ('20m', '2h', seconds).
        out: output folder (default runs/auto-<data name>).
        base_model: the model to tailor.
        fmt: the data format, or auto.
        trials: candidates the search may start.
        search_share: part of the budget for the search (the rest trains and evaluates the winner).
        force: an existing `out` is moved to a backup (NAME.bak-<time>) first; without it, an error.

    Raises:
        ConfigError: a bad budget or too little time; DataError: bad records.
    """
    from lmtailor.data.validate import load_datasets, load_examples_with_format
    from lmtailor.train import measure_recipe, train
    from lmtailor.tune import tune

    total = parse_duration(budget, "--budget")
    if not total or total < 10:
        raise ConfigError(f"--budget {budget!r} leaves no time to train", "give at least a minute, e.g. 20m")
    start = time.monotonic()
    root = check_output(out or f"runs/auto-{Path(data.removeprefix('catalog:')).stem}", force, folder=True,
                        inputs=existing(data))  # a search study or run left there would be continued
    _, detected = load_examples_with_format(data, fmt)
    objective = FORMAT_OBJECTIVES.get(detected, "sft")
    held = build_config({"base_model": base_model, "objective": objective, "seed": seed,
                         "data": {"path": data, "format": detected, "val_fraction": 0.1}}, "auto")
    train_ex, test_ex, stats = load_datasets(held.data)
    test_ex = test_ex[:300]
    if len(train_ex) < 10 or not test_ex:
        raise ConfigError(f"{data}: {len(train_ex)} training and {len(test_ex)} test examples are too few for auto",
                          "give at least a few dozen records")
    set_aside(root, force)
    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    sealed = _is_sealed(data)
    train_file = _write_jsonl(folder / "train.jsonl", train_ex, sealed)
    test_file = _write_jsonl(folder / "test.jsonl", test_ex, sealed)
    print(f"auto: {len(train_ex)} training / {len(test_ex)} test examples ({detected} format) -> objective "
          f"{objective}; budget {total:.0f} s, {search_share:.0%} for the search")

    # ---- the plan: what a step costs here decides whether a search can pay for itself ---------------------------
    final: dict[str, Any] = {"name": "final", "output_dir": str(root / "final"), "overwrite": True,
                             "base_model": base_model, "objective": objective, "method": "lora", "seed": seed,
                             # validation (best checkpoint, early stopping) on a dev split of the training data;
                             # the report on the test split, which nothing is selected on
                             "data": {"path": str(train_file), "format": written_format(detected),
                                      "val_size": min(DEV_MAX, max(10, len(train_ex) // 10)),
                                      "test_path": str(test_file)}}
    retrieval: dict[str, Any] = {"k": 0, "reason": "not a generation objective"}
    if objective == "sft":
        retrieval = choose_retrieval(train_ex, seed)
        print(f"auto: {retrieval['reason']}")
        final["data"]["retrieved_examples"] = retrieval["k"]  # set, so that train and the trials do not judge again
        final["eval"] = {"generate_examples": min(GENERATED, len(test_ex))}
    probe = measure_recipe(build_config(final, "auto probe"), max_seconds=PROBE_SHARE * total)
    plan = plan_search(total - (time.monotonic() - start), probe, trials, search_share)
    shorter = shorter_length(objective, probe, plan)
    if shorter:  # long documents: more of them seen at a shorter length beats a fraction of them seen whole
        print(f"auto: at max_length {probe['max_length']} the budget fits {plan['steps_fit']} of the "
              f"{probe['per_epoch']} steps of one epoch; max_length {shorter} instead")
        final["max_length"] = shorter
        probe = {**measure_recipe(build_config(final, "auto probe"), max_seconds=PROBE_SHARE * total),
                 "length_reason": f"max_length {shorter}: at {probe['max_length']} the budget fits only "
                                  f"{plan['steps_fit']} of the {probe['per_epoch']} steps of one epoch"}
        plan = plan_search(total - (time.monotonic() - start), probe, trials, search_share)
    wide_reason = ""
    if objective == "sft" and "target_modules" not in final.get("lora", {}) and plan["steps_fit"] < probe["planned"]:
        # wider adapters only make steps slower: no second probe when the budget does not fit the steps already
        wide_reason = (f"adapters stay on attention's projections: the budget fits {plan['steps_fit']} of the "
                       f"{probe['planned']} planned steps with them already")
        print(f"auto: {wide_reason}")
    elif objective == "sft" and "target_modules" not in final.get("lora", {}):
        # adapters on every linear layer when the budget still fits the planned steps at their measured cost
        wide = {**final, "lora": {**final.get("lora", {}), "target_modules": "all-linear"}}
        wide_probe = measure_recipe(build_config(wide, "auto probe"), max_seconds=PROBE_SHARE * total)
        wide_plan = plan_search(total - (time.monotonic() - start), wide_probe, trials, search_share)
        wide_reason = widen_adapters(probe, wide_probe, wide_plan)
        print(f"auto: {wide_reason}")
        if wide_reason.startswith("lora.target_modules=all-linear"):
            final, probe, plan = wide, wide_probe, wide_plan
    head_s, head_reason = 0.0, ""
    # documents longer than max_length: the data-fitted recipe chose a head on mean-pooled features that starts as
    # a linear probe (lmtailor.fitting.choose_head), or the length just shortened cuts them
    fitted_head = any(c.startswith("classify.head_init=probe") for c in probe["choices"])
    if shorter or fitted_head:
        if shorter:  # set: the trials and the final run read the documents the same way
            final["classify"] = {"pooling": "mean", "head_init": "probe"}
        head_s = head_probe_seconds(probe)
        head_reason = (f"classify.pooling=mean, classify.head_init=probe (documents longer than max_length: the head "
                       f"reads the mean over the text, fitted first as a linear probe on the frozen model's features,"
                       f" about {head_s:.0f} s)")
        print(f"auto: {head_reason}")
        plan = plan_search(total - (time.monotonic() - start) - head_s, probe, trials, search_share)
    print(f"auto: a step takes {probe['step_s']:.2f} s here ({probe['per_epoch']} steps per epoch); {plan['reason']}")

    study: dict[str, Any] = {"metric": SEARCH_METRIC[objective], "all": [], "best_params": {}}
    if plan["trials"]:
        # a dev split of at most DEV_MAX examples: its evaluations are charged to each trial's time
        recipe = {**{k: v for k, v in final.items() if k != "overwrite"}, "name": "search",
                  "output_dir": str(root / "search"),
                  "data": {**final["data"], "test_path": None},
                  "metric_for_best": SEARCH_METRIC[objective], "budget": plan["trial_s"],
                  "eval": {"generate_examples": 0}, "tune": SPACES[objective]}
        recipe_file = root / "search.yaml"
        atomic_write_text(recipe_file, yaml.safe_dump(recipe, sort_keys=False))
        study = tune(str(recipe_file), trials=plan["trials"], timeout=plan["search_s"], halving=True,
                     progress=progress)
        if "best_params" not in study:
            print("auto: no search trial finished within its time; training the data-fitted defaults")
            study = {"metric": SEARCH_METRIC[objective], "all": study.get("all", []), "best_params": {}}

    # ---- the winner (or the data-fitted defaults), trained on all the training data, judged on the test split ----
    left = total - (time.monotonic() - start)
    # the final run's budget covers the whole run: train measures its loading, baselines and before evaluation, keeps
    # as much again for the after evaluation, and fits the steps (and the head's probe) into what is left
    final["budget"] = max(10.0, left - FINISH_S)
    final["budget_covers"] = "run"
    for key, value in study["best_params"].items():
        node: dict[str, Any] = final
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    atomic_write_text(root / "final.yaml", yaml.safe_dump(final, sort_keys=False))
    summary = train(build_config(final, str(root / "final.yaml")), progress=progress)
    return _report(root, data, detected, objective, total, time.monotonic() - start, stats, study, summary,
                   {**plan, "step_s": round(probe["step_s"], 3), "per_epoch": probe["per_epoch"],
                    "chosen_from_data": probe["choices"] + ([probe["length_reason"]] if shorter else [])
                    + ([f"data.retrieved_examples={retrieval['k']} ({retrieval['reason']})"] if retrieval["k"] else [])
                    + ([wide_reason] if wide_reason.startswith("lora.") else [])
                    + ([head_reason] if head_reason else []),
                    "retrieval": retrieval})


def widen_adapters(probe: dict[str, Any], wide_probe: dict[str, Any], wide_plan: dict[str, Any]) -> str:
    """Whether an sft run's LoRA adapters go on every linear layer (lora.target_modules=all-linear: the MLP's
    projections too, 2.7x the adapter parameters on the bundled model) instead of attention's four projections:
    yes when the budget still fits every planned step at the wider adapters' measured step time, so the extra
    capacity costs no steps.
    On the shell commands at a 20-minute budget on a 2-core AMX Xeon, where 244 planned steps fit either way,
    all-linear scored chrF 39.3 on the 120 test answers against 36.7 (test loss 1.93 vs 1.99; one seed, steps 2.6
    vs 2.0 s; chosen on that test split, so not yet checked on data it was not chosen on). Returns the choice with
    its reason; a budget that does not fit the steps keeps attention's."""
    cost = f"{wide_probe['step_s']:.2f} s a step against {probe['step_s']:.2f}"
    if wide_plan["steps_fit"] >= wide_probe["planned"]:
        return (f"lora.target_modules=all-linear (the budget fits the {wide_probe['planned']} planned steps with "
                f"adapters on every linear layer too: {cost})")
    return (f"adapters stay on attention's projections: with adapters on every linear layer ({cost}) the budget "
            f"would fit {wide_plan['steps_fit']} of the {wide_probe['planned']} planned steps")


def shorter_length(objective: str, probe: dict[str, Any], plan: dict[str, Any]) -> int | None:
    """A classification max_length that lets the budget see one epoch (in proportion, rounded down to a multiple
    of 32, at least MIN_LENGTH), when the length chosen from the data lets it see less; None otherwise. A step's
    cost falls at least in proportion to its length, so the estimate errs towards too few steps. Classification
    only: a generation objective's answers would be cut."""
    if objective != "classify" or plan["steps_fit"] >= probe["per_epoch"] or probe["max_length"] <= MIN_LENGTH:
        return None
    length = int(probe["max_length"] * plan["steps_fit"] / probe["per_epoch"]) // 32 * 32
    return max(MIN_LENGTH, length) if max(MIN_LENGTH, length) < probe["max_length"] else None


def head_probe_seconds(probe: dict[str, Any]) -> float:
    """About how long head_init=probe takes to read its features: one forward pass over the training items, at the
    measured cost of one over the validation items (`eval_s`, the forward share of a measured step) per token.
    The logistic regressions then fitted on those features are not counted."""
    return float(probe["eval_s"] * probe["train_tokens"] / max(1.0, probe["val_tokens"]))


def plan_search(seconds: float, probe: dict[str, Any], trials: int, search_share: float) -> dict[str, Any]:
    """How many search trials `seconds` can pay for, given a measured step (`probe` from measure_recipe).

    A trial must train at least MIN_TRIAL_STEPS steps (fewer say little about a learning rate or a rank), and a
    search needs MIN_TRIALS of them; otherwise every second goes to one run of the data-fitted defaults, which is
    what a search this small would end up near anyway, with more steps. Returns trials (0: no search), the search's
    seconds, each trial's budget and the reason in words."""
    usable = seconds * (1 - RESERVE)
    per_step = probe["step_s"] + (probe["eval_s"] / probe["eval_every"] if probe.get("eval_every") else 0.0)
    steps = int(usable / per_step)
    search_steps = int(usable * search_share / per_step)
    n = min(trials, search_steps // MIN_TRIAL_STEPS)
    if n < min(MIN_TRIALS, trials):
        return {"trials": 0, "search_s": 0.0, "trial_s": 0.0, "steps_fit": steps,
                "reason": f"the budget fits about {steps} steps; a search of {MIN_TRIALS} trials of at least "
                          f"{MIN_TRIAL_STEPS} steps would need {MIN_TRIALS * MIN_TRIAL_STEPS / search_share:.0f}, "
                          "so no search: every step goes to the data-fitted defaults"}
    search_s = usable * search_share
    return {"trials": n, "search_s": search_s, "trial_s": search_s / n * 1.5, "steps_fit": steps,
            "reason": f"the budget fits about {steps} steps: a search of {n} trials of about {search_steps // n} "
                      f"steps ({search_share:.0%} of the budget, successive halving), then the winner"}


def _report(root: Path, data: str, detected: str, objective: str, budget: float, elapsed: float,
            stats: dict[str, Any], study: dict[str, Any], summary: dict[str, Any], plan: dict[str, Any]
            ) -> dict[str, Any]:
    """auto.json and auto.md: the choices, every candidate and the final table against the baselines."""
    candidates = [{k: t[k] for k in ("number", "state", "value", "params")} for t in study.get("all", [])]
    out = {"data": data, "format": detected, "objective": objective, "budget_s": budget,
           "elapsed_s": round(elapsed, 1), "data_stats": stats, "plan": plan, "search_metric": study["metric"],
           "candidates": candidates, "best_params": study["best_params"], "final_run": summary.get("run_dir"),
           "baselines": summary.get("baselines"), "before": _scalars(summary.get("before")),
           "after": _scalars(summary.get("after")), "verdict": summary.get("verdict")}
    atomic_write_json(root / "auto.json", out)
    rows = "\n".join(f"| {c['number']} | {c['state']} | {_fmt(c['value'])} | "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in c["params"].items()) + " |" for c in candidates)
    candidates_md = (f"| trial | state | {study['metric']} | settings |\n|---|---|---|---|\n{rows}" if candidates
                     else "None: the budget paid for no search (see above).")
    table = comparison_table(summary.get("before") or {}, summary.get("after") or {}, 0, summary.get("baselines"),
                             summary.get("verdict"))
    atomic_write_text(root / "auto.md", f"""# lmtailor auto: {data}

{detected} records -> objective **{objective}**; {elapsed:.0f} s of a {budget:.0f} s budget.

A step takes {plan['step_s']:.2f} s here ({plan['per_epoch']} steps per epoch): {plan['reason']}.
Chosen from the data: {'; '.join(plan['chosen_from_data']) or 'nothing (the recipe set every value)'}.

## Candidates (dev split of the training data; {study['metric']})

{candidates_md}

## Final run on the test split ({out['final_run']})

```
{table}
```
""")
    print(f"\nauto: {len(candidates)} candidates; "
          + (f"best {study['best_params']}" if candidates else "no search: the data-fitted defaults")
          + f"; report {root / 'auto.md'}")
    return out


def _scalars(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
