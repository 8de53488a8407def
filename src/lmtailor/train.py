"""Training a recipe, on Hugging Face Accelerate: one process, DDP, FSDP or DeepSpeed via `accelerate launch`.

`train` reads top to bottom: setup -> data -> model -> method (what trains) -> "before" evaluation -> optimizer,
schedule and resume -> the step loop (lmtailor.loop) -> final model, "after" evaluation, metrics and reports.
`check_recipe` (the `validate` verb) runs the same setup and data assembly without loading weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from lmtailor import crypto
from lmtailor.checkpoint import list_checkpoints, load_checkpoint, load_trainable, read_manifest, verify_checkpoint
from lmtailor.config import RunConfig, dump_config
from lmtailor.distributed import (
    SHARDED,
    check_launch,
    check_strategy,
    gather_full_state,
    load_sharded,
    lost_contact,
    lost_process,
    shard,
)
from lmtailor.errors import CheckpointError, ConfigError, LmtailorError, TrainingError
from lmtailor.fitting import EVALUATIONS
from lmtailor.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lmtailor.loop import (
    Loop,
    finite_weights,
    fit_steps_to_budget,
    item_tokens,
    keeps_best,
    make_optimizer,
    measure_step,
    plan_steps,
    run_steps,
    total_tokens,
)
from lmtailor.memory import (
    PeakMemory,
    cached_weight_casts,
    choose_precision,
    enable_gradient_checkpointing,
    quantize_4bit,
    release_freed_memory,
    store_frozen_in,
)
from lmtailor.models import add_lora, freeze_all_but_last, param_counts, save_model, unwrap_peft
from lmtailor.objectives import Evaluation, Objective, ObjectiveContext, get_objective
from lmtailor.report import comparison_table, likely_reasons, verdict, write_report, write_task_report
from lmtailor.rundata import RunData, build_run_data
from lmtailor.runfolder import RunFolder, compare_configs, new_identity, open_run_folder
from lmtailor.runs import read_config
from lmtailor.tracking import make_trackers, start_trackers

ADAPTER_METHODS = ("lora", "qlora", "prompt_tuning", "prefix_tuning")  # PEFT wrappers: the base model is their "before"


def train(cfg: RunConfig, progress: bool = True,
          on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one recipe end to end and return its summary (also written to `<run>/metrics.json`).

    Encrypted data files are read with the key the recipe's `privacy` section names, in memory.

    Args:
        cfg: the recipe.
        progress: show progress bars.
        on_eval: called on the main process after each validation with (step, history record); the record holds
            val_loss and, when cfg.metric_for_best names a task metric, every val_<metric>. An exception it
            raises (e.g. optuna.TrialPruned) ends the run there and propagates.
    """
    keys = cfg.privacy.key_source()
    with crypto.use_keys(keys), crypto.seal_outputs(_output_key(cfg, keys)):
        return _train(cfg, progress, on_eval)


def _output_key(cfg: RunConfig, keys: crypto.KeySource) -> crypto.Key | None:
    """The key the run's outputs are sealed with, or None: `encrypt_outputs`, which when unset follows the data
    (a model trained on encrypted data can recite it, so it is sealed too)."""
    sealed = cfg.encrypt_outputs
    if sealed is None:
        sealed = any(crypto.is_encrypted(f) for p in (cfg.data.path, cfg.data.val_path, cfg.data.test_path)
                     for f in _local_files(p))
    if not sealed:
        return None
    return keys.load()


def _local_files(path: str | None) -> list[Path]:
    from lmtailor.data.sources import local_files
    from lmtailor.errors import DataError

    if not path or path.startswith("catalog:"):
        return []
    try:
        return local_files(path) or []
    except DataError:  # a missing file: reading the data says so, with its own hint
        return []


