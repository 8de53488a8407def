"""Typed run configuration: the YAML schema, the `key=value` overrides and their help in one place."""

from __future__ import annotations

import contextlib
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmtailor.errors import ConfigError

if typing.TYPE_CHECKING:
    from lmtailor.crypto import KeySource


class Strict(BaseModel):
    """Unknown keys are an error (the message lists the allowed ones)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Seeds seed numpy too, which takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
# Validation metrics an objective may report (metric_for_best); loss is always there. Each objective registers the
# ones it reports (OBJECTIVE_METRICS); these are the names allowed for an objective that registered none.
BEST_METRICS = ("loss", "perplexity", "accuracy", "macro_f1", "weighted_f1", "micro_f1", "masked_accuracy", "bleu",
                "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "looping", "tool_call_parsed",
                "tool_name_accuracy", "tool_args_exact", "tool_args_chrf")


class LoraSettings(Strict):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names to adapt, or 'all-linear'",
    )
    train_new_tokens: bool = Field(True, description="also train the embedding rows (and untied output rows) of "
                                   "tokens added by `tokenizer extend` (PEFT trainable tokens); the old rows stay "
                                   "frozen, and merge/export keep the trained rows")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (a learned magnitude per output row)")
    use_rslora: bool = Field(False, description="rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r")


class DataSettings(Strict):
    path: str | None = Field(None, description="a file, a folder of files, a hub dataset id, or catalog:NAME")
    format: Literal["auto", "text", "alpaca", "chat", "sharegpt", "prompt_completion", "paired", "labeled",
                    "preference", "unpaired", "shell_tool"] = Field(
        "auto", description="record format; auto detects it from the fields of the first record"
    )
    split: str = Field("train", description="split to read from a hub dataset")
    val_path: str | None = Field(None, description="separate validation data (otherwise split off `path`)")
    test_path: str | None = Field(None, description="held-out test data: the baselines and the before/after report "
                                  "are judged on it, while validation (best checkpoint, early stopping) stays on "
                                  "the validation split, so the reported figures are not the ones selected on")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of examples held out for validation")
    val_size: int | None = Field(None, ge=0, description="held-out example count (overrides val_fraction)")
    max_examples: int | None = Field(None, ge=1, description="use at most this many training examples")
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the deterministic train/validation split")
    system_prompt: str | None = Field(None, description="system message added to every conversation without one")
    prompt_task: str | None = Field(None, description="a prompt task file (see `lmtailor prompt`): records are "
                                    "rendered through its template into zero-shot chats answered by the label word "
                                    "or reference, to fine-tune (LoRA or a soft prompt) on the task's own prompts")
    prompt_template: int = Field(0, ge=0, description="with prompt_task: which of its templates")
    retrieved_examples: int | None = Field(None, ge=0, le=16, description="show each request the k most similar "
                                           "training examples (BM25) as solved request/answer pairs, in training "
                                           "(never itself), evaluation and generation alike; chat-shaped data only. "
                                           "Unset: an sft run on chat data shows 1 when, on a dev split of the "
                                           "training data, the nearest training answer beats copying the request "
                                           "and reaches chrF 20 (lmtailor.fitting.choose_retrieval); else 0")


class RetrievalSettings(Strict):
    """Passages of a knowledge base (`lmtailor kb build`) in every prompt: training, evaluation, generate, chat and
    serve put them into the conversation the same way (lmtailor.knowledge.prompt), so the prompts are identical."""

    kb: str | None = Field(None, description="knowledge base folder; unset: no retrieval")
    k: int = Field(3, ge=1, le=20, description="passages retrieved per prompt (before the token budget)")
    mode: Literal["hybrid", "bm25", "dense"] = Field("hybrid", description="ranking: BM25, embeddings, or both "
                                                     "fused by reciprocal rank")
    token_budget: int = Field(400, ge=8, description="most passage tokens per prompt (as the base counted them "
                                                     "when chunking); passages that do not fit are left out whole")
    template: str = Field("[{n}] {source}:{lines}\n{text}", description="one passage; fields {n} {source} {lines} "
                          "{heading} {text}")
    intro: str = Field("Passages from the documentation:", description="the line before the passages")
    question: str = Field("Question: ", description="put before the request when the passages precede or follow it")
    position: Literal["before", "after", "system"] = Field("before", description="passages before or after the "
                                                           "request in its user turn, or in the system message")
    gold_absent: float = Field(0.2, ge=0, le=1, description="training only (RAFT): share of training examples "
                               "whose gold passage (the one that best matches the answer) is taken out, leaving "
                               "only distractors, so the model also learns to answer without it")
    gold_forced: bool = Field(True, description="training only (RAFT): in the other examples the gold passage is "
                              "put among the passages when retrieval missed it (at a random position)")


class PrivacySettings(Strict):
    scrub: bool = Field(False, description="replace PII in training and validation data before tokenizing")
    mode: Literal["placeholder", "pseudonym"] = Field(
        "placeholder", description="<EMAIL>-style placeholders, or consistent fake values keyed by a secret salt"
    )
    salt_env: str = Field("LMTAILOR_PRIVACY_SALT", description="environment variable holding the pseudonym salt")
    ner: bool = Field(False, description="also scrub names and places (needs presidio-analyzer or spaCy + a model)")
    phone_region: str = Field("US", description="region(s) whose national phone formats count, ISO 3166 codes "
                              "separated by commas (\"DE,FR\"); numbers written with +country are found anyway")
    documentation_emails: bool = Field(True, description="count e-mail addresses at documentation domains "
                                       "(example.com, .test, .invalid, ...) as PII")
    key_env: str = Field("LMTAILOR_DATA_KEY", description="environment variable holding the 32-byte key (base64 "
                         "or hex) that opens encrypted data files (`lmtailor privacy encrypt`) and seals outputs")
    key_file: str | None = Field(None, description="key file to use instead of key_env (`lmtailor privacy keygen`)")
    passphrase_env: str | None = Field(None, description="environment variable holding a passphrase to use "
                                       "instead of key_env (stretched with scrypt for each file)")

    def key_source(self) -> KeySource:
        """The key source these settings name (crypto is imported only when a key is needed)."""
        from lmtailor.crypto import KeySource

        return KeySource(key_env=self.key_env, key_file=self.key_file, passphrase_env=self.passphrase_env)


# CPU decoding speed-ups (`--speedup` of generate, chat and serve; see lmtailor.fastdecode.speed_up).
SPEEDUPS = ("none", "fp16", "bf16")
SPEEDUP_HELP = ("CPU decoding speed-up for llama, mistral and qwen2 models: fp16 = fp16 weights and a lean decode "
                "loop (~2x at batch 1, perplexity +0.1%%, same greedy tokens); bf16 = bf16 weights; none = fp32 HF "
                "generate. int8 weights are served through llama.cpp (serve --engine llama.cpp --gguf-type q8_0). "
                "benchmarks/serve_load.py measures each")
# How to get int8 weights now that lmtailor's own int8 kernel is gone (it lost to llama.cpp q8_0, issue 18).
INT8_HINT = ("int8 is served through llama.cpp: `lmtailor export RUN --format gguf --gguf-type q8_0 --out m.gguf`, "
             "then `lmtailor serve RUN --engine llama.cpp` (q8_0 is its default --gguf-type)")


def check_speedup(how: str) -> str:
    """`how` if it is one of SPEEDUPS.

    Raises:
        ConfigError: naming the allowed values; for the removed int8 speed-up, saying how to serve int8 instead.
    """
    if how in SPEEDUPS:
        return how
    allowed = ", ".join(SPEEDUPS)
    if how == "int8":
        raise ConfigError(f"--speedup int8 was removed: its kernel decoded slower than llama.cpp q8_0 (25.4 vs 36.6 "
                          f"tokens/s, benchmarks/results/serve_load.json); allowed values: {allowed}", INT8_HINT)
    raise ConfigError(f"unknown --speedup {how!r}; allowed values: {allowed}",
                      "fp16 is the fast CPU path; for int8 weights see --engine llama.cpp on serve")


class GenerationSettings(Strict):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: list[str] = Field(default_factory=list, description="strings that end generation")
    # 20, measured (60 shell questions with their retrieved pair, SmolLM2-135M, 2 cores, greedy, 64 new tokens):
    # the base model's answers took 128 / 70 / 66 s at batch 8 / 20 / 60, a tuned one's 87 / 67 / 72 s, with the
    # same answers at every size; a batch decodes until its longest answer ends, so larger ones gain little more
    batch_size: int = Field(20, ge=1, description="prompts decoded together during evaluation")
    # On by default, chosen by benchmarks/looping.py (60 held-out shell questions, greedy, 48 new tokens): on a
    # LoRA-tuned SmolLM2-135M, 25% of answers loop; the stop ends them all and changes none of the others
    # (chrF 18.3 -> 19.4, exact match unchanged, 32% fewer tokens decoded), where repetition_penalty 1.1 / 1.2 and
    # no_repeat_ngram_size 3 rewrite 39 / 45 / 11 of the 45 answers that did not loop (exact match 3.3% -> 1.7 /
    # 0 / 3.3%). 2 copies also cut legitimate pairs ("mv -f /path/to/file.txt /path/to/file.txt"); 4 let loops
    # through (3.3% still loop).
    stop_repeats: int = Field(3, ge=0, description="repetition stop: end an answer once it ends in this many "
                              "copies in a row of one n-gram of up to 16 tokens (the copies covering at least 12 "
                              "tokens) and keep its first copy; 0 disables it. The default stopped every loop of "
                              "greedy answers without changing any other answer (benchmarks/looping.py)")

    @model_validator(mode="after")
    def _check_repeats(self) -> GenerationSettings:
        if self.stop_repeats == 1:
            raise ValueError("stop_repeats must be 0 (off) or at least 2 (one copy is not a repetition)")
        return self


class EvalOptions(Strict):
    """The flags of `lmtailor eval` (checked before anything is loaded)."""

    generate: int = Field(40, ge=0, description="examples answered by generation and scored; 0: loss only")
    max_length: int | None = Field(None, ge=2, description="truncation in tokens")
    context: int | None = Field(None, ge=2, description="perplexity window in tokens")
    stride: int | None = Field(None, ge=1, description="tokens the perplexity window advances")

    @model_validator(mode="after")
    def _check_stride(self) -> EvalOptions:
        window = self.context or self.max_length or 512  # evaluate_perplexity's default window
        if self.stride is not None and self.stride > window:
            raise ValueError(f"--stride ({self.stride}) must not exceed the window --context ({window})")
        return self


def explain_flags(err: ValidationError, model: type[BaseModel] | None = None) -> ConfigError:
    """One-line ConfigError for command-line options validated by a pydantic model: `--flag-name: what; got X`."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:
        return ConfigError(msg)
    flag = "--" + loc[0].replace("_", "-")
    msg = msg.replace("Input should be", "must be")
    return ConfigError(f"{flag}: {msg}; got {first.get('input')!r}")


