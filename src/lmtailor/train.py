"""The training loop, on Hugging Face Accelerate: one process, DDP, FSDP or DeepSpeed via `accelerate launch`.

Read top to bottom: data -> tokenizer and model -> what trains -> "before" evaluation -> optimizer and schedule ->
resume -> steps (micro-batches, accumulation, clipping, logging, evaluation, early stopping, checkpoints) ->
final model, metrics, plots, report and the before/after table.

A step consumes `batch_size` examples in a fixed seeded order (the data position is the step number, which is what
makes resume exact). Each process takes every world_size-th example of the step and splits its share into
micro-batches; the loss is the sum over supervised tokens divided by the step's total supervised token count, so
one process with accumulation and N processes compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmtailor.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    trainable_state,
)
from lmtailor.config import RunConfig, dump_config
from lmtailor.errors import CheckpointError, ConfigError
from lmtailor.evaluate import comparison_table, perplexity
from lmtailor.io import atomic_write_json, atomic_write_text
from lmtailor.models import add_lora, freeze_all_but_last, load_tokenizer, param_counts, save_model
from lmtailor.objectives import Objective, get_objective, item_tokens
from lmtailor.report import write_report
from lmtailor.tasks.metrics import higher_is_better

ADAPTER_METHODS = ("lora", "prompt_tuning", "prefix_tuning")  # PEFT wrappers: the base model is their "before"

log = logging.getLogger(__name__)


def step_batches(n_examples: int, batch_size: int, seed: int, world: int,
                 weights: np.ndarray | None = None) -> list[np.ndarray]:
    """The example indices of every step of one epoch: a seeded shuffle cut into batches.

    With `weights` (one per example, e.g. task.sampling=balanced) the epoch instead draws n_examples indices with
    replacement in proportion to them: same length, so the schedule and resume position do not change.
    A final batch smaller than the number of processes is dropped (every process needs one example).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_examples) if weights is None else rng.choice(n_examples, n_examples, p=weights)
    batches = [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]
    return [b for b in batches if len(b) >= world]