def _train(cfg: RunConfig, progress: bool, on_eval: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    # ---- setup ----------------------------------------------------------------------------------------------------
    cuda = torch.cuda.is_available()
    check_launch(cfg, os.environ, cuda)  # before the Accelerator builds a plugin or a process group
    mixed, weight_dtype = choose_precision(cfg, cuda)
    if cfg.release_memory and not release_freed_memory():  # before the model is built: its tensors too
        raise ConfigError("release_memory=true needs a C library with mallopt (Linux with glibc); this one has none",
                          "set release_memory=false")
    trackers = make_trackers(cfg)
    # a process that waits longer than distributed.timeout for the others (a lost node) fails instead of hanging
    acc = Accelerator(cpu=not cuda, mixed_precision=mixed, log_with=trackers or None,
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout))])
    strategy = check_strategy(cfg, acc.distributed_type.name, cuda)
    main = acc.is_main_process
    set_seed(cfg.seed)
    setup = _Setup(mixed, weight_dtype, strategy, strategy in SHARDED and acc.num_processes > 1, trackers)
    with open_run_folder(cfg, main) as folder:  # checked, locked; the previous run stays until folder.start
        try:
            return _train_in(folder, acc, cfg, progress, on_eval, setup)
        except Exception as e:  # a collective outside the steps (setup, evaluation, final gather) fails the same way
            if acc.num_processes > 1 and not isinstance(e, LmtailorError) and lost_process(e):
                raise lost_contact(e, folder.path, cfg.distributed.timeout) from e
            raise


SAVE_S = 15.0  # budget_covers=run: kept for the final save and the reports


class Stopwatch:
    """Wall-clock seconds per phase of a run, in the order the phases first ran (a phase may run twice)."""

    def __init__(self) -> None:
        self.start = self.mark = time.monotonic()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.mark
        self.mark = now

    def elapsed(self) -> float:
        """Seconds since the watch started, up to now."""
        return time.monotonic() - self.start

    def seconds(self) -> dict[str, float]:
        """Each phase's seconds and their `total`, rounded to 0.1 s."""
        return {**{k: round(v, 1) for k, v in self.phases.items()}, "total": round(self.mark - self.start, 1)}

    def line(self, budget: float | None = None) -> str:
        """'time: load 12 s, steps 600 s, ...; 700 s in all', with how it compares to a whole-run budget."""
        total = self.mark - self.start
        text = "time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in self.phases.items()) \
            + f"; {total:.0f} s in all"
        if budget:
            over = total - budget
            text += f" ({over:.0f} s over the budget of {budget:.0f} s)" if over >= 1 else \
                f" (within the budget of {budget:.0f} s)"
        return text


@dataclass(frozen=True)
class _Setup:
    """What the process setup chose: precision, sharding strategy, trackers."""

    mixed: str
    weight_dtype: torch.dtype
    strategy: str
    sharded: bool
    trackers: list[Any]