class EvalSettings(Strict):
    before_after: bool = Field(True, description="evaluate the untrained start too and print a comparison")
    generate_examples: int | None = Field(None, ge=0, description="held-out examples answered by generation and "
                                          "scored (default: the objective's, 40 for sft/clm, 200 for seq2seq)")
    samples: int = Field(3, ge=0, description="sample answers shown in the report")
    max_examples: int | None = Field(None, ge=1, description="cap on held-out examples used for loss")


class ScratchSettings(Strict):
    """A model built from a config instead of loaded (base_model is then ignored)."""

    arch: Literal["llama", "bert", "t5"] = Field("llama", description="llama: decoder (clm); bert: encoder "
                                                  "(mlm); t5: encoder-decoder (span)")
    tokenizer: str = Field(..., description="tokenizer folder (see `lmtailor tokenizer train`)")
    layers: int = Field(4, ge=1, description="transformer blocks (t5: in each of encoder and decoder)")
    hidden: int = Field(256, ge=8, description="model width")
    heads: int = Field(4, ge=1, description="attention heads")
    kv_heads: int | None = Field(None, ge=1, description="llama: key/value heads (default: heads)")
    intermediate: int | None = Field(None, ge=8, description="MLP width (default: 4 x hidden, llama 8/3 x hidden)")
    context: int = Field(512, ge=8, description="maximum positions")
    vocab: int | None = Field(None, ge=8, description="vocabulary size (default: the tokenizer's)")


