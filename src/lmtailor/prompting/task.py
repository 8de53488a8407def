"""Prompt task files: what the input fields are, what the output is, the instruction templates, the metric.

A task file is YAML validated like a run recipe (unknown keys are errors listing the allowed ones):

    name: sms-spam
    inputs: [text]                      # record fields the templates may use
    output:
      field: label                      # the record field holding the reference
      labels: {ham: [ham], spam: [spam]}  # label -> verbalizer words; leave out for a free-text output
    system: You are a careful assistant.
    templates:                          # Jinja; the first is the default
      - "Is this SMS spam or ham?\\n\\n{{ text }}\\n\\nAnswer spam or ham."
    metric: macro_f1
    few_shot: {k: 4, strategy: balanced, max_tokens: 1024}
    data: {path: catalog:sms-spam, format: labeled, val_fraction: 0.2}

A prompt is rendered as a conversation and tokenized by the one renderer training uses (render.prompt_ids):
[system] + for each few-shot example a user turn (the template on its fields) and an assistant turn (its answer)
+ a user turn for the query.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
from pydantic import Field, ValidationError, model_validator

from lmtailor.config import DataSettings, RetrievalSettings, Strict, explain, read_yaml
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError, DataError

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
TEXT_METRICS = ("exact_match", "chrf", "bleu", "rougeL")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


class OutputSpec(Strict):
    field: str = Field("label", description="record field holding the reference label or text")
    labels: dict[str, list[str]] | None = Field(
        None, description="classification: label -> verbalizer words (the first is used in few-shot answers); "
                          "leave out for a free-text output")

    @model_validator(mode="after")
    def _check(self) -> OutputSpec:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("output.labels needs at least two labels")
            for name, words in self.labels.items():
                if not words or not all(isinstance(w, str) and w.strip() for w in words):
                    raise ValueError(f"output.labels.{name}: give at least one non-empty verbalizer word")
        return self


class FewShotSettings(Strict):
    k: int = Field(4, ge=0, description="examples shown before the query")
    strategy: str = Field("random", description="how they are chosen: random, balanced (labels in turn) or "
                                                "nearest (BM25 similarity to the query)")
    order: Literal["selected", "reversed"] = Field(
        "selected", description="selected: in selection order (nearest: most similar first); reversed: the most "
                                "preferred example last, next to the query")
    max_tokens: int = Field(1024, ge=16, description="token budget of the whole prompt; examples that do not fit "
                                                     "are dropped whole (least preferred first), never cut")
    seed: int = Field(0, description="seed of random and balanced selection")


class SearchSettings(Strict):
    budget: int = Field(600, ge=1, description="model calls (one example scored under one prompt, or one "
                                               "paraphrase generated); cached scores cost nothing")
    paraphrases: int = Field(2, ge=0, description="instruction variants the model writes itself, per template")
    shots: list[int] = Field(default_factory=lambda: [0, 2, 4], description="numbers of few-shot examples tried")
    strategies: list[str] = Field(default_factory=lambda: ["random", "balanced", "nearest"],
                                  description="example selection strategies tried")
    orders: list[Literal["selected", "reversed"]] = Field(default_factory=lambda: ["selected"],  # type: ignore[arg-type]
                                                          description="example orders tried")
    calibrate: list[bool] | None = Field(None, description="labels: calibration settings tried (default: only the "
                                                           "task's calibrate)")
    min_examples: int = Field(16, ge=1, description="dev examples of the first successive-halving round")
    eta: int = Field(3, ge=2, description="successive halving keeps the best 1/eta candidates per round")
    seed: int = Field(0)


class PromptTask(Strict):
    name: str = Field("task", description="task name (used for output folders)")
    inputs: list[str] = Field(..., min_length=1, description="record fields the templates use")
    output: OutputSpec = Field(default_factory=OutputSpec)
    system: str | None = Field(None, description="system message of every prompt")
    templates: list[str] = Field(..., min_length=1, description="instruction templates (Jinja) over the input "
                                                                "fields; the first is the default")
    metric: str = Field("accuracy", description="accuracy or macro_f1 (labels); exact_match, chrf, bleu or "
                                                "rougeL (free text)")
    calibrate: bool = Field(False, description="labels: subtract each label's log-likelihood under a "
                                               "content-free input (contextual calibration)")
    content_free: str = Field("N/A", description="the value every input field takes for calibration")
    few_shot: FewShotSettings = Field(default_factory=FewShotSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    max_new_tokens: int = Field(64, ge=1, description="free text: tokens generated per answer")
    data: DataSettings | None = Field(None, description="where examples come from when no file is given: the "
                                                        "training split is the few-shot pool, the held-out split "
                                                        "the test set")
    dev_size: int = Field(200, ge=1, description="optimize without --dev: dev examples taken from the training "
                                                 "split (the rest stays the few-shot pool)")
    encrypt_outputs: bool | None = Field(None, description="seal the score cache, predictions, metrics and reports "
                                         "with the data key ($LMTAILOR_DATA_KEY); unset: on when a data file or "
                                         "the model's run is encrypted")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings, description="open-book systems of "
                                         "`compare` (SYSTEM+kb): knowledge-base passages in each query's user turn")

    @model_validator(mode="after")
    def _check(self) -> PromptTask:
        allowed = CLASSIFICATION_METRICS if self.output.labels else TEXT_METRICS
        if self.metric not in allowed:
            kind = "a labeled" if self.output.labels else "a free-text"
            raise ValueError(f"metric {self.metric!r} does not fit {kind} output; allowed values are "
                             + ", ".join(allowed))
        for i, template in enumerate(self.templates):
            check_template(template, self.inputs, f"templates[{i}]")
        return self

    @property
    def is_classification(self) -> bool:
        return self.output.labels is not None

    @property
    def label_names(self) -> list[str]:
        return list(self.output.labels or {})


def check_template(template: str, inputs: list[str], where: str) -> set[str]:
    """Parse a template; every variable it uses must be one of the task's input fields. Returns those used."""
    try:
        used = jinja2.meta.find_undeclared_variables(_ENV.parse(template))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}: not a valid Jinja template (line {e.lineno}): {e.message}") from None
    unknown = sorted(used - set(inputs))
    if unknown:
        raise ValueError(f"{where} uses field(s) {unknown} that are not task inputs {inputs}; add them to inputs")
    if not used:
        raise ValueError(f"{where} uses none of the input fields {inputs}; put e.g. {{{{ {inputs[0]} }}}} in it")
    return set(used)


