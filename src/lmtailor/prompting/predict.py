"""Answer task items with a prompt: build each prompt, score it, turn scores into predictions and a metric.

Labeled tasks choose the label whose verbalizer words the model finds most likely (optionally calibrated against
a content-free input); free-text tasks generate greedily and parse the answer with `parse_answer`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lmtailor.prompting.fewshot import Selector, fit_demos, make_selector
from lmtailor.prompting.scoring import Scorer, normalize_label_scores
from lmtailor.prompting.task import Item, PromptTask, build_messages, content_free_item
from lmtailor.render import prompt_ids

_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.S)


def parse_answer(text: str) -> str:
    """The answer in a free-text generation, by one documented rule.

    1. If the text contains a fenced code block (```), the answer is the inside of the first one.
    2. Otherwise it is the first non-empty line.
    3. Surrounding whitespace, quotes and backticks are removed, and a leading "Answer:" / "Output:" label.
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else next((line for line in text.splitlines() if line.strip()), "")
    body = body.strip()
    body = re.sub(r"^(answer|output|command|response)\s*:\s*", "", body, flags=re.I)
    return body.strip().strip("`\"'").strip()


@dataclass(frozen=True)
class PromptSpec:
    """One concrete prompt design: which instruction, how many examples, chosen how, in which order."""

    template: str
    k: int = 0
    strategy: str = "random"
    order: str = "selected"
    calibrate: bool = False
    name: str = ""
    retrieval: str = ""  # open book: the RetrievalSettings JSON whose passages go into the query's turn; "": closed

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def task_spec(task: PromptTask, template_index: int = 0, shots: bool = True, name: str = "") -> PromptSpec:
    """The prompt a task file describes: its template, and its few_shot settings (or none)."""
    fs = task.few_shot
    return PromptSpec(task.templates[template_index], fs.k if shots else 0, fs.strategy, fs.order,
                      task.calibrate, name)


@dataclass
class Predictions:
    predictions: list[str]
    references: list[str]
    scores: list[list[float]] = field(default_factory=list)  # labeled: per item, per label log-probabilities
    prompt_tokens: float = 0.0  # mean prompt length


class PromptRunner:
    """Scores prompt designs for one task and model, with a fixed few-shot pool."""

    def __init__(self, task: PromptTask, scorer: Scorer, pool: list[Item]) -> None:
        self.task, self.scorer, self.pool = task, scorer, pool
        self._selectors: dict[tuple[str, int], Selector] = {}
        self._books: dict[str, Any] = {}

    def selector(self, strategy: str) -> Selector:
        key = (strategy, self.task.few_shot.seed)
        if key not in self._selectors:
            self._selectors[key] = make_selector(strategy, self.pool, self.task, self.task.few_shot.seed)
        return self._selectors[key]

    def build(self, spec: PromptSpec, query: Item) -> tuple[list[Item], list[int]]:
        """The few-shot examples chosen for `query` (fitted to the token budget) and the prompt's token ids."""
        demos = []
        if spec.k > 0 and self.pool:
            demos = [self.pool[i] for i in self.selector(spec.strategy)(query, spec.k)]
        return fit_demos(self.task, spec.template, demos, query, self.scorer.tok, self.task.few_shot.max_tokens,
                         spec.order)

    def open_book(self, spec: PromptSpec, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation with the passages of spec.retrieval in its last user turn, placed as training and
        serving place them (lmtailor.knowledge.prompt)."""
        from lmtailor.config import RetrievalSettings
        from lmtailor.knowledge.prompt import KBRetrieval

        if spec.retrieval not in self._books:
            self._books[spec.retrieval] = KBRetrieval(RetrievalSettings.model_validate_json(spec.retrieval))
        out, _ = self._books[spec.retrieval].with_sources(messages)
        assert isinstance(out, list)
        return out

    def predict(self, spec: PromptSpec, items: list[Item]) -> Predictions:
        built = [self.build(spec, item) for item in items]
        if spec.retrieval:  # the few-shot examples stay as chosen; the query's turn gets its passages
            built = [(demos, prompt_ids(self.scorer.tok, self.open_book(
                spec, build_messages(self.task, spec.template, demos, item)))) for (demos, _), item in
                zip(built, items, strict=True)]
        refs = [item.reference(self.task) for item in items]
        mean_len = sum(len(ids) for _, ids in built) / max(len(built), 1)
        if self.task.output.labels is None:
            msgs = [build_messages(self.task, spec.template, demos, item) for (demos, _), item in
                    zip(built, items, strict=True)]
            if spec.retrieval:
                msgs = [self.open_book(spec, m) for m in msgs]
            texts = self.scorer.generate(msgs, self.task.max_new_tokens)
            return Predictions([parse_answer(t) for t in texts], refs, prompt_tokens=mean_len)
        names = self.task.label_names
        words = [self.task.output.labels[n] for n in names]
        scores = self.scorer.label_scores([ids for _, ids in built], words)
        if spec.calibrate:
            free = content_free_item(self.task)
            # the same examples, in the same order, before a content-free query
            cf_ids = [prompt_ids(self.scorer.tok, build_messages(self.task, spec.template, demos, free))
                      for demos, _ in built]
            cf = self.scorer.label_scores(cf_ids, words)
            scores = [[a - b for a, b in zip(normalize_label_scores(s), normalize_label_scores(c), strict=True)]
                      for s, c in zip(scores, cf, strict=True)]
        preds = [names[max(range(len(names)), key=row.__getitem__)] for row in scores]
        return Predictions(preds, refs, scores, mean_len)

    def evaluate(self, spec: PromptSpec, items: list[Item]) -> tuple[dict[str, Any], Predictions]:
        p = self.predict(spec, items)
        return metrics(self.task, p.predictions, p.references), p


def metrics(task: PromptTask, preds: list[str], refs: list[str]) -> dict[str, Any]:
    """Task metrics of predictions: accuracy, macro-F1, per class and confusion matrix; or BLEU/chrF/ROUGE/EM."""
    from lmtailor.metrics import classification_metrics, text_metrics

    if task.output.labels is None:
        return text_metrics(preds, refs)
    index = {n: i for i, n in enumerate(task.label_names)}
    return classification_metrics([index[r] for r in refs], [index[p] for p in preds], task.label_names)
