"""Degenerate repetition in greedy answers, and the decoding rule that stops it (GenerationSettings.stop_repeats).

For each model (default: the bundled smollm2-135m-instruct and a LoRA run of configs/quickstart.yaml cut to 60
steps, if its folder exists), greedy answers (max_new_tokens 48, batch 12, as the quickstart recipe evaluates) to the 60
shell questions that recipe holds out (data.val_size=60, split_seed=0), under five settings:

- none: plain greedy decoding;
- stop_repeats=3: the repetition stop of lmtailor.generate (the default);
- repetition_penalty=1.1 and 1.2 (HF's penalty on every token already in the prompt or the answer);
- no_repeat_ngram_size=3 (HF's ban on repeating any 3-gram).

Per setting: the share of looping answers (`lmtailor.metrics.looping`), chrF and exact match against the
references, the same two on the answers that do not loop without a rule ("clean" answers), how many clean
answers the setting changed, answer tokens decoded (EOS not counted) and decode seconds (one torch thread).
A setting that only stops loops leaves every clean answer as it is.

Then other parameters of the stop rule (copies in a row x token floor), computed from the no-rule tokens: greedy
tokens up to the stop are the tokens decoded without it, so the cut is what a live stop returns (the live
stop_repeats=3 run checks this).

    lmtailor train configs/quickstart.yaml max_steps=60 output_dir=/tmp/loop-run3 eval.before_after=false
    python benchmarks/looping.py [--runs smollm2-135m-instruct,/tmp/loop-run3] [--n 60] [--tokens 48]

Writes benchmarks/results/looping.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lmtailor.generate as G  # noqa: E402
from lmtailor.config import GenerationSettings, load_config  # noqa: E402
from lmtailor.data.validate import load_datasets  # noqa: E402
from lmtailor.metrics import chrf, exact_match, looping, looping_share  # noqa: E402
from lmtailor.render import prompt_ids, prompt_messages  # noqa: E402
from lmtailor.runs import Run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "looping.json"
# name -> (GenerationSettings fields, extra HF generate arguments)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({"stop_repeats": 0}, {}),
    "stop_repeats=3": ({"stop_repeats": 3}, {}),
    "repetition_penalty=1.1": ({"stop_repeats": 0, "repetition_penalty": 1.1}, {}),
    "repetition_penalty=1.2": ({"stop_repeats": 0, "repetition_penalty": 1.2}, {}),
    "no_repeat_ngram_size=3": ({"stop_repeats": 0}, {"no_repeat_ngram_size": 3}),
}
VARIANTS = [(copies, floor) for copies in (2, 3, 4) for floor in (6, 8, 12, 16)]  # the stop rule's parameters


class Recorder:
    """A model whose `generate` adds fixed arguments and records each row's answer tokens, keyed by prompt."""

    def __init__(self, model: Any, **extra: Any) -> None:
        self.model, self.extra = model, extra
        self.answers: dict[tuple[int, ...], list[int]] = {}

    def parameters(self) -> Any:
        return self.model.parameters()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **self.extra)
        width = input_ids.shape[1]
        for r in range(len(out)):
            prompt = tuple(input_ids[r][attention_mask[r].bool()].tolist())
            self.answers[prompt] = out[r, width:].tolist()
        return out


def held_out(n: int) -> tuple[list[list[dict[str, str]]], list[str]]:
    """The first n chats of the quickstart recipe's held-out split, as (prompts, references)."""
    _, val, _ = load_datasets(load_config(ROOT / "configs" / "quickstart.yaml").data)
    pairs = [prompt_messages(ex) for ex in val if ex.messages is not None][:n]
    return [p for p, _ in pairs], [r for _, r in pairs]


def answer(ids: list[int], ends: set[int]) -> list[int]:
    """A row's answer tokens: before its EOS, or before the padding after a stop (SmolLM2 pads with EOS)."""
    return next((ids[:k] for k, t in enumerate(ids) if t in ends), ids)


def score(preds: list[str], refs: list[str], clean: list[int], base: list[str] | None,
          questions: list[str]) -> dict[str, Any]:
    kept = [preds[i] for i in clean]
    kept_refs = [refs[i] for i in clean]
    changed = [] if base is None else [i for i in clean if preds[i] != base[i]]
    return {
        "looping_share": looping_share(preds),
        "chrf": chrf(preds, refs),
        "exact_match": exact_match(preds, refs),
        "clean_chrf": chrf(kept, kept_refs),
        "clean_exact_match": exact_match(kept, kept_refs),
        "clean_changed": None if base is None else len(changed),
        # what the setting did to answers that did not loop (a few)
        "clean_changed_samples": [{"question": questions[i], "reference": kept_refs[clean.index(i)],
                                   "none": base[i], "this": preds[i]} for i in changed[:4]] if base else [],
    }


def cut_variant(ans: list[int], copies: int, floor: int) -> tuple[list[int], int]:
    """(kept answer tokens, answer tokens decoded) under the stop rule with these parameters, from no-rule
    answer tokens."""
    saved = G.LOOP_MIN_TOKENS
    G.LOOP_MIN_TOKENS = floor
    try:
        end = next((k for k in range(1, len(ans) + 1) if G.ends_in_loop(ans[:k], copies)), len(ans))
        return ans[:G.loop_cut(ans[:end], copies)], end
    finally:
        G.LOOP_MIN_TOKENS = saved