def plan_steps(cfg: RunConfig, n_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps)."""
    per_epoch = len(step_batches(n_train, cfg.batch_size, 0, world))
    if per_epoch == 0:
        raise ConfigError(f"only {n_train} training example(s) for batch_size={cfg.batch_size} on {world} process(es)",
                          "add data or lower batch_size")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return per_epoch, total


def batch_at(step: int, per_epoch: int, n_train: int, cfg: RunConfig, world: int,
             weights: np.ndarray | None = None) -> np.ndarray:
    """Example indices of global step `step` (0-based); epoch e is shuffled (or drawn) with seed + e."""
    epoch, k = divmod(step, per_epoch)
    return step_batches(n_train, cfg.batch_size, cfg.seed + epoch, world, weights)[k]


def _optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm weights and biases are not decayed (standard practice; decaying them hurts).
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def _prepare_run_dir(cfg: RunConfig, is_main: bool) -> Path:
    run_dir = cfg.run_dir
    if is_main and not cfg.resume and (run_dir / "model").exists() and not cfg.overwrite:
        raise ConfigError(f"run folder {run_dir} already holds a finished run",
                          "pick another name/output_dir, pass overwrite=true, or resume=true")
    if is_main and not cfg.resume and cfg.overwrite:
        for sub in ("checkpoints", "tb"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / "history.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunConfig, progress: bool = True,
          on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one recipe end to end and return its summary (also written to `<run>/metrics.json`).

    Args:
        cfg: the recipe.
        progress: show progress bars.
        on_eval: called on the main process after each validation with (step, history record); the record holds
            val_loss and, when cfg.metric_for_best names a task metric, every val_<metric>. An exception it
            raises (e.g. optuna.TrialPruned) ends the run there and propagates.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from lmtailor.data.validate import load_datasets
    from lmtailor.pretrain.corpus import streams_corpus

    cuda = torch.cuda.is_available()
    bf16 = cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported()
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    say = print if main else (lambda *a, **k: None)
    set_seed(cfg.seed)
    run_dir = _prepare_run_dir(cfg, main)
    objective = get_objective(cfg.objective)
    train_on_prompt = cfg.train_on_prompt or objective.train_on_prompt

    # ---- data -------------------------------------------------------------------------------------------------
    # pretrain.cache: the documents go from the files into the token cache (after the model), never all in memory
    streamed = streams_corpus(cfg)
    train_ex, val_ex, data_stats = ([], [], {}) if streamed else load_datasets(cfg.data)
    if cfg.data.prompt_task:  # fine-tune on a prompt task's own rendering (see `lmtailor compare`)
        from lmtailor.prompting.task import chat_examples, load_task, make_items

        ptask = load_task(cfg.data.prompt_task)
        train_ex, val_ex = (chat_examples(ptask, make_items(ex, ptask), cfg.data.prompt_template)
                            for ex in (train_ex, val_ex))
    privacy_audit: dict[str, Any] = {}
    if cfg.privacy.scrub and not streamed:  # streamed documents are scrubbed one by one as they are cached
        from lmtailor.privacy.scrub import scrub_for_run

        train_ex, val_ex, privacy_audit = scrub_for_run(train_ex, val_ex, cfg.privacy.mode, cfg.privacy.salt_env,
                                                        cfg.privacy.ner, run_dir if main else None)
        data_stats["pii_replaced"] = privacy_audit["total"]
    with acc.main_process_first():  # the first load may convert a bundled model into the cache
        model_dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        model: Any
        model, tok = objective.load(cfg, model_dtype)
    if streamed:
        from lmtailor.pretrain.objectives import prepare_cached

        with acc.main_process_first():  # the main process writes the cache; the others then map it
            train_seqs, val_seqs, val_ex, data_stats, privacy_audit = prepare_cached(tok, cfg,
                                                                                     run_dir if main else None)
    else:
        train_seqs, train_stats = objective.prepare(tok, train_ex, cfg, train_on_prompt)
        val_ex = val_ex[: cfg.eval.max_examples]
        val_seqs, _ = objective.prepare(tok, val_ex, cfg, train_on_prompt)
        data_stats.update({f"train_{k}": v for k, v in train_stats.items()}, val_items=len(val_seqs))
    if not train_seqs:
        raise ConfigError("no training example has anything to learn from",
                          "check data.format and that examples have assistant turns, text or labels")

    # ---- what trains ------------------------------------------------------------------------------------------
    if cfg.method == "lora":
        # PEFT's task type follows the head the objective loaded (causal LM, classification, seq2seq, ...)
        model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    elif cfg.method == "freeze":
        freeze_all_but_last(model, cfg.unfreeze_last_n)
    elif cfg.method in ("prompt_tuning", "prefix_tuning"):
        from lmtailor.models import add_soft_prompt, resolve_model

        model = add_soft_prompt(model, cfg.method, cfg.soft_prompt.virtual_tokens, cfg.soft_prompt.init_text,
                                resolve_model(cfg.base_model))
    trainable, total = param_counts(model)
    base_name = f"scratch {cfg.pretrain.scratch.arch}" if cfg.pretrain.scratch else cfg.base_model
    say(f"model {base_name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({cfg.method}); "
        f"data: {len(train_seqs)} train / {len(val_seqs)} validation items; "
        + ", ".join(f"{k.removeprefix('train_')} {v}" for k, v in data_stats.items() if k.startswith("train_")))
    model.to(acc.device)

    # ---- before ----------------------------------------------------------------------------------------------
    before: dict[str, Any] = {}
    if main and cfg.eval.before_after and (val_seqs or val_ex):
        ctx = model.disable_adapter() if cfg.method in ADAPTER_METHODS else contextlib.nullcontext()
        with ctx:
            before = objective.evaluate(model, tok, val_seqs, val_ex, cfg, label="before:", progress=progress)
    acc.wait_for_everyone()

    # ---- optimizer, schedule, resume --------------------------------------------------------------------------
    from transformers import get_scheduler

    per_epoch, total_steps = plan_steps(cfg, len(train_seqs), world)
    sample_weights = None
    if cfg.task.sampling == "balanced":  # a pure function of the labels: resume redraws the same epochs
        from lmtailor.tasks.classify import balanced_weights

        sample_weights = balanced_weights(train_seqs)
    optimizer = _optimizer(model, cfg)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    loss_module = objective.build(model)
    loss_module, optimizer = acc.prepare(loss_module, optimizer)
    state: dict[str, Any] = {"step": 0, "best": None, "bad_evals": 0, "history": [], "tokens": 0, "elapsed": 0.0}
    if cfg.resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise CheckpointError(f"resume=true but {run_dir}/checkpoints holds no complete checkpoint",
                                  "run without resume, or set save_every so checkpoints are written")
        state = load_checkpoint(ckpts[-1], model, optimizer, scheduler, rank)
        if main:  # drop what the crashed process logged after this checkpoint, and its half-written folders
            atomic_write_text(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
            for stale in (run_dir / "checkpoints").glob(".step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        say(f"resumed from {ckpts[-1]} at step {state['step']}")

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    # ---- steps --------------------------------------------------------------------------------------------------
    best_weights: dict[str, torch.Tensor] | None = None
    bar = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step", disable=not (main and progress),
               dynamic_ncols=True)
    t_start = time.perf_counter() - state["elapsed"]
    stopped_early = False
    model.train()
    while state["step"] < total_steps:
        step = state["step"]
        batch_idx = batch_at(step, per_epoch, len(train_seqs), cfg, world, sample_weights)
        step_seqs = [train_seqs[i] for i in batch_idx]
        mine = step_seqs[rank::world]
        size = cfg.micro_batch_size or len(mine)
        micro = [objective.collate(mine[i:i + size], tok, cfg) for i in range(0, len(mine), size)]
        # the step's loss is a mean over all its loss terms, on every process together
        n_global = sum(objective.count(b) for b in micro)
        if world > 1:
            n_global = int(acc.reduce(torch.tensor(n_global, device=acc.device), "sum"))
        n_global = max(n_global, 1)
        loss_sum = torch.zeros((), device=acc.device)
        for j, batch in enumerate(micro):
            sync = j == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(loss_module):
                loss, _ = loss_module(**{k: v.to(acc.device) for k, v in batch.items()})
                # DDP averages gradients over processes; scale so the result is the global token mean.
                acc.backward(loss * world / n_global)
            loss_sum += loss.detach()
        if cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(loss_module.parameters(), cfg.max_grad_norm))
        else:
            grad_norm = float("nan")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        state["tokens"] += sum(item_tokens(s) for s in step_seqs)
        state["elapsed"] = time.perf_counter() - t_start
        train_loss = float(acc.reduce(loss_sum, "sum")) / n_global
        record: dict[str, Any] = {"step": step, "epoch": round(step / per_epoch, 3), "loss": train_loss,
                                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                  "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9)}

        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps) and val_seqs:
            val_loss = _distributed_val_loss(acc, loss_module, objective, val_seqs, tok, cfg)
            record.update(val_loss=val_loss, val_perplexity=perplexity(val_loss))
            if cfg.metric_for_best != "loss":
                record.update(_task_metrics(acc, model, objective, tok, val_seqs, val_ex, cfg))
            model.train()
            score = record[f"val_{cfg.metric_for_best}"]
            sign = 1.0 if higher_is_better(cfg.metric_for_best) else -1.0
            if state["best"] is None or sign * (score - state["best"]) > 1e-6:
                state["best"], state["bad_evals"], state["best_step"] = score, 0, step
                best_weights = trainable_state(model)
            else:
                state["bad_evals"] += 1
                if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                    stopped_early = True
        state["history"].append(record)
        if main:
            with open(run_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", *(k for k in record if k.startswith("val_"))):
                    if key in record and not math.isnan(record[key]):
                        writer.add_scalar(f"train/{key}" if "val" not in key else f"eval/{key}", record[key], step)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if on_eval is not None and main and "val_loss" in record:
            on_eval(step, record)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
            if main:
                save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", acc.unwrap_model(loss_module).model,
                                optimizer, scheduler, rngs, state)
                prune_checkpoints(run_dir, cfg.keep_checkpoints)
            acc.wait_for_everyone()
        if stopped_early:
            say(f"\nearly stopping at step {step}: validation {cfg.metric_for_best} has not improved for "
                f"{cfg.early_stopping_patience} evaluations (best {state['best']:.4f})")
            break
    bar.close()
    if writer is not None:
        writer.close()

    # ---- final model, after, report -----------------------------------------------------------------------------
    acc.wait_for_everyone()
    model = acc.unwrap_model(loss_module).model
    if best_weights is not None and (cfg.early_stopping_patience or cfg.metric_for_best != "loss"):
        from lmtailor.checkpoint import load_trainable

        load_trainable(model, best_weights)
    summary: dict[str, Any] = {}
    if main:
        save_model(model, tok, run_dir / "model")
        after = objective.evaluate(model, tok, val_seqs, val_ex, cfg, label="after:",
                                   progress=progress) if (val_seqs or val_ex) else {}
        summary = {
            "run_dir": str(run_dir), "base_model": base_name, "method": cfg.method, "objective": cfg.objective,
            "steps": state["step"], "stopped_early": stopped_early, "trainable_params": trainable,
            "total_params": total, "train_seconds": round(state["elapsed"], 2),
            "train_tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "world_size": world,
            "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
            "best": {"metric": cfg.metric_for_best, "value": state["best"], "step": state.get("best_step")},
            "data": data_stats, "before": before, "after": after,
            **({"privacy": privacy_audit} if privacy_audit else {}),
        }
        atomic_write_json(run_dir / "metrics.json", summary)
        write_report(run_dir, cfg, state["history"], summary)
        say(f"\nrun folder: {run_dir} ({state['step']} steps in {state['elapsed']:.0f} s, "
            f"{summary['train_tokens_per_s']:.0f} tokens/s)")
        if before and after:
            say("\n" + comparison_table(before, after, cfg.eval.samples))
    acc.wait_for_everyone()
    return summary


def _task_metrics(acc: Any, model: torch.nn.Module, objective: Objective, tok: Any, items: list[Any],
                  examples: list[Any], cfg: RunConfig) -> dict[str, float]:
    """The objective's scalar metrics on the validation split as val_<name>, computed on the main process.

    Raises:
        ConfigError: the objective does not report cfg.metric_for_best.
    """
    from accelerate.utils import broadcast_object_list

    found: list[Any] = [None]
    if acc.is_main_process:
        metrics = objective.evaluate(model, tok, items, examples, cfg, label="eval:", progress=False)
        found[0] = {f"val_{k}": float(v) for k, v in metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and k != "examples"}
    if acc.num_processes > 1:
        broadcast_object_list(found)
    scores: dict[str, float] = found[0]
    if f"val_{cfg.metric_for_best}" not in scores:
        names = ", ".join(["loss", *sorted(k.removeprefix("val_") for k in scores if k != "val_loss")])
        raise ConfigError(f"config key 'metric_for_best': objective {cfg.objective} does not report "
                          f"{cfg.metric_for_best!r}", f"allowed values are {names}")
    scores.pop("val_loss", None)  # the distributed token-mean loss of the loop stays the one recorded
    return scores


@torch.inference_mode()
def _distributed_val_loss(acc: Any, loss_module: torch.nn.Module, objective: Objective, items: list[Any], tok: Any,
                          cfg: RunConfig) -> float:
    """Mean validation loss over all processes (each takes every world_size-th item)."""
    # index by position: items may be a lazy (memory-mapped) sequence without slicing
    mine = [items[i] for i in range(acc.process_index, len(items), acc.num_processes)]
    size = cfg.micro_batch_size or cfg.batch_size
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for i in range(0, len(mine), size):
        batch = objective.collate(mine[i:i + size], tok, cfg)
        loss, n = loss_module(**{k: v.to(acc.device) for k, v in batch.items()})
        total += torch.stack([loss.double(), n.double()])
    total = acc.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1.0))


def check_recipe(cfg: RunConfig) -> str:
    """Validate a recipe without training: objective, data (every record), tokenizer and template."""
    from lmtailor.data.validate import load_datasets
    from lmtailor.pretrain.corpus import streams_corpus

    objective = get_objective(cfg.objective)
    streamed = streams_corpus(cfg)  # pretrain.cache: checked by building (or mapping) the cache a run would use
    train_ex, _, stats = ([], [], {}) if streamed else load_datasets(cfg.data)
    tok = load_tokenizer(cfg.pretrain.scratch.tokenizer if cfg.pretrain.scratch else cfg.base_model,
                         cfg.trust_remote_code)
    if streamed:
        from lmtailor.pretrain.objectives import prepare_cached

        items, _, _, stats, _ = prepare_cached(tok, cfg)
        item_stats = {k.removeprefix("train_"): v for k, v in stats.items() if k.startswith("train_")}
    else:
        items, item_stats = objective.prepare(tok, train_ex, cfg, cfg.train_on_prompt or objective.train_on_prompt)
    if not items:
        raise ConfigError("no training example has anything to learn from",
                          "check data.format and that examples have assistant turns, text or labels")
    per_epoch, total = plan_steps(cfg, len(items), 1)
    lengths = [item_tokens(s) for s in items]
    truncated = sum(n >= cfg.max_length for n in lengths)
    return (f"recipe OK: objective {cfg.objective}, method {cfg.method}, base {cfg.base_model}\n"
            f"data: {stats['format']} format, {stats['read']} records read, {stats['duplicates']} duplicates and "
            f"{stats['empty']} empty dropped, {stats['train']} train / {stats['val']} validation\n"
            f"items: {', '.join(f'{k} {v}' for k, v in item_stats.items())}; longest {max(lengths)} tokens, "
            f"{truncated} cut at max_length={cfg.max_length}\n"
            f"schedule: {per_epoch} steps per epoch, {total} steps of {cfg.batch_size} examples")
