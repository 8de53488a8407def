"""SFT vs SFT then DPO vs SFT then GRPO with the discriminator reward, on the quickstart's 60 held-out shell questions.

Three systems, each scored by the same evaluation (`lmtailor.evaluate.evaluate_run`: greedy answers to the held-out
questions, each shown its nearest training pair as the quickstart trains; exact match after
lmtailor.metrics.normalize_answer, chrF, the share of looping answers, mean answer length in characters):

    SFT            configs/quickstart.yaml (pass an existing run with --quickstart, or it is trained here)
    SFT then DPO   the quickstart merged, `pairs make` (chosen = the reference, rejected = the SFT run's own answer
                   to the training questions; the 60 held-out ones are skipped), configs/dpo-shell.yaml
    SFT then GRPO  the quickstart merged, configs/adversarial-shell.yaml (a judge trained alongside on references
                   vs the policy's samples; its P(real) plus a stop bonus is the reward)

Every step goes through the command line a user types; the training curves of both tuning runs are copied beside
the results.

    python benchmarks/preference_demo.py --quickstart runs/quickstart --work /tmp/pref-demo
    python benchmarks/preference_demo.py --quickstart runs/quickstart --work /tmp/pref-demo --reuse-pairs  # again
    python benchmarks/preference_demo.py --budget 20s --limit 4 --pairs-limit 16 --work /tmp/pref-smoke   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import held_out_questions

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "preference_demo.json"


def lmtailor(*args: str) -> float:
    """Run one lmtailor command as a user would; its seconds."""
    print("$ lmtailor " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmtailor", *args], check=True, cwd=ROOT)
    return round(time.perf_counter() - t0, 1)


def scores(target: Path, data: Path, settings: Any) -> dict[str, Any]:
    """Greedy answers of a run to the held-out chats, with the same decoding settings for every run (a DPO or GRPO
    run's own evaluation reads pairs or prompts, so the answers are scored here, with lmtailor.metrics)."""
    from lmtailor.data.validate import load_examples
    from lmtailor.generate import generate
    from lmtailor.metrics import chrf, exact_match, looping_share
    from lmtailor.render import prompt_messages
    from lmtailor.runs import Run

    t0 = time.perf_counter()
    run = Run.open(str(target))
    model, tok = run.load()
    examples = load_examples(str(data), "chat", system_prompt=run.system_prompt)
    prompts, refs = zip(*(prompt_messages(ex) for ex in examples), strict=True)
    preds = generate(model, tok, list(prompts), settings, progress=True, desc=f"{target.name} answers")
    return {"exact_match": round(exact_match(preds, refs), 3), "chrf": round(chrf(preds, refs), 1),
            "looping": round(looping_share(preds), 3),
            "mean_answer_chars": round(sum(map(len, preds)) / max(len(preds), 1), 1),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "samples": [{"reference": r, "prediction": y} for r, y in list(zip(refs, preds, strict=True))[:5]]}


def run_summary(run: Path) -> dict[str, Any]:
    """What a tuning run logged: steps, its own before/after on its validation set, last per-step values."""
    metrics = json.loads((run / "metrics.json").read_text())
    keep = ("steps", "train_seconds", "before", "after")
    out = {k: metrics[k] for k in keep if k in metrics}
    for section in ("before", "after"):
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != "samples"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", type=Path, default=None, help="an existing configs/quickstart.yaml run")
    p.add_argument("--budget", default=None,
                   help="each run's budget (default: the recipes' own; the DPO and GRPO recipes' 14m cover the run)")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out questions (smoke runs)")
    p.add_argument("--pairs-limit", type=int, default=None, help="answer only N training questions (smoke runs)")
    p.add_argument("--work", type=Path, required=True, help="folder for the runs")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--evaluate-only", action="store_true", help="reuse the runs already in --work")
    p.add_argument("--reuse-pairs", action="store_true",
                   help="keep the merged quickstart and pairs.jsonl already in --work (made from the same --quickstart"
                        " run); train and evaluate DPO and GRPO only")
    a = p.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    budget = [f"budget={a.budget}"] if a.budget else []
    seconds: dict[str, float] = {}
    sft = a.quickstart.resolve() if a.quickstart else work / "quickstart"
    merged, pairs, dpo, grpo = work / "quickstart-merged", work / "pairs.jsonl", work / "dpo", work / "grpo"
    reuse = a.reuse_pairs and merged.is_dir() and pairs.is_file()
    if not a.evaluate_only:
        if not a.quickstart:
            seconds["sft"] = lmtailor("train", "configs/quickstart.yaml", f"output_dir={sft}", "overwrite=true",
                                      *budget)
        if reuse:
            print(f"reusing {merged} and {pairs}", flush=True)
        else:
            seconds["export merged"] = lmtailor("export", str(sft), "--format", "merged", "--out", str(merged),
                                                "--force")
            limit = ["--limit", str(a.pairs_limit)] if a.pairs_limit else []
            seconds["pairs make"] = lmtailor("pairs", "make", str(sft), "--data", "catalog:shell-commands", "--out",
                                             str(pairs), "--max-new-tokens", "48", "--batch-size", "16", "--force",
                                             *limit)
        seconds["dpo"] = lmtailor("train", "configs/dpo-shell.yaml", f"base_model={merged}", f"data.path={pairs}",
                                  f"output_dir={dpo}", "overwrite=true", *budget)
        seconds["grpo"] = lmtailor("train", "configs/adversarial-shell.yaml", f"base_model={merged}",
                                   f"output_dir={grpo}", "overwrite=true", *budget)
    if a.evaluate_only and a.out.is_file():  # the runs' times from the benchmark run that trained them
        earlier = json.loads(a.out.read_text())
        seconds, reuse = earlier.get("step_seconds", {}), earlier.get("reused_pairs", reuse)
    n_pairs = sum(1 for _ in pairs.open())
    from lmtailor.evaluate import run_recipe
    from lmtailor.runs import Run

    settings = run_recipe(Run.open(str(sft))).generation  # the quickstart's decoding, for all three
    data, held = held_out_questions(work, a.limit, nearest=True)
    n = len(held)
    # the merged quickstart is where DPO and GRPO start: merging the adapter into the weights rounds them, and
    # greedy answers can flip on that alone, so it is scored too
    systems = {"SFT (quickstart)": scores(sft, data, settings),
               "SFT merged (the start of DPO and GRPO)": scores(merged, data, settings),
               "SFT then DPO": scores(dpo, data, settings),
               "SFT then GRPO + discriminator": scores(grpo, data, settings)}
    for name, row in systems.items():
        print(f"{name:32} exact match {row['exact_match']:.1%}  chrF {row['chrf']:5.1f}  looping "
              f"{row['looping']:.1%}  mean length {row['mean_answer_chars']:.0f} chars", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name, run in (("dpo", dpo), ("grpo", grpo)):
        curves = run / "training_curves.png"
        if curves.exists():
            shutil.copyfile(curves, a.out.with_name(f"preference_demo_{name}_curves.png"))
    import torch

    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps({
        "benchmark": "preference_demo", "questions": n, "pairs": n_pairs, "budget": a.budget or "the recipes' own",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "generation": settings.model_dump(), "systems": systems,
        "runs": {"dpo": run_summary(dpo), "grpo": run_summary(grpo)},
        "step_seconds": seconds, "reused_pairs": reuse}, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, a.out)
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