def _train_in(folder: RunFolder, acc: Any, cfg: RunConfig, progress: bool,
              on_eval: Callable[[int, dict[str, Any]], None] | None, setup: _Setup) -> dict[str, Any]:
    from transformers import get_scheduler

    mixed, weight_dtype, strategy, sharded, trackers = (setup.mixed, setup.weight_dtype, setup.strategy,
                                                        setup.sharded, setup.trackers)
    clock = Stopwatch()  # where the run's wall time went: metrics.json "seconds" and the closing line
    main = acc.is_main_process
    say = print if main else (lambda *a, **k: None)
    run_dir = folder.path
    objective = get_objective(cfg)
    ctx = objective.context(cfg, run_dir)

    # ---- data and model (the main process first: it may convert a bundled model or write the token cache) --------
    with acc.main_process_first():
        data = build_run_data(objective, ctx, write_audit=main, world=acc.num_processes)
        cfg = ctx.cfg  # with the values chosen from the data (data.choices) filled in
        if data.choices:
            say("chosen from the data: " + "; ".join(str(c) for c in data.choices))
        memory = PeakMemory(acc.device)  # what the model, optimizer and steps add to the process
        model: Any = objective.model(ctx, weight_dtype)
    clock.lap("load")
    if objective.init is not None:  # every process fits the same (deterministic) weights; no adapter yet
        if cfg.method != "qlora":  # on the run's device (a 4-bit base is quantized onto it later, from the CPU)
            model.to(acc.device)
        # in the precision the steps run in: a linear probe's features do not need float32, and on a CPU with bf16
        # units its forward passes over the training texts ran several times slower in it
        half = mixed != "no"  # (not sharded yet: FSDP shards the model after this)
        with (acc.autocast() if half else contextlib.nullcontext(),
              cached_weight_casts(model, acc.device.type) if half else contextlib.nullcontext()):
            objective.init(ctx, model, data.train_items)
        clock.lap("head_init")
    init_s = clock.phases.get("head_init", 0.0)  # a budget pays for it: a slower fit leaves fewer steps, not later
    model = _apply_method(model, cfg, ctx.tokenizer, acc.device, mixed, frozen_half=not sharded)
    # the report's before and after evaluations run in float32 (as `eval`, `predict` and `serve` do), except where
    # the frozen weights are bf16: a float32 input cannot meet them, so those run in the steps' bf16
    report_precision = (acc.autocast if any(p.dtype == torch.bfloat16 for p in model.parameters()
                                            if not p.requires_grad) and mixed == "bf16" else contextlib.nullcontext)
    trainable, total = param_counts(model)
    base_name = f"scratch {cfg.pretrain.scratch.arch}" if cfg.pretrain.scratch else cfg.base_model
    say(f"model {base_name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({cfg.method}); "
        f"data: {len(data.train_items)} train / {len(data.val_items)} validation items; "
        + ", ".join(f"{k.removeprefix('train_')} {v}" for k, v in data.stats.items() if k.startswith("train_")))
    model.to(acc.device)
    clock.lap("load")

    # ---- baselines and before: the obvious alternatives and the untrained start, on the held-out split ---------
    report_items, report_examples, report_split = data.report_split()
    baselines: dict[str, dict[str, float]] = {}
    if main and objective.baseline is not None and data.train_examples and report_examples:
        baselines = objective.baseline(ctx, data.train_examples, report_examples)
    clock.lap("baselines")
    before, t_before = Evaluation(), time.monotonic()
    if main and cfg.eval.before_after and (report_items or report_examples):
        with (model.disable_adapter() if cfg.method in ADAPTER_METHODS else contextlib.nullcontext(),
              report_precision()):
            before = objective.evaluate(ctx, model, report_items, report_examples, progress=progress,
                                        desc="before")
    before_s = time.monotonic() - t_before  # the after evaluation will cost about as much
    acc.wait_for_everyone()
    clock.lap("before")

    # ---- optimizer, schedule (fitted to the budget), resume --------------------------------------------------------
    per_epoch, total_steps = plan_steps(cfg, len(data.train_items), acc.num_processes)
    if sharded:  # FSDP2 replaces the parameters by shards: the optimizer is built on them, Accelerate wraps only it
        loss_module = objective.build(ctx, model)
        shard(loss_module, model, strategy, acc.device, torch.bfloat16 if mixed == "bf16" else None)
        optimizer = acc.prepare(make_optimizer(model, cfg))
    else:
        loss_module, optimizer = acc.prepare(objective.build(ctx, model), make_optimizer(model, cfg))
    state: dict[str, Any] = {"step": 0, "best": None, "bad_evals": 0, "history": [], "tokens": 0, "elapsed": 0.0}
    loop = Loop(acc, cfg, objective, ctx, data, model, loss_module, optimizer, None, state, run_dir, sharded=sharded)
    casts = contextlib.ExitStack()  # left when the steps end: the budget's probe steps run with it too
    if mixed != "no" and not sharded:
        casts.enter_context(cached_weight_casts(model, acc.device.type))
    if cfg.budget:  # a resumed run keeps the schedule its first start fitted (written to its config.yaml)
        first = read_config(run_dir) if cfg.resume else {}
        chosen_eval = "eval_every" not in cfg.model_fields_set and cfg.eval_every > 0
        if first.get("max_steps"):
            total_steps, eval_every = int(first["max_steps"]), int(first.get("eval_every", cfg.eval_every))
        else:
            steps_s = cfg.budget - init_s
            if cfg.budget_covers == "run":  # what is left once loading, baselines, before and (as much) after are paid
                steps_s = cfg.budget - clock.elapsed() - before_s - SAVE_S
                say(f"budget {cfg.budget:g} s for the run: {clock.elapsed():.0f} s spent before training, "
                    f"{before_s:.0f} s kept for the after evaluation, {SAVE_S:.0f} s for saving")
            elif init_s >= 1:
                say(f"budget {cfg.budget:g} s: the head's fitting took {init_s:.0f} s of it")
            total_steps, eval_every = fit_steps_to_budget(loop, max(0.05 * cfg.budget, steps_s),
                                                          per_epoch, total_steps,
                                                          evaluations=EVALUATIONS if chosen_eval else None)
        if eval_every != cfg.eval_every:
            fields = set(cfg.model_fields_set)
            cfg = cfg.model_copy(update={"eval_every": eval_every})
            cfg.__pydantic_fields_set__ = fields  # still a value chosen for the recipe, not set by it
            loop.cfg = ctx.cfg = cfg
    loop.scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                                   num_training_steps=total_steps)
    resolved = _resolved(cfg, ctx, total_steps)
    identity = new_identity(cfg, resolved.model_dump(mode="json"))
    if cfg.resume:
        loop.state = state = _resume(cfg, folder, identity, resolved, loop, acc.process_index)
    folder.start(identity, cfg.resume)  # the run really starts: a replaced run's files move aside now
    loop.identity = {"run": {k: folder.identity.get(k, v) for k, v in identity.items()},
                     "config": resolved.model_dump(mode="json")}
    if main:
        atomic_write_text(run_dir / "config.yaml", dump_config(resolved))
        if trackers:
            start_trackers(acc, cfg, run_dir, {"method": cfg.method, "objective": cfg.objective, "lr": cfg.lr,
                                               "batch_size": cfg.batch_size, "steps": total_steps,
                                               "base_model": cfg.base_model, "strategy": strategy,
                                               "mixed_precision": mixed, "world_size": acc.num_processes})
            loop.tracking = True

    clock.lap("schedule")  # the optimizer, the budget's timed steps, resume, the trackers

    # ---- steps ----------------------------------------------------------------------------------------------------
    try:
        memory.start()
        with casts:
            result = run_steps(loop, total_steps, per_epoch, progress, on_eval)
        peak = memory.peak()
        clock.lap("steps")  # with the validations
    except Exception as e:
        if acc.num_processes > 1 and lost_process(e):
            raise lost_contact(e, run_dir, cfg.distributed.timeout, loop.state["step"]) from e
        raise
    finally:
        if loop.tracking:  # not acc.end_training(): that also ends the process group the final gather needs
            for tracker in acc.trackers:
                tracker.finish()

    # ---- final model, after, report -----------------------------------------------------------------------------
    acc.wait_for_everyone()
    model = acc.unwrap_model(loss_module).model
    if result.best_weights is not None and keeps_best(cfg):
        load_trainable(model, result.best_weights)
    if sharded:  # gather the shards (every process) into a plain model on the main process
        full = gather_full_state(loss_module)
        if main:
            plain = _apply_method(objective.model(ctx, weight_dtype), cfg, ctx.tokenizer, acc.device, mixed,
                                  frozen_half=False)
            # what init hooks fitted into the config (e.g. a probe head's bias) goes with the weights
            for key, value in vars(unwrap_peft(model).config).items():
                if key.startswith("lmtailor_"):
                    setattr(unwrap_peft(plain).config, key, value)
            objective.build(ctx, plain).load_state_dict(full)
            model = plain
        del full
    summary: dict[str, Any] = {}
    clock.lap("gather")  # the best checkpoint's weights back, a sharded model gathered
    if not finite_weights(model):
        raise TrainingError(f"training diverged by step {state['step']}: the final weights are not finite "
                            f"(lr={cfg.lr:g})", "lower lr; no model was written")
    if main:
        _save_model(model, ctx.tokenizer, run_dir / "model", ctx.companion)
        clock.lap("save")
        with report_precision():
            after = objective.evaluate(ctx, model, report_items, report_examples, progress=progress,
                                       desc="after") if (report_items or report_examples) else Evaluation()
        clock.lap("after")
        summary = _summary(cfg, objective, data, state, result.stopped_early, (trainable, total), base_name,
                           acc.num_processes, baselines, before, after)
        summary["evaluated_on"] = report_split
        if state.get("replans"):  # budget=: [step, steps before, steps after] for each re-fit on the way
            summary["budget_refits"] = state["replans"]
        if "head_probe" in ctx.stats:  # classify.head_init=probe: its C, cross-validated scores, seconds, dtype
            summary["head_probe"] = ctx.stats["head_probe"]
        if peak is not None:  # compare with `lmtailor plan` (benchmarks/plan_accuracy.py)
            summary["peak_memory_mib"] = round(peak / 2**20, 1)
        # the steps' compute precision, and what the frozen weights were kept in (bf16 for adapters under bf16)
        frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if not p.requires_grad and p.is_floating_point()}
        summary["precision"] = {"mixed": mixed, "frozen_weights": sorted(frozen)}
        summary["seconds"] = clock.seconds()  # up to the reports (written next, with these figures)
        _write_sealed_outputs(run_dir, cfg, objective, state["history"], summary, before, after)
        clock.lap("report")
        say(f"\nrun folder: {run_dir} ({state['step']} steps in {state['elapsed']:.0f} s, "
            f"{summary['train_tokens_per_s']:.0f} tokens/s)")
        if before.metrics and after.metrics:
            say("\n" + comparison_table(before.metrics, after.metrics, cfg.eval.samples, baselines,
                                        summary["verdict"]))
        elif summary["verdict"]:
            say(summary["verdict"])
        say(clock.line(cfg.budget if cfg.budget_covers == "run" else None))
        folder.finish()
    acc.wait_for_everyone()
    return summary