def load_task(path: str | Path, overrides: list[str] | None = None) -> PromptTask:
    """Read and validate a task file (`key=value` overrides allowed, as for recipes).

    Raises:
        ConfigError: unreadable file, unknown key (listing the allowed ones), a bad value, a template that uses
            a field not in `inputs`.
    """
    from lmtailor.config import apply_overrides

    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        task = PromptTask.model_validate(data)
    except ValidationError as e:
        raise explain(e, str(path), PromptTask) from None
    if "name" not in data:
        task.name = Path(path).stem
    return task


# ---- records ----------------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One task example: its fields (inputs and reference) and where it came from."""

    fields: dict[str, Any]
    source: str

    def reference(self, task: PromptTask) -> str:
        return str(self.fields[task.output.field])


def example_fields(ex: Example) -> dict[str, Any]:
    """The fields a template sees for a loaded example.

    Text and labeled records keep their columns (`text`, `label`, any other). Conversational records (chat,
    alpaca, prompt/completion, paired) give `input` (the last user message) and `output` (the answer to it).
    """
    if ex.text is not None:
        return {**ex.meta, "text": ex.text}
    assert ex.messages is not None
    last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=None)
    users = [m["content"] for m in ex.messages[: last if last is not None else len(ex.messages)]
             if m["role"] == "user"]
    fields = {**ex.meta, "input": users[-1] if users else ""}
    if last is not None:
        fields["output"] = ex.messages[last]["content"]
    return fields