class PretrainSettings(Strict):
    """Model and corpus options of the pretraining objectives (clm, mlm, span); each objective's own knobs live
    in its section (`mlm:`, `span:`, `clm:`)."""

    scratch: ScratchSettings | None = Field(None, description="build the model from this config")
    cache: bool = Field(False, description="tokenize the corpus once into a memory-mapped Arrow cache of "
                        "max_length blocks (reused while tokenizer and corpus are unchanged)")
    keep_layers: int | None = Field(None, ge=1, description="depth pruning: keep only the first N layers")
    rope_factor: float | None = Field(None, gt=1, description="context extension: linear RoPE scaling factor "
                                      "(max positions grow by it)")


class SoftPromptSettings(Strict):
    virtual_tokens: int = Field(20, ge=1, description="method=prompt_tuning/prefix_tuning: trained virtual tokens")
    init_text: str | None = Field(None, description="prompt_tuning: start the virtual tokens from the embeddings "
                                  "of this text (random otherwise)")


# ---- objective sections ------------------------------------------------------------------------------------
# An objective may own a settings model; a recipe sets it under the objective's name (`classify: {labels: ...}`).
# Objectives register their model here (lmtailor.objectives.registry.register_objective), so this module stays the
# bottom layer and still validates every section.
OBJECTIVE_SETTINGS: dict[str, type[BaseModel]] = {}

