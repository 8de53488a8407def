"""Closed book vs open book on the 60 held-out shell questions, with the `cheat` sheets as the knowledge base.

Four systems answer the quickstart's held-out split (catalog:shell-commands, val_size 60, split_seed 0), scored by
the same evaluation (`lmtailor eval` / a run's "after" figures: greedy answers, exact match after
lmtailor.metrics.normalize_answer, chrF):

    base closed-book     smollm2-135m-instruct, the bare question
    quickstart LoRA      configs/quickstart.yaml trained for --budget (its prompts show the nearest training pair)
    base open-book       smollm2-135m-instruct, 3 passages of the knowledge base before the question
    RAG LoRA open-book   configs/rag-shell.yaml trained for --budget with passages in every example (RAFT)

and retrieval recall@5 of BM25, dense and hybrid ranking: is a sheet line holding the reference command among the 5
best passages for the question? The knowledge base holds every sheet, the held-out answers included: this measures
using documentation, not recalling it.

    python benchmarks/kb_demo.py                               # each step at most ~15 minutes on 2 CPU cores
    python benchmarks/kb_demo.py --quickstart runs/quickstart   # reuse a quickstart run for its closed-book row
    python benchmarks/kb_demo.py --budget 20s --limit 4 --embedder none    # smoke run (minutes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import held_out_questions

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "kb_demo.json"
BASE = "smollm2-135m-instruct"


def step(name: str, rows: dict[str, Any]) -> Any:
    """Time a step: `with step(...)` records its wall-clock seconds under rows[name]."""

    class _Step:
        def __enter__(self) -> None:
            print(f"== {name}", flush=True)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc: Any) -> None:
            rows[name] = round(time.perf_counter() - self.t0, 1)
            print(f"   {name}: {rows[name]:.0f} s", flush=True)

    return _Step()


def reference_pairs(examples: list[Any]) -> list[tuple[str, str]]:
    """(question, reference command) of each held-out chat."""
    from lmtailor.data.retrieve import query

    return [(query(ex), next(m["content"] for m in reversed(ex.messages or []) if m["role"] == "assistant"))
            for ex in examples]


def retrieval_recall(kb_dir: Path, pairs: list[tuple[str, str]], k: int = 5) -> dict[str, float]:
    """Share of questions whose reference command (whitespace collapsed) is inside one of the k best passages."""
    from lmtailor.knowledge.base import KnowledgeBase

    kb = KnowledgeBase.open(kb_dir)
    modes = ("bm25", "dense", "hybrid") if kb.vectors is not None else ("bm25",)
    out = {}
    for mode in modes:
        found = 0
        for question, ref in pairs:
            flat = " ".join(ref.split())
            found += any(flat in " ".join(h.chunk.text.split()) for h in kb.search(question, k, mode))
        out[f"{mode}_recall@{k}"] = round(found / len(pairs), 3)
    return out


def scores(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"exact_match": round(float(metrics["exact_match"]), 3), "chrf": round(float(metrics["chrf"]), 1),
            "looping": metrics.get("looping")}


def train_run(recipe: str, overrides: list[str]) -> dict[str, Any]:
    from lmtailor.config import load_config
    from lmtailor.train import train

    summary = train(load_config(str(ROOT / "configs" / recipe), overrides), progress=False)
    return {**scores(summary["after"]), "steps": summary["steps"],
            "train_seconds": round(summary["train_seconds"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="11m", help="training time of each LoRA run (the recipes' own: 11m)")
    p.add_argument("--steps", type=int, default=None,
                   help="train each LoRA run for exactly this many steps instead of --budget (equal work on a shared "
                        "machine: the quickstart's own run took 97)")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out questions (smoke runs)")
    p.add_argument("--embedder", default="all-minilm-l6-v2", help="none: a BM25-only base (smoke runs)")
    p.add_argument("--quickstart", type=Path, default=None,
                   help="an existing configs/quickstart.yaml run: its own held-out figures, instead of training one")
    p.add_argument("--work", type=Path, default=None, help="folder for the base and the runs (default: a temp one)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    from lmtailor.evaluate import evaluate_run
    from lmtailor.knowledge.base import build_kb

    work = a.work or Path(tempfile.mkdtemp(prefix="lmtailor-kb-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    systems: dict[str, dict[str, Any]] = {}
    kb = work / "kb"
    with step("build knowledge base", seconds):  # as configs/rag-shell.yaml says
        print(build_kb(["catalog:cheat-sheets"], kb, None if a.embedder == "none" else a.embedder,
                       max_tokens=80, overlap=16, progress=False))
    data, examples = held_out_questions(work, a.limit)
    pairs = reference_pairs(examples)
    n = len(pairs)
    recall = retrieval_recall(kb, pairs)
    print(f"   {n} held-out questions; retrieval {recall}", flush=True)
    length = [f"max_steps={a.steps}", "budget=null"] if a.steps else [f"budget={a.budget}"]
    common = [f"eval.generate_examples={n}", *length, "overwrite=true", "eval.before_after=false"]
    with step("base closed-book", seconds):
        systems["base closed-book"] = scores(evaluate_run(BASE, str(data), n_generate=n))
    with step("base open-book", seconds):
        systems["base open-book"] = scores(evaluate_run(BASE, str(data), n_generate=n, kb=str(kb)))
    if a.quickstart and not a.limit:  # the run's own "after": the same 60 questions, each with its nearest pair
        summary = json.loads((a.quickstart / "metrics.json").read_text())
        systems["quickstart LoRA closed-book"] = {**scores(summary["after"]), "steps": summary["steps"],
                                                  "train_seconds": round(summary["train_seconds"], 1),
                                                  "run": str(a.quickstart)}
    else:
        with step("quickstart LoRA closed-book", seconds):
            systems["quickstart LoRA closed-book"] = train_run("quickstart.yaml", [
                *common, "name=kb-demo-quickstart", f"output_dir={work / 'quickstart'}"])
    with step("RAG LoRA open-book", seconds):
        systems["RAG LoRA open-book"] = train_run("rag-shell.yaml", [
            *common, "name=kb-demo-rag", f"output_dir={work / 'rag'}", f"retrieval.kb={kb}"])
    for name, row in systems.items():
        print(f"{name:30} exact match {row['exact_match']:.1%}  chrF {row['chrf']:.1f}")
    import torch

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "kb_demo", "questions": n, "budget": a.budget, "embedder": a.embedder,
        "steps": a.steps, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "note": "shared with other jobs: quality figures, not speed"},
        "knowledge_base": "catalog:cheat-sheets (every sheet, the held-out answers included), 80-token chunks",
        "retrieval": recall, "systems": systems, "step_seconds": seconds}, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