def make_items(examples: list[Example], task: PromptTask, need_reference: bool = True) -> list[Item]:
    """Examples -> task items, checking that every input field (and the reference) is present.

    Raises:
        DataError: naming the record (file:line) and the missing field, or a label outside output.labels.
    """
    items = []
    for ex in examples:
        fields = example_fields(ex)
        wanted = list(task.inputs) + ([task.output.field] if need_reference else [])
        for name in wanted:
            if name not in fields or fields[name] is None:
                raise DataError(f"{ex.source}: field '{name}' is missing",
                                f"task '{task.name}' needs fields {wanted}; this record has {sorted(fields)}")
        if need_reference and task.output.labels is not None:
            label = str(fields[task.output.field])
            if label not in task.output.labels:
                raise DataError(f"{ex.source}: field '{task.output.field}': label {label!r} is not one of the "
                                f"task's labels {task.label_names}", "add it to output.labels in the task file")
        items.append(Item(fields, ex.source))
    return items


def load_items(path: str, task: PromptTask, fmt: str = "auto", limit: int | None = None) -> list[Item]:
    """All examples of a data file (or folder, hub id, catalog:NAME) as task items, cleaned of duplicates."""
    from lmtailor.data.validate import clean_examples, load_examples

    fmt = fmt if fmt != "auto" or task.data is None else task.data.format
    examples, _ = clean_examples(load_examples(path, fmt))
    return make_items(examples[:limit] if limit else examples, task)


def task_splits(task: PromptTask) -> tuple[list[Item], list[Item]]:
    """(training split, held-out split) of the task's `data` section, split exactly as `lmtailor train` does."""
    from lmtailor.data.validate import load_datasets

    if task.data is None or not task.data.path:
        raise ConfigError(f"task '{task.name}' has no data section and no data file was given",
                          "pass --data/--dev/--test FILE, or add data: {path: ...} to the task file")
    train, val, _ = load_datasets(task.data)
    return make_items(train, task), make_items(val, task)


# ---- rendering --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def render_template(template: str, item: Item, where: str = "template") -> str:
    """Fill a template with an item's fields.

    Raises:
        DataError: naming the record and the field the template needs but the record lacks.
    """
    try:
        return _compiled(template).render(**item.fields).strip()
    except jinja2.UndefinedError as e:
        raise DataError(f"{item.source}: {where}: {e.message}", "every field a template uses must be in the record"
                        ) from None


def answer_text(task: PromptTask, item: Item) -> str:
    """The assistant's answer shown for a few-shot example: the label's first verbalizer word, or the reference."""
    ref = item.reference(task)
    if task.output.labels is not None:
        return task.output.labels[ref][0]
    return ref


def build_messages(task: PromptTask, template: str, demos: list[Item], query: Item) -> list[dict[str, str]]:
    """The conversation asking the model to answer `query`, after the few-shot examples `demos`."""
    messages: list[dict[str, str]] = [{"role": "system", "content": task.system}] if task.system else []
    for demo in demos:
        messages.append({"role": "user", "content": render_template(template, demo)})
        messages.append({"role": "assistant", "content": answer_text(task, demo)})
    messages.append({"role": "user", "content": render_template(template, query)})
    return messages


def content_free_item(task: PromptTask) -> Item:
    """The calibration query: every input field set to task.content_free."""
    return Item({name: task.content_free for name in task.inputs}, "<content-free>")


def chat_examples(task: PromptTask, items: list[Item], template_index: int = 0) -> list[Example]:
    """Zero-shot training conversations (template on the inputs -> the answer), for fine-tuning on the task's own
    prompt format (LoRA or a soft prompt) so that `compare` scores the tuned model under the same rendering."""
    if not 0 <= template_index < len(task.templates):
        raise ConfigError(f"data.prompt_template is {template_index}, but task '{task.name}' has "
                          f"{len(task.templates)} template(s)", f"allowed values are 0..{len(task.templates) - 1}")
    template = task.templates[template_index]
    out = []
    for item in items:
        msgs = build_messages(task, template, [], item)
        msgs.append({"role": "assistant", "content": answer_text(task, item)})
        out.append(Example(messages=msgs, source=item.source, meta={"reference": item.reference(task)}))
    return out