# Keys that moved into an objective's section; "{objective}" stands for the recipe's objective.
MOVED_KEYS = {
    **{f"task.{k}": f"classify.{k}" for k in ("labels", "multi_label", "label_separator", "threshold",
                                               "class_weights", "sampling", "augment")},
    "task.label_smoothing": "{objective}.label_smoothing", "task.dropout": "{objective}.dropout",
    "task.max_target_length": "seq2seq.max_target_length", "task.num_beams": "seq2seq.num_beams",
    "task.generate_examples": "eval.generate_examples",
    "pretrain.mlm_probability": "mlm.probability", "pretrain.whole_word_mask": "mlm.whole_word_mask",
    "pretrain.nsp": "mlm.nsp", "pretrain.span_density": "span.density",
    "pretrain.span_mean_length": "span.mean_length", "pretrain.eval_context": "clm.eval_context",
    "pretrain.eval_stride": "clm.eval_stride",
}


# objective -> the validation metrics metric_for_best may name for it (registry.register_objective(metrics=...)), so
# a recipe naming another is refused when it is read, before any run folder exists.
OBJECTIVE_METRICS: dict[str, tuple[str, ...]] = {}


def register_metrics(objective: str, metrics: tuple[str, ...]) -> None:
    """Let `metric_for_best` name these metrics (and loss) for `objective`."""
    if not metrics or not all(isinstance(m, str) and m.isidentifier() for m in metrics):
        raise ValueError(f"objective {objective!r}: metrics must be metric names, got {metrics!r}")
    OBJECTIVE_METRICS[objective] = tuple(dict.fromkeys(("loss", *metrics)))


def _check_best_metric(objective: str, metric: str) -> None:
    """metric_for_best names a metric the objective reports; else a one-line error with the allowed values."""
    allowed = OBJECTIVE_METRICS.get(objective)
    if allowed is None:  # an unknown objective is refused by name later (get_objective); the names all know
        allowed = tuple(dict.fromkeys([*BEST_METRICS, *(m for ms in OBJECTIVE_METRICS.values() for m in ms)]))
    if metric in allowed:
        return
    others = sorted(name for name, ms in OBJECTIVE_METRICS.items() if metric in ms)
    close = difflib.get_close_matches(metric, allowed, n=1)
    what = (f"objective {objective} does not report {metric!r} (a metric of {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''})" if others else
            f"unknown metric {metric!r} for objective {objective}")
    raise ConfigError(f"config key 'metric_for_best': {what}",
                      (f"did you mean {close[0]}? " if close else "")
                      + f"allowed values for {objective}: {', '.join(allowed)}")