def measure(target: str, prompts: list[list[dict[str, str]]], refs: list[str], tokens: int) -> dict[str, Any]:
    run = Run.open(target)
    model, tok = run.load()
    model.eval()
    keys = [tuple(prompt_ids(tok, G.as_messages(p, run.system_prompt))) for p in prompts]
    ends = {tok.eos_token_id, tok.pad_token_id}
    questions = [p[-1]["content"] for p in prompts]
    result: dict[str, Any] = {"target": run.name, "settings": {}, "samples": [],
                              "load_average_before": round(os.getloadavg()[0], 2)}
    texts: dict[str, list[str]] = {}
    answer_ids: dict[str, list[list[int]]] = {}
    for name, (fields, extra) in SETTINGS.items():
        settings = GenerationSettings(max_new_tokens=tokens, batch_size=12, **fields)
        rec = Recorder(model, **extra)
        start = time.perf_counter()
        preds = G.generate(rec, tok, prompts, settings, system=run.system_prompt)
        seconds = time.perf_counter() - start
        texts[name] = preds
        answer_ids[name] = [answer(rec.answers[k], ends) for k in keys]
        clean = [i for i, p in enumerate(texts["none"]) if not looping(p)]
        row = score(preds, refs, clean, None if name == "none" else texts["none"], questions)
        row.update(tokens_decoded=sum(len(a) for a in answer_ids[name]), seconds=round(seconds, 1))
        result["settings"][name] = row
        print(f"  {run.name} {name}: {json.dumps({k: v for k, v in row.items() if 'samples' not in k})}", flush=True)
    clean = [i for i, p in enumerate(texts["none"]) if not looping(p)]
    result["clean_answers"] = len(clean)
    result["looping_answers_without_rule"] = len(prompts) - len(clean)
    # The live stop returns exactly the cut of the no-rule tokens (greedy: nothing before the stop changes).
    cuts = [cut_variant(a, 3, G.LOOP_MIN_TOKENS) for a in answer_ids["none"]]
    result["live_stop_equals_cut_of_no_rule_tokens"] = (
        [tok.decode(k, skip_special_tokens=True).strip() for k, _ in cuts] == texts["stop_repeats=3"]
        and [n for _, n in cuts] == [len(a) for a in answer_ids["stop_repeats=3"]])
    variants = {}
    for copies, floor in VARIANTS:
        cut = [cut_variant(a, copies, floor) for a in answer_ids["none"]]
        preds = [tok.decode(k, skip_special_tokens=True).strip() for k, _ in cut]
        row = score(preds, refs, clean, texts["none"], questions)
        row["tokens_decoded"] = sum(n for _, n in cut)
        variants[f"copies={copies},min_tokens={floor}"] = row
    result["stop_rule_variants"] = variants
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    for i, p in enumerate(texts["none"]):
        if looping(p) and len(result["samples"]) < 6:
            result["samples"].append({"question": prompts[i][-1]["content"], "reference": refs[i],
                                      **{name: texts[name][i] for name in SETTINGS}})
    return result


def table(result: dict[str, Any]) -> str:
    head = (f"{'setting':<32} {'loop%':>6} {'chrF':>6} {'EM%':>6} {'cleanchrF':>9} {'cleanEM%':>8} "
            f"{'changed':>7} {'tokens':>6} {'s':>6}")
    lines = [head, "-" * len(head)]
    rows = [*result["settings"].items(), *result["stop_rule_variants"].items()]
    for name, r in rows:
        changed = "" if r["clean_changed"] is None else str(r["clean_changed"])
        lines.append(f"{name:<32} {100 * r['looping_share']:>6.1f} {r['chrf']:>6.1f} {100 * r['exact_match']:>6.1f} "
                     f"{r['clean_chrf']:>9.1f} {100 * r['clean_exact_match']:>8.1f} {changed:>7} "
                     f"{r['tokens_decoded']:>6} {r.get('seconds', ''):>6}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="smollm2-135m-instruct,/tmp/loop-run3")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine; every setting runs under the same conditions
    prompts, refs = held_out(a.n)
    results = []
    for target in a.runs.split(","):
        if not target or (("/" in target) and not Path(target).exists()):
            print(f"skipping {target}: no such run folder")
            continue
        results.append(measure(target, prompts, refs, a.tokens))
        print(table(results[-1]), flush=True)
    # Results of targets not measured this time are kept.
    earlier = json.loads(OUT.read_text())["results"] if OUT.exists() else []
    done = {r["target"] for r in results}
    results = [r for r in earlier if r["target"] not in done] + results
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread",
        "questions": len(prompts), "max_new_tokens": a.tokens, "batch_size": 12,
        "rule": {"max_ngram_tokens": G.LOOP_MAX_NGRAM, "min_tokens": G.LOOP_MIN_TOKENS},
        "results": results}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
