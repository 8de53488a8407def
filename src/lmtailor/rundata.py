"""The one data assembly of a run: what `train`, `validate` and `tune` (through train) feed the model.

Read or stream the data -> render it through a prompt task (data.prompt_task) -> scrub PII (privacy.scrub) ->
show each request its most similar training examples (data.retrieved_examples) or knowledge-base passages
(retrieval.kb) -> let the objective fit what
the data fixes (the label set) -> the objective's items for every split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.fitting import (
    Choice,
    apply,
    choose_head,
    choose_max_length,
    choose_retrieved_examples,
    choose_schedule,
    example_lengths,
)
from lmtailor.objectives import Objective, ObjectiveContext


@dataclass
class RunData:
    """A run's training and validation items, the validation examples they came from, and data statistics.

    Items and examples may be memory-mapped sequences (pretrain.cache): index them by position, do not slice.
    """

    train_items: Sequence[Any]
    val_items: Sequence[Any]
    val_examples: Sequence[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    privacy_audit: dict[str, Any] = field(default_factory=dict)
    train_examples: Sequence[Example] = ()  # what the items came from (empty when streamed into the token cache)
    cfg: RunConfig | None = None  # the recipe with the values chosen from the data filled in
    choices: list[Choice] = field(default_factory=list)  # those values, each with its reason
    test_items: Sequence[Any] = ()  # data.test_path: what the report is judged on (never selected on)
    test_examples: Sequence[Example] = ()

    def report_split(self) -> tuple[Sequence[Any], Sequence[Example], str]:
        """(items, examples, name) the baselines and before/after are judged on: the test split when the run has
        one, else the validation split."""
        if self.test_examples:
            return self.test_items, self.test_examples, "test"
        return self.val_items, self.val_examples, "validation"


def build_run_data(objective: Objective, ctx: ObjectiveContext, write_audit: bool = True, world: int = 1) -> RunData:
    """Assemble a run's data; sets ctx.tokenizer (the objective's, unless already set) and lets `objective.fit`
    fill ctx (e.g. the label set). Records are read and checked before any tokenizer or model loads, so bad data
    is reported first.

    Values the recipe leaves unset are then chosen from the data (lmtailor.fitting): data.cfg is the recipe with
    them filled in (also set as ctx.cfg), data.choices says what was chosen and why.

    Args:
        objective: the run's objective (resolved, see get_objective).
        ctx: its context.
        write_audit: write `<run_dir>/privacy_audit.json` when scrubbing (the main process of a run does).
        world: processes sharing each step (the schedule's steps per epoch depend on it).

    Raises:
        DataError: unreadable data or bad records (file, line and field named).
        ConfigError: nothing to learn from, or a bad privacy/prompt-task setting.
    """
    from lmtailor.pretrain.corpus import streams_corpus

    cfg = ctx.cfg
    run_dir = ctx.run_dir if write_audit else None
    if streams_corpus(cfg):  # pretrain.cache: documents go from the files into the token cache, never all in memory
        if ctx.tokenizer is None:
            ctx.tokenizer = objective.tokenizer(ctx)
        data = _streamed(objective, ctx, run_dir)
    else:
        from lmtailor.data.validate import load_datasets, load_test_examples

        train_ex, val_ex, stats = load_datasets(cfg.data)
        test_ex = load_test_examples(cfg.data)
        audit: dict[str, Any] = {}
        if cfg.data.prompt_task:  # fine-tune on a prompt task's own rendering (see `lmtailor compare`)
            from lmtailor.prompting.task import chat_examples, load_task, make_items

            task = load_task(cfg.data.prompt_task)
            train_ex, val_ex, test_ex = (chat_examples(task, make_items(ex, task), cfg.data.prompt_template)
                                         for ex in (train_ex, val_ex, test_ex))
        if cfg.privacy.scrub:
            from lmtailor.privacy.scrub import scan_options, scrub_for_run

            train_ex, held_ex, audit = scrub_for_run(train_ex, val_ex + test_ex, cfg.privacy.mode,
                                                     cfg.privacy.salt_env, cfg.privacy.ner, run_dir,
                                                     scan_options(cfg.privacy))
            val_ex, test_ex = held_ex[:len(val_ex)], held_ex[len(val_ex):]
            stats["pii_replaced"] = audit["total"]
        chosen = [c for c in [choose_retrieved_examples(cfg, objective, train_ex, [val_ex, test_ex])] if c]
        ctx.cfg = cfg = apply(cfg, chosen)  # unset on chat data: on when similar requests carry their answers
        if cfg.data.retrieved_examples:  # after scrubbing: retrieved answers are scrubbed like the rest
            from lmtailor.data.retrieve import with_retrieved

            train_ex, (val_ex, test_ex) = with_retrieved(train_ex, [val_ex, test_ex], cfg.data.retrieved_examples)
        if cfg.retrieval.kb:  # knowledge-base passages: RAFT-style in training, as served in validation and test
            from lmtailor.knowledge.raft import with_kb_passages

            train_ex, (val_ex, test_ex), raft = with_kb_passages(train_ex, [val_ex, test_ex], cfg.retrieval, cfg.seed)
            stats.update(raft)
        if ctx.tokenizer is None:
            ctx.tokenizer = objective.tokenizer(ctx)
        objective.fit(ctx, train_ex)
        lengths = example_lengths(objective, ctx, train_ex)
        choices = chosen + [c for c in [choose_max_length(objective, ctx, train_ex, lengths)] if c is not None]
        ctx.cfg = cfg = apply(cfg, choices)
        head = choose_head(cfg, objective, lengths)  # at the max_length just fixed
        if head:
            ctx.cfg = cfg = apply(cfg, head)
            ctx.settings = cfg.settings
            choices += head
        train_items, train_stats = objective.prepare(ctx, train_ex)
        val_ex = val_ex[:cfg.eval.max_examples]
        val_items, _ = objective.prepare(ctx, val_ex)
        test_ex = test_ex[:cfg.eval.max_examples]
        test_items, _ = objective.prepare(ctx, test_ex) if test_ex else ([], {})
        stats.update({f"train_{k}": v for k, v in train_stats.items()}, val_items=len(val_items))
        if test_ex:
            stats["test"] = len(test_ex)
        data = RunData(train_items, val_items, val_ex, stats, audit, train_ex, choices=choices,
                       test_items=test_items, test_examples=test_ex)
    if not data.train_items:
        raise ConfigError("no training example has anything to learn from",
                          "check data.format and that examples have assistant turns, text or labels")
    items = data.train_items
    sample = range(0, len(items), max(1, len(items) // 20000))  # a pretraining cache may hold millions of items
    lengths = [len(getattr(items[i], "input_ids", ())) for i in sample]
    schedule = choose_schedule(ctx.cfg, objective, len(items), world, lengths)
    ctx.cfg = data.cfg = apply(ctx.cfg, schedule)
    data.choices += schedule
    return data


def _streamed(objective: Objective, ctx: ObjectiveContext, run_dir: Any) -> RunData:
    import json
    from pathlib import Path

    from lmtailor import crypto
    from lmtailor.io import atomic_write_json
    from lmtailor.objectives.common import check_context
    from lmtailor.pretrain.corpus import cached_corpus

    if ctx.cfg.objective == "mlm":
        from lmtailor.objectives.mlm import check_mask

        check_mask(ctx.tokenizer)
    check_context(ctx.cfg)
    corpus = cached_corpus(ctx.cfg, ctx.tokenizer)
    if corpus.audit and run_dir is not None:
        key = crypto.sealing_key()
        if key is None:
            atomic_write_json(Path(run_dir) / "privacy_audit.json", corpus.audit)
        else:  # the audit quotes masked values: sealed with the run's other outputs
            crypto.write_bytes(Path(run_dir) / "privacy_audit.json.enc", json.dumps(corpus.audit).encode(), key)
    return RunData(corpus.train, corpus.val, corpus.val_examples, corpus.stats, corpus.audit)