def register_settings(objective: str, model: type[BaseModel]) -> None:
    """Let recipes set `objective: NAME` options under the key NAME, validated by `model`."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"objective {objective!r}: settings must be a pydantic model class")
    if objective in RunConfig.model_fields:
        raise ValueError(f"objective {objective!r}: its settings would shadow the config key {objective!r}")
    OBJECTIVE_SETTINGS[objective] = model


Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]


def _default_trackers() -> list[Tracker]:
    return ["tensorboard"]


STRATEGIES = ("auto", "ddp", "fsdp", "fsdp_grad_op", "deepspeed_zero2", "deepspeed_zero3")


class DistributedSettings(Strict):
    """How several processes (`accelerate launch --num_processes N`, one or many machines) share the work."""

    strategy: Literal["auto", "ddp", "fsdp", "fsdp_grad_op", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "auto", description="auto/ddp: every process holds the whole model, gradients averaged; fsdp: parameters, "
        "gradients and optimizer state sharded over the processes (torch FSDP2, one unit per decoder layer, "
        "ZeRO-3 like); fsdp_grad_op: the same but parameters stay gathered between forward and backward "
        "(ZeRO-2 like); deepspeed_*: refused (not supported by this build)")
    timeout: float = Field(600, gt=0, description="seconds a process waits for the others in one collective "
                           "before the run ends with an error (a lost node); checkpoints let it resume")


class RunConfig(Strict):
    """A recipe. Besides these keys, the chosen objective's own settings sit under its name (see OBJECTIVE_SETTINGS):
    `classify:`, `seq2seq:`, `mlm:`, `span:`, `clm:`; a section of another objective is an error."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # extra keys: objective sections, checked
    name: str = Field("run", description="run name; the run folder is output_dir")
    output_dir: str | None = Field(None, description="run folder (default runs/<name>)")
    base_model: str = Field("smollm2-135m-instruct", description="hub id, local folder, .gguf file or bundled name")
    trust_remote_code: bool = False
    objective: str = Field("sft", description="registered objective: sft, clm, mlm (encoders), span "
                           "(encoder-decoders), classify, seq2seq; its settings go under its own name")
    method: Literal["lora", "qlora", "full", "freeze", "prompt_tuning", "prefix_tuning"] = Field(
        "lora", description="what is trained: LoRA adapters, LoRA on a 4-bit NF4 base (qlora, bitsandbytes), every "
                            "weight, the last layers, or a soft prompt "
                            "(virtual token embeddings / per-layer prefixes, the model frozen)")
    unfreeze_last_n: int = Field(2, ge=0, description="method=freeze: layers left trainable (plus the head)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    soft_prompt: SoftPromptSettings = Field(default_factory=SoftPromptSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)

    train_on_prompt: bool = Field(False, description="compute the loss on every token, not only assistant turns")
    max_length: int = Field(512, ge=8, description="examples longer than this many tokens are truncated")
    packing: bool = Field(True, description="pack examples into rows without padding")
    pack_length: int = Field(1024, ge=8, description="tokens per packed row")
    group_by_length: bool = Field(False, description="batches of similar-length examples (sorted within seeded groups "
                                  "of 64 batches, the batches then shuffled): less padding where examples are padded "
                                  "rather than packed (classify, seq2seq); chosen on for those when unset")
    share_prefix: bool = Field(True, description="packed rows hold a prompt prefix shared by all their examples "
                               "(e.g. the system prompt) once; exact, and saves its compute")

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    budget: float | None = Field(None, gt=0, description="wall-clock time for the training steps (90s, 15m, 2h or "
                                 "seconds): the step time is measured on the first batches before training and the "
                                 "number of steps cut to fit (never raised above epochs/max_steps); the fitted "
                                 "max_steps is written to the resolved config")
    budget_covers: Literal["steps", "run"] = Field(
        "steps", description="what budget pays for: the training steps and their validations (steps; the timing "
        "steps and a head's fitting included), or the whole run from its start (run: loading, the baselines and the "
        "before evaluation as measured, the after evaluation charged at the before evaluation's time)")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step, over all processes")
    micro_batch_size: int | None = Field(None, ge=1, description="examples per forward pass on one process "
                                         "(default: the whole share of a step; smaller values accumulate gradients)")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="training dtype; auto is float32 on CPU and bfloat16 on a GPU that supports it"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="compute precision over float32 weights: auto = bf16 on a GPU that has it, fp16 with loss "
        "scaling on one that does not, bf16 on a CPU with bf16 matrix units (AMX or AVX512-BF16), else none; fp16 "
        "needs a GPU; used when dtype is auto")
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations in the backward "
                                         "pass instead of keeping them: less memory, about a third more compute")
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw_8bit keeps the Adam moments in "
                                                      "8 bits (bitsandbytes): a quarter of the optimizer memory")
    release_memory: bool = Field(False, description="Linux with glibc: give freed tensor memory back to the system "
                                 "at once (each allocation of 64 KiB or more gets pages of its own) instead of "
                                 "keeping it for reuse: a CPU run's peak resident memory 9-22% lower and its steps "
                                 "10-60% slower (measured; see lmtailor.memory.release_freed_memory)")
    report_to: list[Tracker] = Field(
        default_factory=_default_trackers, description="experiment trackers (through Accelerate): mlflow logs "
        "to MLFLOW_TRACKING_URI (default: <run>/mlruns), wandb runs offline unless WANDB_MODE is set")
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    seed: int = Field(42, ge=0, le=SEED_MAX, description=f"random seed, 0 to {SEED_MAX} (numpy's range)")

    eval_every: int = Field(0, ge=0, description="validation every N steps (0: only at the end)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: none)")
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping_patience: int = Field(0, ge=0, description="stop after N evaluations without improvement")
    resume: bool = Field(False, description="continue from the newest complete checkpoint of the run folder")
    overwrite: bool = Field(False, description="replace a finished run in the same run folder")
    encrypt_outputs: bool | None = Field(None, description="write the run's model, checkpoints, reports and "
                                         "metrics encrypted with the key of privacy.key_env / key_file / "
                                         "passphrase_env; resume, eval, generate, serve and export read them with "
                                         "it. Unset: on when a data file is encrypted")

    eval: EvalSettings = Field(default_factory=EvalSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    metric_for_best: str = Field("loss", description="validation metric that picks the best checkpoint and drives "
                                 "early stopping: loss, or one the objective reports (accuracy, macro_f1, rougeL, "
                                 "bleu, chrf, exact_match); others than loss are computed at every eval_every")

    tune: dict[str, list[Any]] = Field(default_factory=dict, description="`lmtailor tune` search space: "
                                       "{key: [low, high, log|uniform|int]} or {key: [choice, ...]}")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_false(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value, "budget") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size})")
        if self.retrieval.kb and self.data.retrieved_examples:
            raise ValueError("retrieval.kb and data.retrieved_examples both rewrite the request; use one of them")
        if self.packing and self.pack_length < self.max_length:
            raise ValueError(f"pack_length ({self.pack_length}) must be at least max_length ({self.max_length})")
        # Per objective, before any folder exists (a value that the objective may still not report for some data,
        # e.g. micro_f1 of a single-label task, is refused at the first validation: loop._task_metrics).
        _check_best_metric(self.objective, self.metric_for_best)
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(extra):
            extra[key] = _objective_section(key, extra[key], self.objective)
        owned = OBJECTIVE_SETTINGS.get(self.objective)
        if owned is not None and self.objective not in extra:
            extra[self.objective] = owned()
        return self

    @property
    def settings(self) -> Any:
        """The chosen objective's own settings (its section), or None if it declares none."""
        return (self.__pydantic_extra__ or {}).get(self.objective)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


