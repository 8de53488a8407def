"""Recipes that fit the data: values a recipe leaves unset are chosen from the data, each with its reason.

Only keys the recipe (or an override) does not set are chosen; a set key is never changed. The choices:
- max_length (sft, classify, seq2seq): the length that 95% of the training examples fit, rounded up to a multiple
  of 32, between 32 and 512 tokens (attention cost grows with the square of the length; set it to go longer), and
  never past the model's positions. pack_length follows when it is unset.
- epochs (without max_steps): enough passes for about 150 optimizer steps, at most 3; one pass when the data gives
  that many steps already. A budget (`budget=`) then cuts the steps to the time available.
- lr: by method (LoRA 2e-4, or 1e-3 with a new classification head; full 2e-5; freeze 5e-5; prompt tuning 3e-2;
  prefix tuning 1e-2): full fine-tuning at LoRA's rate wrecks a pretrained model, a new head learns slowly at it
  (a head fitted as a linear probe, classify.head_init=probe, is not new: LoRA's rate). LoRA SFT runs of at most
  SHORT_RUN_STEPS planned steps (a budget only cuts them further) take SHORT_LORA_LR: after 80 steps on a dev split
  of the shell commands, 1e-3 reached chrF 38.5 and 2e-4 36.4 (one seed, 60 answers; the main job trains at 1e-3
  too).
- eval_every and early_stopping_patience: about 5 validations per run, stopping after 3 without improvement;
  classification picks its best checkpoint by validation macro-F1 (metric_for_best), which costs one forward pass
  over the validation texts; generation objectives keep the validation loss (their task metric needs decoding).
- group_by_length: on where batches are padded rather than packed (classify, seq2seq on an encoder-decoder, or
  packing off) and random batches would be at least 25% padding: similar lengths share a batch. On three
  short-text sets (40-55% padding) this made steps 1.45-1.74x faster at equal or better macro-F1 after the same
  steps (benchmarks/batching.py). On texts of one length it only makes batches one-sided.
- data.retrieved_examples (sft on chat data): 1 when, on a dev split of the training data, the answer of the nearest
  other training request (BM25) beats copying the request and reaches chrF 20, else 0 (choose_retrieval, auto's
  rule); 0 also when the recipe sets max_length, which it fixed for prompts without the retrieved pairs. Without
  it the shipped defaults lost to that very nearest answer on two of three generation sets (python-docstrings
  chrF 25.9 vs 36.7, shell commands 24.9 vs 38.2; benchmarks/results/quality.md).
- classify.pooling and classify.head_init (single-label classification on a decoder model): mean and probe when at
  least a quarter (HEAD_CUT_SHARE) of the training texts are longer than max_length (set or chosen). A cut text's
  last token, which the default head reads, is an arbitrary word; a head fitted first as a linear probe on the
  frozen model's mean-pooled features starts where TF-IDF + logistic regression ends. Without it the shipped
  defaults scored macro-F1 0.080 on python-docs-sections (86% of the pages cut at 512 tokens), below the majority
  class (0.082) and TF-IDF + logistic regression (0.376), where auto, which chose these two, scored 0.486 (all
  averaged over every label then; over the labels present, TF-IDF's 0.376 reads 0.538). With them the defaults
  score 0.591 there (benchmarks/results/quality.md).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.objectives import Objective, ObjectiveContext

LENGTH_QUANTILE = 0.95
MAX_AUTO_LENGTH = 512
TARGET_STEPS = 150
MAX_AUTO_EPOCHS = 3
EVALUATIONS = 5
METHOD_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "freeze": 5e-5, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2}
LORA_METHODS = ("lora", "qlora")  # qlora trains the same adapters on a 4-bit base
SHORT_RUN_STEPS = 300  # LoRA SFT runs planned at most this long learn at SHORT_LORA_LR (see the module docstring)
SHORT_LORA_LR = 1e-3
HEAD_LR = 1e-3  # LoRA with a new classification head: the head starts from random weights
LENGTH_OBJECTIVES = ("sft", "classify", "seq2seq_causal", "seq2seq_encdec")
PADDED_OBJECTIVES = ("classify", "seq2seq_encdec")  # batches padded to their longest example, never packed
PACKING_OBJECTIVES = ("sft", "seq2seq_causal")  # these pad only with packing off
GROUP_WASTE = 0.25  # group_by_length when random batches would spend this share of their positions on padding
RETRIEVED = 1  # retrieved examples per prompt when retrieval pays: on the main job at a 5-minute budget one
# (chrF 32.9 after 23 steps) did as well as two (30.7 after 25) at 60% of the tokens; none: 20.0 after 73 steps
RETRIEVAL_MIN_CHRF = 20.0  # the nearest training answer must reach this on the dev split
RETRIEVAL_DEV_MAX = 200  # dev examples the retrieval choice is judged on
HEAD_CUT_SHARE = 0.25  # classify.pooling=mean and head_init=probe when this share of the texts is cut at max_length


@dataclass(frozen=True)
class Choice:
    """A value chosen for a key the recipe left unset, and why."""

    key: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key}={self.value} ({self.reason})"


def _set(cfg: RunConfig) -> set[str]:
    return set(cfg.model_fields_set)


def _has_answer(ex: Example) -> bool:
    return ex.messages is not None and any(m["role"] == "assistant" for m in ex.messages)


def choose_retrieval(train: Sequence[Example], seed: int = 0) -> dict[str, Any]:
    """Whether an sft run should see retrieved examples (data.retrieved_examples), judged on the training data
    alone: on a dev split of it (20%, at most RETRIEVAL_DEV_MAX), the answer of the nearest other training request
    (BM25) is scored against the reference (chrF) and against copying the request. When the neighbours' answers
    predict the dev answers better than the request itself and reach RETRIEVAL_MIN_CHRF, similar requests carry
    their answers' form, and showing the model RETRIEVED of them is worth the longer prompts; otherwise not."""
    from lmtailor.baselines import generation_baselines
    from lmtailor.data.retrieve import answer_of, query

    chats = [ex for ex in train if _has_answer(ex)]
    n_dev = min(RETRIEVAL_DEV_MAX, len(chats) // 5)
    if n_dev < 5:
        return {"k": 0, "reason": f"only {len(chats)} chat examples: too few to judge retrieval"}
    # a seeded random dev split: data files are often ordered (by tool, by source), and a contiguous tail would
    # take whole groups of near-twins out of the pool
    order = random.Random(seed).sample(range(len(chats)), len(chats))
    pool, dev = [chats[i] for i in order[n_dev:]], [chats[i] for i in order[:n_dev]]

    def answer(ex: Example) -> str:
        assert ex.messages is not None
        return answer_of(next(m for m in reversed(ex.messages) if m["role"] == "assistant"))

    scores = generation_baselines([query(ex) for ex in pool], [answer(ex) for ex in pool],
                                  [query(ex) for ex in dev], [answer(ex) for ex in dev])
    near, copy = scores["nearest_answer"]["chrf"], scores["copy_input"]["chrf"]
    facts = (f"on {n_dev} dev examples the nearest training answer scores chrF {near:.1f}, copying the request "
             f"{copy:.1f}")
    if near > copy and near >= RETRIEVAL_MIN_CHRF:
        return {"k": RETRIEVED, "nearest_chrf": near, "copy_chrf": copy,
                "reason": f"{facts}: similar requests carry their answers, so each prompt shows the "
                          f"{RETRIEVED} most similar training examples"}
    return {"k": 0, "nearest_chrf": near, "copy_chrf": copy,
            "reason": f"{facts}: similar requests do not carry their answers, so no retrieved examples"}


def choose_retrieved_examples(cfg: RunConfig, objective: Objective, train: Sequence[Example],
                              held: Sequence[Sequence[Example]]) -> Choice | None:
    """data.retrieved_examples for an sft run on chat data that leaves it unset: auto's rule (choose_retrieval),
    judged on the training examples alone, and 0 when the recipe sets max_length (fixed for prompts without the
    pairs). None (no retrieval) for other objectives, for data that is not all chats with an answer, and beside a
    knowledge base (retrieval.kb) or a prompt task (its own zero-shot prompts)."""
    if ("retrieved_examples" in cfg.data.model_fields_set or objective.name != "sft" or cfg.retrieval.kb
            or cfg.data.prompt_task or not train):
        return None
    if not all(_has_answer(ex) for ex in [*train, *(ex for split in held for ex in split)]):
        return None
    picked = choose_retrieval(train, cfg.data.split_seed)
    if picked["k"] and "max_length" in _set(cfg):
        # the retrieved pairs would about double each prompt, past the length the recipe fixed for prompts without
        return Choice("data.retrieved_examples", 0,
                      f"{picked['reason'].split(': ', 1)[0]}, but the recipe sets max_length={cfg.max_length} for "
                      f"prompts without retrieved pairs; set data.retrieved_examples={picked['k']} and a longer "
                      "max_length to show them")
    return Choice("data.retrieved_examples", picked["k"], picked["reason"])


def example_lengths(objective: Objective, ctx: ObjectiveContext, examples: Sequence[Example],
                    sample: int = 2000) -> list[int]:
    """The token lengths (sorted) of (a sample of) the training examples, prepared uncut; [] for objectives whose
    length is not chosen, or when neither max_length nor the classification head would be chosen from them."""
    cfg = ctx.cfg
    if objective.name not in LENGTH_OBJECTIVES or not examples:
        return []
    if "max_length" in _set(cfg) and not _head_unset(cfg, objective):
        return []
    probe = dataclasses.replace(ctx, cfg=cfg.model_copy(update={"max_length": 100_000, "pack_length": 100_000}),
                                run_dir=None)
    step = max(1, len(examples) // sample)
    items, _ = objective.prepare(probe, list(examples[::step]))
    return sorted(len(items[i].input_ids) for i in range(len(items)))


def choose_max_length(objective: Objective, ctx: ObjectiveContext, examples: Sequence[Example],
                      lengths: Sequence[int] | None = None) -> Choice | None:
    """max_length from the token lengths of (a sample of) the training examples, prepared at the longest allowed
    (`lengths`, sorted, when the caller measured them already: example_lengths)."""
    cfg = ctx.cfg
    if "max_length" in _set(cfg) or objective.name not in LENGTH_OBJECTIVES or not examples:
        return None
    limit = min(MAX_AUTO_LENGTH, _model_positions(cfg))
    if cfg.packing and "pack_length" in _set(cfg):
        limit = min(limit, cfg.pack_length)
    lengths = list(lengths) if lengths is not None else example_lengths(objective, ctx, examples)
    if not lengths:
        return None
    at = lengths[min(len(lengths) - 1, math.ceil(LENGTH_QUANTILE * len(lengths)) - 1)]
    value = max(32, min(limit, 32 * math.ceil(at / 32)))
    cut = sum(n > value for n in lengths) / len(lengths)
    why = (f"{1 - cut:.0%} of {len(lengths)} training examples fit; longest {lengths[-1]}, median "
           f"{lengths[len(lengths) // 2]}" + (f"; capped at {limit}" if value == limit and at > limit else ""))
    return Choice("max_length", value, why)


def _head_unset(cfg: RunConfig, objective: Objective) -> bool:
    """A single-label classification recipe that sets neither classify.pooling nor classify.head_init, on a method
    that reads the backbone's own hidden states."""
    s = cfg.settings
    return (objective.name == "classify" and s is not None and not s.multi_label
            and not {"pooling", "head_init"} & set(s.model_fields_set)
            and cfg.method not in ("prompt_tuning", "prefix_tuning"))


def _decoder_only(cfg: RunConfig) -> bool:
    """Whether the base model is a decoder-only LM (its classification head is a `score` layer on the last token),
    by its config alone: a causal-LM architecture that is neither an encoder with an LM head (BERT's causal variant)
    nor an encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    from lmtailor.errors import LmtailorError
    from lmtailor.models import load_model_config

    try:
        config = load_model_config(cfg.base_model, cfg.trust_remote_code)
    except LmtailorError:  # the model's own load reports it with its proper error
        return False
    kind = getattr(config, "model_type", "")
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


def choose_head(cfg: RunConfig, objective: Objective, lengths: Sequence[int]) -> list[Choice]:
    """classify.pooling=mean and classify.head_init=probe for a decoder's single-label head when at least
    HEAD_CUT_SHARE of the training texts (`lengths`, uncut) are longer than max_length, and the recipe sets neither
    key: the last token of a text cut there is an arbitrary word in mid-sentence, and a head trained from random
    weights in the few steps long documents allow learns little (see objectives/classify.py)."""
    if not lengths or not _head_unset(cfg, objective):
        return []
    cut = sum(n > cfg.max_length for n in lengths) / len(lengths)
    if cut < HEAD_CUT_SHARE or not _decoder_only(cfg):
        return []
    facts = f"{cut:.0%} of {len(lengths)} training texts are longer than max_length={cfg.max_length}"
    return [Choice("classify.pooling", "mean", f"{facts}: the last token of a cut text is an arbitrary word, so the "
                   "head reads the mean over the text"),
            Choice("classify.head_init", "probe", "the head starts as a linear probe fitted on the frozen model's "
                   "features of the training texts (one forward pass over them), which fine-tuning continues")]


def padding_share(lengths: Sequence[int], batch_size: int, seed: int = 0) -> float:
    """The share of computed positions that would be padding in randomly drawn batches of `batch_size` (one
    seeded shuffle), each padded to its longest example."""
    if not lengths:
        return 0.0
    order = np.random.default_rng(seed).permutation(len(lengths))
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / max(1, padded)


def choose_schedule(cfg: RunConfig, objective: Objective, n_train: int, world: int,
                    lengths: Sequence[int] | None = None) -> list[Choice]:
    """epochs, lr, eval_every, early stopping and the best-checkpoint metric for keys the recipe left unset; with the
    training items' token `lengths`, group_by_length where padded batches would waste GROUP_WASTE of their work."""
    given = _set(cfg)
    out: list[Choice] = []
    per_epoch = max(1, n_train // max(cfg.batch_size, world))
    if "epochs" not in given and cfg.max_steps is None:
        epochs = min(MAX_AUTO_EPOCHS, max(1, math.ceil(TARGET_STEPS / per_epoch)))
        out.append(Choice("epochs", float(epochs), f"{n_train} training examples give {per_epoch} steps per epoch at "
                          f"batch_size {cfg.batch_size}; {epochs} epoch(s) for about {TARGET_STEPS} steps, at most "
                          f"{MAX_AUTO_EPOCHS}"))
    steps = cfg.max_steps or math.ceil(
        (next((c.value for c in out if c.key == "epochs"), cfg.epochs)) * per_epoch)
    if "lr" not in given:
        probe = getattr(cfg.settings, "head_init", None) == "probe"
        head = objective.name == "classify" and cfg.method in LORA_METHODS and not probe
        short = objective.name == "sft" and cfg.method in LORA_METHODS and steps <= SHORT_RUN_STEPS
        lr = HEAD_LR if head else SHORT_LORA_LR if short else METHOD_LR[cfg.method]
        out.append(Choice("lr", lr, f"method {cfg.method}" + (" with a new classification head" if head else "")
                          + (" from a head fitted as a linear probe" if probe else "")
                          + (f", a short run ({steps} steps planned, at most {SHORT_RUN_STEPS})" if short else "")))
    if "eval_every" not in given and steps >= 2 * EVALUATIONS:
        out.append(Choice("eval_every", max(1, steps // EVALUATIONS), f"about {EVALUATIONS} validations in {steps} "
                          "steps"))
        if "early_stopping_patience" not in given:
            out.append(Choice("early_stopping_patience", 3, "stop after 3 validations without improvement"))
        if "metric_for_best" not in given and objective.name == "classify":
            out.append(Choice("metric_for_best", "macro_f1", "classification: the best checkpoint by validation "
                              "macro-F1 (one forward pass over the validation texts per validation)"))
    padded = objective.name in PADDED_OBJECTIVES or (objective.name in PACKING_OBJECTIVES and not cfg.packing)
    if "group_by_length" not in given and padded and not cfg.group_by_length and lengths:
        # only where padding costs much: grouping also makes batches of similar texts, which a label that goes
        # with length would make one-sided
        waste = padding_share(lengths, cfg.batch_size, cfg.seed)
        if waste >= GROUP_WASTE:
            out.append(Choice("group_by_length", True, f"random batches would be {waste:.0%} padding: similar "
                              "lengths share a batch and pad less"))
    return out


def apply(cfg: RunConfig, choices: Sequence[Choice]) -> RunConfig:
    """The recipe with the choices filled in (pack_length follows a chosen max_length when it is unset)."""
    update: dict[str, Any] = {c.key: c.value for c in choices if "." not in c.key}
    sections: dict[str, dict[str, Any]] = {}
    for c in choices:  # a section's key (data.retrieved_examples): the section is copied with it filled in
        if "." in c.key:
            section, leaf = c.key.split(".", 1)
            sections.setdefault(section, {})[leaf] = c.value
    for section, values in sections.items():
        old = getattr(cfg, section)
        update[section] = old.model_copy(update=values)
        update[section].__pydantic_fields_set__ = set(old.model_fields_set)
    if "max_length" in update and "pack_length" not in _set(cfg):
        update["pack_length"] = max(1024, int(update["max_length"]))
    fitted = cfg.model_copy(update=update)
    fitted.__pydantic_fields_set__ = set(cfg.model_fields_set)  # chosen values stay "unset by the recipe"
    return fitted


def _model_positions(cfg: RunConfig) -> int:
    if cfg.pretrain.scratch is not None:
        return cfg.pretrain.scratch.context
    from lmtailor.errors import LmtailorError
    from lmtailor.models import load_model_config

    try:
        config = load_model_config(cfg.base_model, cfg.trust_remote_code)
    except LmtailorError:  # the model's own load reports a missing or broken model with its proper error
        return MAX_AUTO_LENGTH
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return MAX_AUTO_LENGTH
