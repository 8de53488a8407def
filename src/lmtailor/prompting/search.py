"""Automatic prompt search on a dev set: candidates, successive halving, a budget in model calls.

Candidates cross instruction wordings (the task's templates plus paraphrases the model writes itself), example
selection strategies, numbers of shots and example orders. Successive halving scores every candidate on a small
dev subset, keeps the best 1/eta, and grows the subset by eta for the survivors until one is left, which is then
scored on the whole dev set. Subsets are prefixes of one seeded permutation of the dev set, so a survivor's
earlier scores are reused from the score cache. A model call is one prompt the model runs (one dev example under
one candidate, or one paraphrase); the search never starts an evaluation that would exceed the budget.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmtailor.prompting.predict import PromptSpec, parse_answer
from lmtailor.prompting.task import PromptTask, check_template

# Requests for instruction variants; greedy decoding of each gives one deterministic, cacheable paraphrase.
PARAPHRASE_ASKS = (
    "Rewrite the following instruction in different words, keeping its meaning. Reply with the new instruction "
    "only.",
    "Rewrite the following instruction so that it is shorter and simpler. Reply with the new instruction only.",
    "Rewrite the following instruction so that it is more precise and explicit. Reply with the new instruction "
    "only.",
    "Rewrite the following instruction as a question. Reply with the new instruction only.",
)
_JINJA = re.compile(r"\{\{|\{%")


@dataclass
class Candidate:
    id: int
    spec: PromptSpec
    origin: str  # where the instruction came from: "template 0", "paraphrase 1 of template 0"
    scores: dict[int, float] = field(default_factory=dict)  # dev examples -> score on that prefix
    dropped_at: int | None = None  # round in which it was eliminated (None: survived / never run)

    @property
    def best_score(self) -> float:
        return self.scores[max(self.scores)] if self.scores else float("nan")

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "origin": self.origin, "k": self.spec.k, "strategy": self.spec.strategy if
                self.spec.k else "-", "order": self.spec.order if self.spec.k else "-",
                "calibrate": self.spec.calibrate, "rounds": len(self.scores),
                "examples": max(self.scores) if self.scores else 0, "score": self.best_score,
                "dropped_at": self.dropped_at, "scores": {str(n): v for n, v in sorted(self.scores.items())},
                "template": self.spec.template}


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    calls: int
    budget: int
    rounds: list[tuple[int, int]]  # (candidates, dev examples) per round actually run
    stopped_by_budget: bool = False

    def table(self) -> list[dict[str, Any]]:
        return sorted((c.row() for c in self.candidates),
                      key=lambda r: (-r["examples"], -(r["score"] if r["score"] == r["score"] else -1e9), r["id"]))


def instruction_blocks(template: str) -> list[tuple[int, int]]:
    """(start, end) line ranges of the template that hold no Jinja: the instruction wording to paraphrase."""
    lines = template.split("\n")
    blocks, start = [], None
    for i, line in enumerate([*lines, "{{"]):
        plain = not _JINJA.search(line) and line.strip() != ""
        if plain and start is None:
            start = i
        elif not plain and start is not None:
            blocks.append((start, i))
            start = None
    return blocks


def _clean_paraphrase(text: str, original: str) -> str | None:
    new = parse_answer(text) if "```" in text else " ".join(text.strip().strip("\"'`").split())
    new = re.sub(r"^(new instruction|instruction|rewritten instruction)\s*:\s*", "", new, flags=re.I).strip()
    if not new or _JINJA.search(new) or new.lower() == " ".join(original.split()).lower():
        return None
    if len(new) > 3 * len(original) + 40:
        return None
    return new


def paraphrase_templates(task: PromptTask, generate: Callable[[list[list[dict[str, str]]]], list[str]], n: int
                         ) -> list[tuple[str, str]]:
    """Instruction variants written by the model: each plain-text block of each template is rewritten, lines with
    template fields are kept verbatim, so every variant still uses the task's inputs.

    Returns:
        [(template, origin)] of the valid, new variants.
    """
    out: list[tuple[str, str]] = []
    seen = set(task.templates)
    for t_index, template in enumerate(task.templates):
        blocks = instruction_blocks(template)
        if not blocks:
            continue
        lines = template.split("\n")
        for p in range(min(n, len(PARAPHRASE_ASKS))):
            asks = [[{"role": "user", "content": f"{PARAPHRASE_ASKS[p]}\n\nInstruction: "
                      + " ".join(" ".join(lines[a:b]).split())}] for a, b in blocks]
            texts = generate(asks)
            new_lines = list(lines)
            ok = True
            for (a, b), text in sorted(zip(blocks, texts, strict=True), reverse=True):
                new = _clean_paraphrase(text, " ".join(lines[a:b]))
                if new is None:
                    ok = False
                    break
                new_lines[a:b] = [new]
            candidate = "\n".join(new_lines)
            if ok and candidate not in seen:
                try:
                    check_template(candidate, task.inputs, "paraphrase")
                except ValueError:
                    continue
                seen.add(candidate)
                out.append((candidate, f"paraphrase {p + 1} of template {t_index}"))
    return out


def make_candidates(task: PromptTask, templates: list[tuple[str, str]]) -> list[Candidate]:
    """Every (instruction, shots, strategy, order) combination; zero-shot prompts do not vary strategy or order.
    Candidate 0 is the task's first template zero-shot, the baseline every search reports."""
    s = task.search
    strategies = [x for x in s.strategies if task.is_classification or x != "balanced"]
    calibrations = (s.calibrate or [task.calibrate]) if task.is_classification else [False]
    specs: list[tuple[PromptSpec, str]] = []
    for template, origin in templates:
        for cal in calibrations:
            for k in sorted(set(s.shots)):
                if k == 0:
                    specs.append((PromptSpec(template, 0, "random", "selected", cal), origin))
                    continue
                for strategy in strategies:
                    for order in s.orders:
                        specs.append((PromptSpec(template, k, strategy, order, cal), origin))
    out: list[Candidate] = []
    seen: set[PromptSpec] = set()
    for spec, origin in specs:
        if spec not in seen:
            seen.add(spec)
            out.append(Candidate(len(out), spec, origin))
    return out