def parse_duration(text: str | float | None, key: str = "--timeout") -> float | None:
    """'30m', '2h', '90s', '45' (seconds) -> seconds; None stays None.

    Raises:
        ConfigError: not a duration (the message names `key`).
    """
    if text is None or isinstance(text, int | float):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ConfigError(f"{key} {text!r} is not a duration", "write e.g. 90s, 30m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _objective_section(key: str, value: Any, objective: str) -> BaseModel:
    """Validate one objective section of a recipe; a section of another objective or an unknown key is an error."""
    top = sorted(RunConfig.model_fields)
    if key not in OBJECTIVE_SETTINGS:
        close = difflib.get_close_matches(key, top + sorted(OBJECTIVE_SETTINGS), n=1)
        moved = [f"{k} -> {v.format(objective=objective)}" for k, v in MOVED_KEYS.items() if k.startswith(key + ".")]
        hint = (f"these keys moved: {', '.join(moved)}; " if moved else
                f"did you mean {close[0]}? " if close else "") + "allowed keys: " + ", ".join(
            top + ([objective] if objective in OBJECTIVE_SETTINGS else []))
        raise ConfigError(f"unknown config key '{key}'", hint)
    model = OBJECTIVE_SETTINGS[key]
    if key != objective:
        fields = value.keys() if isinstance(value, dict) else []
        first = next(iter(fields), None)
        shown = f"{key}.{first}" if first else key
        own = OBJECTIVE_SETTINGS.get(objective)
        allowed = (f"objective {objective} takes: " + ", ".join(f"{objective}.{k}" for k in own.model_fields)
                   if own else f"objective {objective} has no settings of its own")
        raise ConfigError(f"config key '{shown}' belongs to objective {key}, but the objective is {objective}",
                          f"set objective={key}, or drop it; {allowed}")
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value if value is not None else {})
    except ValidationError as e:
        raise explain(e, "", model, prefix=key) from None


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _allowed_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def allowed_keys() -> list[str]:
    """Every dotted key a recipe or override may set (objective sections included)."""
    return _allowed_keys(RunConfig) + [k for name, model in OBJECTIVE_SETTINGS.items()
                                       for k in _allowed_keys(model, f"{name}.")]


