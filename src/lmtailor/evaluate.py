"""`lmtailor eval`: a run folder, model folder or model name evaluated on a data file, by the objective it was
trained with (loss and generation metrics, task metrics, or perplexity of raw text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmtailor import crypto
from lmtailor.config import EvalOptions, GenerationSettings, RunConfig, build_config, explain_flags
from lmtailor.errors import CheckpointError, ConfigError
from lmtailor.io import atomic_write_bytes, atomic_write_json
from lmtailor.models import unwrap_peft
from lmtailor.objectives import get_objective
from lmtailor.outputs import check_output, replacing
from lmtailor.runs import Run

# The objective that evaluates a plain model folder (one without a run's config.yaml), by its kind.
KIND_OBJECTIVES = {"causal-lm": "sft", "seq-cls": "classify", "seq2seq": "seq2seq", "masked-lm": "mlm"}


def run_recipe(run: Run) -> RunConfig:
    """The recipe a run trained with (its config.yaml), or defaults for a plain model folder or name.

    Raises:
        CheckpointError: the run's config.yaml is not a valid recipe of this lmtailor version.
    """
    if not run.config:
        return build_config({"base_model": run.base_model, "objective": KIND_OBJECTIVES[run.kind]}, run.target)
    try:
        return build_config(dict(run.config), f"{run.path}/config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{run.path}/config.yaml is not a recipe this lmtailor reads: {e.message}",
                              e.hint or "retrain the run, or fix its config.yaml") from None


def evaluate_run(target: str, data: str, fmt: str = "auto", n_generate: int = 40, max_length: int | None = None,
                 out: str | None = None, gen: GenerationSettings | None = None, metric: str = "default",
                 context: int | None = None, stride: int | None = None, kb: str | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Evaluate a run or model on a data file with its objective's evaluation (what train reports as "after").

    Args:
        target: run folder, model folder or model name.
        data: data file, folder or catalog:NAME, in a format the objective reads.
        fmt: data format (auto: detected; labeled for classification runs).
        n_generate: examples answered by generation and scored (sft, seq2seq).
        max_length: truncation (default: the run's, else 512).
        out: write the metrics JSON here; artifacts (a confusion matrix) go beside it as NAME_eval.png.
        gen: decoding settings (default: the run's).
        metric: "perplexity" scores raw text with a sliding window of `context` tokens advancing by `stride`
            (pseudo-perplexity for masked LMs) instead.
        kb: a knowledge base whose passages go into every prompt (open book; a run trained with `retrieval.kb`
            uses its own base unless another is given here).
        force: replace an existing `out`, keeping it as `NAME.bak-<time>` (lmtailor.outputs).
    """
    from lmtailor.data.validate import load_examples

    try:  # the flags, before anything is loaded
        EvalOptions(generate=n_generate, max_length=max_length, context=context, stride=stride)
    except ValidationError as e:
        raise explain_flags(e) from None
    if out:
        check_output(out, force, folder=False, inputs=(data,) if Path(data).exists() else ())
    run = Run.open(target)
    if metric == "perplexity":
        return evaluate_perplexity(run, data, context or max_length or 512, stride, fmt, out, force)
    cfg = run_recipe(run)
    updates: dict[str, Any] = {"eval": cfg.eval.model_copy(update={"generate_examples": n_generate})}
    if max_length is not None:
        updates.update(max_length=max_length, pack_length=max(cfg.pack_length, max_length))
    if gen is not None:
        updates["generation"] = gen
    cfg = cfg.model_copy(update=updates)
    objective = get_objective(cfg)
    model, tok = run.load()
    ctx = objective.context(cfg)
    ctx.tokenizer = tok
    if run.kind == "seq-cls":  # the label set is the trained head's
        config = unwrap_peft(model).config
        ctx.labels = [config.id2label[i] for i in range(config.num_labels)]
    with crypto.use_keys(run.keys):
        examples = load_examples(data, "labeled" if fmt == "auto" and run.kind == "seq-cls" else fmt,
                                 system_prompt=run.system_prompt)
    if kb or cfg.retrieval.kb:  # open book: passages placed exactly as training, generate and serve place them
        from lmtailor.knowledge.raft import with_kb_passages

        settings = cfg.retrieval.model_copy(update={"kb": kb}) if kb else cfg.retrieval
        _, (examples,), _ = with_kb_passages([], [examples], settings)
    elif cfg.data.retrieved_examples:  # each request shown its nearest training pairs, as training showed them
        from lmtailor.generate import retrieval_for

        examples = retrieval_for(run.config).augment(examples)
    items, _ = objective.prepare(ctx, examples)
    result = objective.evaluate(ctx, model, items, examples, progress=False, desc="eval")
    metrics = {**result.metrics, "model": target, "data": data, "examples": result.metrics.get("examples",
                                                                                               len(examples))}
    folder = Path(out).parent if out else (run.path or Path("."))
    for name, png in result.artifacts.items():
        atomic_write_bytes(folder / f"{name}_eval.png", png)
    if out:
        with replacing(Path(out), force):
            _write_metrics(out, metrics, run, data)
    return metrics


def _write_metrics(out: str, metrics: dict[str, Any], run: Run, data: str) -> None:
    """The metrics JSON; encrypted when the run's model or the data is (its samples quote the data)."""
    from lmtailor.data.sources import local_files

    files = [] if data.startswith("catalog:") else local_files(data) or []
    if (run.model_dir is not None and crypto.has_encrypted_files(run.model_dir)) or any(
            crypto.is_encrypted(f) for f in files):
        crypto.write_bytes(out, (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode(), run.keys)
    else:
        atomic_write_json(out, metrics)


def evaluate_perplexity(run: Run, data: str, context: int = 512, stride: int | None = None, fmt: str = "auto",
                        out: str | None = None, force: bool = False) -> dict[str, Any]:
    """Sliding-window perplexity (causal LMs) or pseudo-perplexity (masked LMs) of held-out texts.

    Args:
        run: the opened run or model.
        data: held-out texts (file, folder, catalog:NAME); chats are scored on their joined turns.
        context: window length in tokens. stride: tokens the window advances (default context / 2).
    """
    from lmtailor.data.validate import load_examples
    from lmtailor.objectives.causal import sliding_window_perplexity
    from lmtailor.objectives.mlm import pseudo_perplexity
    from lmtailor.render import clip_text, encode

    with crypto.use_keys(run.keys):
        examples = load_examples(data, fmt)
    texts = [ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages or [])
             for ex in examples]
    metrics: dict[str, Any] = {"model": run.target, "data": data, "examples": len(examples)}
    model, tok = run.load()
    if run.kind == "masked-lm":
        seqs = [encode(tok, clip_text(tok, t, context))[:context] for t in texts]  # work bounded by context
        metrics.update(metric="pseudo_perplexity", pseudo_perplexity=pseudo_perplexity(model, tok, seqs, 2048),
                       context=context)
    elif run.kind == "causal-lm":
        stride = stride or max(1, context // 2)
        metrics.update(metric="perplexity", context=context, stride=stride,
                       perplexity=sliding_window_perplexity(model, tok, texts, context, stride))
    else:
        raise CheckpointError(f"{run.target} is a {run.kind} model: perplexity needs a causal or masked LM",
                              "evaluate it without --metric perplexity")
    if out:
        with replacing(check_output(out, force, folder=False), force):
            atomic_write_json(out, metrics)
    return metrics