def _summary(cfg: RunConfig, objective: Objective, data: RunData, state: dict[str, Any], stopped_early: bool,
             params: tuple[int, int], base_name: str, world: int, baselines: dict[str, dict[str, float]],
             before: Evaluation, after: Evaluation) -> dict[str, Any]:
    """What metrics.json records: the run's facts, data statistics, baselines, before/after and the verdict."""
    metric = cfg.metric_for_best if cfg.metric_for_best != "loss" else objective.primary_metric
    return {
        "run_dir": str(cfg.run_dir), "base_model": base_name, "method": cfg.method, "objective": cfg.objective,
        "steps": state["step"], "stopped_early": stopped_early, "trainable_params": params[0],
        "total_params": params[1], "train_seconds": round(state["elapsed"], 2),
        "train_tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9), "world_size": world,
        "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
        "best": {"metric": cfg.metric_for_best, "value": state["best"], "step": state.get("best_step")},
        "data": data.stats, "baselines": baselines, "before": before.metrics, "after": after.metrics,
        "verdict": verdict(after.metrics, baselines, metric, likely_reasons(state["history"], data.stats,
                                                                            metric or "loss")),
        **({"privacy": data.privacy_audit} if data.privacy_audit else {}),
    }


def _apply_method(model: Any, cfg: RunConfig, tok: Any = None, device: torch.device | None = None,
                  mixed: str = "no", frozen_half: bool = True) -> Any:
    """What trains: LoRA adapters (on a 4-bit base for qlora), the last layers, every weight, or a soft prompt;
    with gradient_checkpointing, activations are recomputed in backward. A 4-bit base computes in the steps'
    16-bit precision under mixed precision (`mixed`), the QLoRA recipe's compute dtype: in float32 every
    dequantized weight was a float32 copy that autocast then cast again (on an H200, QLoRA of a 1B llama ran at
    0.78x LoRA's tokens/s), else in the weights' dtype. Under bf16 mixed precision an adapter method's frozen
    weights are kept in bf16 (`store_frozen_in`) unless `frozen_half` is off (FSDP shards a float32 model and
    casts it itself). Not under fp16: a float16 residual stream can overflow where bf16's cannot."""
    if cfg.method == "qlora":
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, next(model.parameters()).dtype)
        model = quantize_4bit(model, device or torch.device("cpu"), compute)
    if cfg.method in ("lora", "qlora"):
        # PEFT's task type follows the head the objective loaded (causal LM, classification, seq2seq, ...)
        from lmtailor.models import added_token_ids

        # tokens added by `tokenizer extend` would keep their initial rows under LoRA alone: they train too
        new = added_token_ids(tok) if tok is not None and cfg.lora.train_new_tokens else []
        model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                         new_tokens=new or None, use_dora=cfg.lora.use_dora, use_rslora=cfg.lora.use_rslora)
    elif cfg.method == "freeze":
        freeze_all_but_last(model, cfg.unfreeze_last_n)
    elif cfg.method in ("prompt_tuning", "prefix_tuning"):
        from lmtailor.models import add_soft_prompt, resolve_model

        model = add_soft_prompt(model, cfg.method, cfg.soft_prompt.virtual_tokens, cfg.soft_prompt.init_text,
                                resolve_model(cfg.base_model))
    if frozen_half and mixed == "bf16" and cfg.method in ADAPTER_METHODS:
        store_frozen_in(model, torch.bfloat16)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _resume(cfg: RunConfig, folder: RunFolder, identity: dict[str, Any], resolved: RunConfig, loop: Loop,
            rank: int) -> dict[str, Any]:
    """Restore the newest intact checkpoint of the folder's run; the main process trims the log to it.

    A checkpoint whose files do not match its manifest's checksums (or that cannot be read) is skipped for the one
    before, and said so. Settings that differ from the checkpoint's are named: refused when the checkpoint cannot
    hold them (runfolder.compare_configs), applied from here on otherwise (a new lr re-bases the schedule).
    """
    run_dir, main = folder.path, folder.main
    optimizer, scheduler = loop.optimizer, loop.scheduler
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"resume=true but {run_dir}/checkpoints holds no complete checkpoint",
                              "run without resume, or set save_every so checkpoints are written")
    run_id, skipped = folder.run_id, []
    for ckpt in reversed(ckpts):
        manifest = read_manifest(ckpt) or {}
        owner = (manifest.get("run") or {}).get("id")
        problem = verify_checkpoint(ckpt) or (
            f"it belongs to run {owner}, not to this folder's run {run_id}" if owner and run_id and owner != run_id
            else None)
        if problem is None:
            # a checkpoint written before manifests is compared with the config.yaml its run wrote
            old_config = manifest.get("config") if manifest else read_config(run_dir)
            if old_config:
                _check_resume_settings(ckpt, old_config, manifest.get("run") or {}, identity, resolved, main)
            try:
                scaler = getattr(loop.acc, "scaler", None)  # fp16 loss scaling: its scale comes back too
                state = (load_sharded(ckpt, loop.loss_module, optimizer, scheduler, rank, scaler) if loop.sharded
                         else load_checkpoint(ckpt, loop.model, optimizer, scheduler, rank, loop.ctx.companion,
                                              scaler))
            except CheckpointError as e:
                problem = e.message
        if problem is None:
            break
        skipped.append(f"{ckpt.name} ({problem})")
    else:
        raise CheckpointError(f"resume=true but no checkpoint in {run_dir}/checkpoints is intact: "
                              + "; ".join(skipped), "run again without resume (overwrite=true)")
    old_lr = (old_config or {}).get("lr")
    if old_lr is not None and old_lr != cfg.lr:
        _rebase_lr(optimizer, scheduler, cfg.lr)
    if main:
        atomic_write_text(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
        if skipped:
            print(f"checkpoint {', '.join(skipped)} is damaged: resumed from the newest intact one, {ckpt.name}")
        print(f"resumed from {ckpt} at step {state['step']}")
    return state


def _check_resume_settings(ckpt: Path, old_config: dict[str, Any], old_run: dict[str, Any],
                           identity: dict[str, Any], resolved: RunConfig, main: bool) -> None:
    applied, refused = compare_configs(old_config, resolved.model_dump(mode="json"))
    old_data = old_run.get("data_fingerprint")
    if old_data and old_data != identity["data_fingerprint"]:
        refused.insert(0, f"the data files' content (sha256 {old_data[:12]}… -> {identity['data_fingerprint'][:12]}…)")
    if refused:
        raise ConfigError(f"resume=true: changed since {ckpt.name}, and a resumed run cannot change them: "
                          + "; ".join(refused),
                          "put them back to resume, or start a new run: another output_dir, or overwrite=true")
    if applied and main:
        print(f"resume: changed since {ckpt.name}, applied from step {ckpt.name.removeprefix('step-').lstrip('0')} "
              "on: " + "; ".join(applied))


def _rebase_lr(optimizer: Any, scheduler: Any, lr: float) -> None:
    """A resumed run with a new lr: the schedule (restored with the checkpoint's base lr) continues from the new one."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _resolved(cfg: RunConfig, ctx: ObjectiveContext, total_steps: int) -> RunConfig:
    """The recipe as the run used it: a label set fixed from the data is written into its section, and a step
    count fitted to the budget into max_steps."""
    resolved = cfg.model_copy(deep=True)
    if ctx.labels is not None and getattr(cfg.settings, "labels", "absent") is None:
        resolved.settings.labels = list(ctx.labels)
    if cfg.budget:
        resolved.max_steps = total_steps
    return resolved


def _save_model(model: Any, tokenizer: Any, out: Path, companion: Any = None) -> None:
    """The final model folder; with encrypt_outputs, saved into RAM and sealed file by file into `out`. A companion
    (grpo's discriminator) is kept beside the weights as companion.safetensors."""
    def write(folder: Path) -> None:
        save_model(model, tokenizer, folder)
        if companion is not None:
            atomic_write_bytes(folder / "companion.safetensors", safetensors_save(companion.state()[0]))

    key = crypto.sealing_key()
    if key is None:
        write(out)
        return
    with crypto.plain_staging() as tmp:
        write(tmp / "model")
        crypto.encrypt_tree(tmp / "model", out, key)


def _write_sealed_outputs(run_dir: Path, cfg: RunConfig, objective: Objective, history: list[dict[str, Any]],
                          summary: dict[str, Any], before: Evaluation, after: Evaluation) -> None:
    """`_write_outputs`; with encrypt_outputs, written into RAM and sealed as `NAME.enc` (metrics and reports
    quote examples, so they are data too)."""
    key = crypto.sealing_key()
    if key is None:
        _write_outputs(run_dir, cfg, objective, history, summary, before, after)
        return
    with crypto.plain_staging() as tmp:
        _write_outputs(tmp, cfg, objective, history, summary, before, after)
        for path in sorted(tmp.iterdir()):
            crypto.encrypt_file(path, run_dir / f"{path.name}{crypto.SUFFIX}", key)


def _write_outputs(run_dir: Path, cfg: RunConfig, objective: Objective, history: list[dict[str, Any]],
                   summary: dict[str, Any], before: Evaluation, after: Evaluation) -> None:
    """metrics.json, the evaluations' artifacts (`NAME_before.png`, `NAME.png`), the task report and report.html."""
    atomic_write_json(run_dir / "metrics.json", summary)
    images = []
    for evaluation, suffix in ((before, "_before"), (after, "")):
        for name, png in evaluation.artifacts.items():
            atomic_write_bytes(run_dir / f"{name}{suffix}.png", png)
            images.append(f"{name}{suffix}.png")
    if objective.task_report and after.metrics:
        write_task_report(run_dir, before.metrics, after.metrics, history, images)
    write_report(run_dir, cfg, history, summary)


def measure_recipe(cfg: RunConfig, probe_steps: int = 5, max_seconds: float | None = None) -> dict[str, Any]:
    """What one optimizer step of this recipe costs here, measured on its own first batches without training or
    writing anything (probing at most about `max_seconds` after its first 2 steps): `step_s` (forward and
    backward), `eval_s` (one validation pass, forward only), `per_epoch` and `planned` steps, the values chosen
    from the data, and the item and token counts of both splits. One process."""
    with crypto.use_keys(cfg.privacy.key_source()):
        return _measure_recipe(cfg, probe_steps, max_seconds)


def _measure_recipe(cfg: RunConfig, probe_steps: int, max_seconds: float | None) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cuda = torch.cuda.is_available()
    mixed, weight_dtype = choose_precision(cfg, cuda)
    acc = Accelerator(cpu=not cuda, mixed_precision=mixed)
    set_seed(cfg.seed)
    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    data = build_run_data(objective, ctx, write_audit=False)
    cfg = ctx.cfg
    model = _apply_method(objective.model(ctx, weight_dtype), cfg, ctx.tokenizer, acc.device, mixed).to(acc.device)
    per_epoch, planned = plan_steps(cfg, len(data.train_items), 1)
    optimizer = make_optimizer(model, cfg)
    loss_module, optimizer = acc.prepare(objective.build(ctx, model), optimizer)
    state: dict[str, Any] = {"step": 0, "best": None, "bad_evals": 0, "history": [], "tokens": 0, "elapsed": 0.0}
    loop = Loop(acc, cfg, objective, ctx, data, model, loss_module, optimizer, None, state, cfg.run_dir)
    with cached_weight_casts(model, acc.device.type) if mixed != "no" else contextlib.nullcontext():
        step_s, eval_s = measure_step(loop, per_epoch, min(probe_steps, planned), max_seconds)
    return {"step_s": step_s, "eval_s": eval_s, "per_epoch": per_epoch, "planned": planned,
            "eval_every": cfg.eval_every, "train_items": len(data.train_items), "val_items": len(data.val_items),
            "train_tokens": total_tokens(data.train_items), "val_tokens": total_tokens(data.val_items),
            "choices": [str(c) for c in data.choices], "max_length": cfg.max_length, "lr": cfg.lr,
            "epochs": cfg.epochs}


def check_recipe(cfg: RunConfig) -> str:
    """Validate a recipe without training: objective, settings, tokenizer and template, and every record through
    the same data assembly `train` runs (prompt-task rendering and PII scrubbing included)."""
    with crypto.use_keys(cfg.privacy.key_source()):
        return _check_recipe(cfg)


def _check_recipe(cfg: RunConfig) -> str:
    objective = get_objective(cfg)
    ctx = objective.context(cfg)
    data: RunData = build_run_data(objective, ctx, write_audit=False)
    cfg, stats = ctx.cfg, data.stats
    per_epoch, total = plan_steps(cfg, len(data.train_items), 1)
    lengths = [item_tokens(data.train_items[i]) for i in range(len(data.train_items))]
    truncated = sum(n >= cfg.max_length for n in lengths)
    items = ", ".join(f"{k.removeprefix('train_')} {v}" for k, v in stats.items() if k.startswith("train_"))
    labels = f"; labels {', '.join(ctx.labels)}" if ctx.labels else ""
    return (f"recipe OK: objective {objective.name}, method {cfg.method}, base {cfg.base_model}\n"
            f"data: {stats['format']} format, {stats['read']} records read, {stats['duplicates']} duplicates and "
            f"{stats['empty']} empty dropped, {stats['train']} train / {stats['val']} validation"
            + (f", {stats['pii_replaced']} PII values replaced" if "pii_replaced" in stats else "") + f"{labels}\n"
            f"items: {items}; longest {max(lengths)} tokens, {truncated} cut at max_length={cfg.max_length}\n"
            f"schedule: {per_epoch} steps per epoch, {total} steps of {cfg.batch_size} examples"
            + "".join(f"\nchosen from the data: {c}" for c in data.choices))