def _sub_model(path: tuple[Any, ...], root: type[BaseModel] | None = None) -> type[BaseModel]:
    model: type[BaseModel] = root or RunConfig
    for part in path:
        field = model.model_fields.get(str(part))
        # `X | None` sections: look through the union for the model class
        options = typing.get_args(field.annotation) or (field.annotation,) if field is not None else ()
        sub = next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)
        if sub is None:
            break
        model = sub
    return model


def explain(err: ValidationError, source: str, root: type[BaseModel] | None = None, prefix: str = ""
            ) -> ConfigError:
    """One-line ConfigError for a pydantic error of `root` (default RunConfig): the key, the value, the fix.

    `prefix` is the dotted path of `root` inside a recipe (e.g. "classify" for an objective's section).
    """
    first = err.errors()[0]
    loc = (*prefix.split("."), *first["loc"]) if prefix else tuple(first["loc"])
    where = f"{source}: " if source else ""
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        model = _sub_model(tuple(first["loc"])[:-1], root)
        parent = ".".join(str(p) for p in loc[:-1])
        allowed = [f"{parent}.{k}" if parent else k for k in model.model_fields]
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
        hint = (f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else "") + \
            "allowed keys: " + ", ".join(allowed)
        return ConfigError(f"{where}unknown config key '{key}'", hint)
    given = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:
        return ConfigError(f"{where}{msg}")
    if first["type"] == "literal_error":
        msg = msg.replace("Input should be", "allowed values are")
    extra = f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return ConfigError(f"{where}config key '{key}': {msg}; got {given!r}{extra}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`lora.r=16` -> (['lora', 'r'], 16); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value", "example: lr=1e-4 lora.r=16")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _fix_float_strings(data: Any) -> Any:
    # PyYAML follows YAML 1.1, where `1e-4` is a string; recipes mean a number.
    if isinstance(data, dict):
        return {k: _fix_float_strings(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_float_strings(v) for v in data]
    if isinstance(data, str):
        try:
            return float(data) if any(c in data.lower() for c in "e.") and data.strip()[0] in "+-.0123456789" \
                else data
        except ValueError:
            return data
    return data


# A YAML document whose aliases would expand past this many nodes is refused (a 600-byte "billion laughs" file
# expands to gigabytes once walked); documents without aliases are bounded by their own size and never refused.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses recursive aliases and aliases expanding past MAX_YAML_NODES nodes."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes `root` expands to, each alias counted in full (post-order, iterative, shared nodes once)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES and sizes[key] > len(sizes):  # more than the distinct nodes: aliases
                raise yaml.composer.ComposerError(None, None, f"its aliases expand to more than {MAX_YAML_NODES} "
                                                  "values (an alias bomb?); write the values out", node.start_mark)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the node that holds it (recursive "
                                              "alias)", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, bounded: recursive aliases and alias bombs raise a yaml.MarkedYAMLError with a line.

    Raises:
        yaml.YAMLError: not valid YAML, or refused aliases.
    """
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}", "give the path of a YAML recipe, e.g. configs/quickstart.yaml")
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(problem).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys to values, got {type(loaded).__name__}")
    return _fix_float_strings(loaded)


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a recipe mapping into a RunConfig.

    Raises:
        ConfigError: unknown or moved key, a section of another objective, a bad value (prefixed by `source`).
    """
    _check_moved(data, source)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise explain(e, source) from None
    except ConfigError as e:  # raised while checking an objective section
        raise ConfigError(f"{source}: {e.message}", e.hint) from None


def _check_moved(data: dict[str, Any], source: str) -> None:
    objective = str(data.get("objective", "sft"))
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            target = new.format(objective=objective)
            raise ConfigError(f"{source}: config key '{old}' moved to '{target}'",
                              f"objective settings live under the objective's name: write {target}=...")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from defaults), apply `key=value` overrides, validate.

    Raises:
        ConfigError: unknown key (with the allowed ones), bad value, unreadable file.
    """
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = build_config(data, str(path) if path else "config")
    if path and "output_dir" not in data and "name" not in data:
        cfg.name = Path(path).stem
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