def halving_rounds(n: int, dev: int, first: int, eta: int) -> list[tuple[int, int]]:
    """(candidates, examples) per round: all on `first` examples, then the best 1/eta on eta times as many, until
    one is left, which is scored on the whole dev set."""
    rounds = []
    k, r = n, min(first, dev)
    while True:
        if k == 1:
            r = dev
        rounds.append((k, r))
        if k == 1 or (r == dev and k <= eta):
            if k > 1:
                rounds.append((1, dev))  # the winner of the last full-set round needs no new calls
            return rounds
        k, r = max(1, math.ceil(k / eta)), min(r * eta, dev)


def rounds_cost(rounds: list[tuple[int, int]]) -> int:
    """Model calls of a schedule when earlier examples come from the cache (nested subsets)."""
    cost, prev = 0, 0
    for k, r in rounds:
        cost += k * max(0, r - prev)
        prev = r
    return cost


def fit_schedule(n: int, dev: int, first: int, eta: int, budget: int, per_example: float = 1.0
                 ) -> tuple[int, int, list[tuple[int, int]]]:
    """The most candidates whose schedule fits the budget while the winner is still scored on a sizeable dev set
    (at least eta x `first` examples, or all of them); with a smaller budget, fewer examples. Returns
    (candidates, dev examples, rounds)."""
    sizes = sorted({dev, *[dev // 2 ** i for i in range(1, 10)]} - {0}, reverse=True)
    floor = min(dev, eta * first)

    def fits(m: int, d: int) -> list[tuple[int, int]] | None:
        rounds = halving_rounds(m, d, min(first, d), eta)
        return rounds if rounds_cost(rounds) * per_example <= budget else None

    for m in range(n, 1, -1):
        for d in (x for x in sizes if x >= floor):
            rounds = fits(m, d)
            if rounds:
                return m, d, rounds
    for d in sizes:
        for m in range(n, 0, -1):
            rounds = fits(m, d)
            if rounds:
                return m, d, rounds
    return 1, 1, [(1, 1)]


def successive_halving(candidates: list[Candidate], evaluate: Callable[[PromptSpec, int], tuple[float, int]],
                       dev_size: int, budget: int, first: int = 16, eta: int = 3, seed: int = 0,
                       calls_so_far: int = 0, per_example: float | None = None,
                       progress: Callable[[str], None] | None = None) -> SearchResult:
    """Run successive halving within `budget` model calls.

    Args:
        candidates: in priority order; when the budget cannot cover all of them, candidate 0 is kept and the rest
            are sampled (seeded).
        evaluate: (spec, n) -> (score on the first n dev examples, model calls it made).
        dev_size: dev examples available.
        per_example: model calls one dev example costs a candidate, for planning (default: 2 for calibrated
            candidates, else 1, averaged). An evaluation is only started if its worst case fits the budget.
        calls_so_far: calls already spent (paraphrases), counted against the budget.

    Returns:
        The best candidate (scored on the largest subset it reached), all candidates with their scores, and the
        calls spent; `stopped_by_budget` if an evaluation was skipped to stay within it.
    """
    left = budget - calls_so_far
    if per_example is None:
        per_example = sum(2 if c.spec.calibrate else 1 for c in candidates) / max(len(candidates), 1)
    m, dev, rounds = fit_schedule(len(candidates), dev_size, first, eta, max(left, 0), per_example)
    pool = list(candidates)
    if m < len(pool):
        rest = pool[1:]
        random.Random(seed).shuffle(rest)
        pool = [pool[0], *sorted(rest[: m - 1], key=lambda c: c.id)]
    calls = calls_so_far
    alive = pool
    ran: list[tuple[int, int]] = []
    stopped = False
    for index, (keep, n_examples) in enumerate(rounds):
        alive = sorted(alive, key=lambda c: (-_score_at(c), c.id))[:keep] if index else alive
        if index:
            for c in pool:
                if c.dropped_at is None and c not in alive:
                    c.dropped_at = index
        for c in alive:
            if n_examples in c.scores:
                continue
            # an upper bound: calibration may score one content-free prompt per example as well
            need = math.ceil((n_examples - max(c.scores, default=0)) * (2 if c.spec.calibrate else 1))
            if calls + need > budget:
                stopped = True
                continue
            score, used = evaluate(c.spec, n_examples)
            c.scores[n_examples] = score
            calls += used
            if progress:
                progress(f"round {index + 1}/{len(rounds)}: candidate {c.id} ({c.origin}, {c.spec.k}-shot"
                         f"{' ' + c.spec.strategy if c.spec.k else ''}) = {score:.4f} on {n_examples} examples")
        ran.append((len(alive), n_examples))
        if len(alive) == 1:
            break
    scored = [c for c in pool if c.scores]
    best = max(scored, key=lambda c: (max(c.scores), _score_at(c), -c.id)) if scored else pool[0]
    return SearchResult(best, candidates, calls, budget, ran, stopped)


def _score_at(c: Candidate) -> float:
    s = c.scores.get(max(c.scores, default=0), float("-inf"))
    return s if s == s else float("-inf")
