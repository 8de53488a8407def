"""The optimizer-step loop: the data order of every step, micro-batches and accumulation, clipping, logging,
validation (loss, and the task metric that picks the best weights), early stopping and checkpoints.

A step consumes `batch_size` examples in a fixed seeded order (the data position is the step number, which is what
makes resume exact). Each process takes every world_size-th example of the step and splits its share into
micro-batches; the loss is the sum over loss terms divided by the step's total count of loss terms over all
processes, so one process with accumulation and N processes compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmtailor.checkpoint import prune_checkpoints, rng_state, save_checkpoint, scaler_state, snapshot_trainable
from lmtailor.config import RunConfig
from lmtailor.distributed import clip_grad_norm, gradient_sync, max_over_processes, save_sharded
from lmtailor.errors import ConfigError, TrainingError
from lmtailor.metrics import higher_is_better, perplexity
from lmtailor.objectives import Objective, ObjectiveContext
from lmtailor.rundata import RunData

GROUP_BATCHES = 64  # group_by_length sorts within groups of this many batches
EVAL_SHARE = 0.2  # of a budget, at most, for the validations it re-spaces


def step_batches(n_examples: int, batch_size: int, seed: int, world: int,
                 weights: np.ndarray | None = None, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """The example indices of every step of one epoch: a seeded shuffle cut into batches.

    With `weights` (one per example, e.g. classify.sampling=balanced) the epoch instead draws n_examples indices
    with replacement in proportion to them: same length, so the schedule and resume position do not change.
    With `lengths` (group_by_length) the shuffled order is cut into groups of GROUP_BATCHES batches, each group
    sorted by length before it is cut into batches, and the batches are then shuffled: batches of similar lengths
    pad less, and which examples share an epoch is unchanged.
    A final batch smaller than the number of processes is dropped (every process needs one example).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_examples) if weights is None else rng.choice(n_examples, n_examples, p=weights)
    if lengths is not None:
        span = batch_size * GROUP_BATCHES
        groups = [order[i:i + span] for i in range(0, len(order), span)]
        order = np.concatenate([g[np.argsort(lengths[g], kind="stable")] for g in groups]) if groups else order
    batches = [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
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
             weights: np.ndarray | None = None, lengths: np.ndarray | None = None) -> np.ndarray:
    """Example indices of global step `step` (0-based); epoch e is shuffled (or drawn) with seed + e."""
    epoch, k = divmod(step, per_epoch)
    return step_batches(n_train, cfg.batch_size, cfg.seed + epoch, world, weights, lengths)[k]


def item_lengths(cfg: RunConfig, items: Any) -> np.ndarray | None:
    """Token counts of the training items when the recipe groups batches by length (group_by_length), else None."""
    if not cfg.group_by_length:
        return None
    return np.array([item_tokens(items[i]) for i in range(len(items))])


def item_tokens(item: Any) -> int:
    """Tokens an item feeds the model (throughput accounting)."""
    ids = getattr(item, "input_ids", None)
    return len(ids) if ids is not None else 0


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm weights and biases are not decayed (standard practice; decaying them hurts).
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        from lmtailor.memory import adamw_8bit

        return adamw_8bit([g for g in groups if g["params"]], cfg.lr)
    # On a GPU, the fused kernel: one launch for all parameters instead of a few per tensor group (the HF Trainer's
    # default too); not for sharded parameters (DTensor), which keep the default implementation.
    params = decay + no_decay
    fused = bool(params) and all(p.is_cuda and type(p.data) is torch.Tensor for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


@dataclass
class Deadline:
    """budget=: the steps and their validations end by `at` (time.monotonic()); the loop re-fits its step count to
    the step and validation times it observes every `every` steps and at steps 4, 8, 16, ... (a far too hopeful
    first fit is caught early), never beyond `cap` (the recipe's planned steps).
    `eval_s` is a validation's estimate until one has run."""

    at: float
    cap: int
    eval_s: float
    every: int


@dataclass
class Loop:
    """What the step loop works with; `state` is the checkpointed trainer state (step, best, history, ...)."""

    acc: Any  # accelerate.Accelerator
    cfg: RunConfig
    objective: Objective
    ctx: ObjectiveContext
    data: RunData
    model: torch.nn.Module
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # set once the step count is known (after fitting a budget)
    state: dict[str, Any]
    run_dir: Path
    identity: dict[str, Any] = field(default_factory=dict)  # {"run": ..., "config": ...} for checkpoint manifests
    tracking: bool = False  # log scalars to the trackers Accelerate started (main process)
    sharded: bool = False  # FSDP2: every process runs the same number of forward passes, checkpoints are sharded
    deadline: Deadline | None = None  # budget=: set by fit_steps_to_budget (a resumed run keeps its first schedule)


@dataclass
class LoopResult:
    best_weights: dict[str, torch.Tensor] | None
    stopped_early: bool


def run_steps(loop: Loop, total_steps: int, per_epoch: int, progress: bool = True,
              on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> LoopResult:
    """Train from loop.state["step"] to total_steps (or an early stop); returns the best weights seen, if any.

    With a budget's `loop.deadline`, the step count is re-fitted on the way (`refit_steps`) to the step and
    validation times this run shows: a machine that slows down after the budget's timed steps (a shared CPU; on the
    python-docs-sections set, 9% slower steps took a 20-minute run 25 s past its budget) ends on time with fewer
    steps, and one that speeds up trains more, up to the planned steps. The LR schedule's remaining part is fitted
    to the new count (`stretch_schedule`), and checkpoints keep both, so resume continues the same schedule."""
    acc, cfg, state = loop.acc, loop.cfg, loop.state
    main = acc.is_main_process
    total_steps = state.get("total_steps", total_steps)  # re-fitted by a budget before a checkpoint
    for start, old, new in state.get("replans", []):  # a resumed run's scheduler starts from the recipe's schedule
        stretch_schedule(loop.scheduler, start, old, new)
    weights = (loop.objective.sample_weights(loop.ctx, loop.data.train_items)
               if loop.objective.sample_weights is not None else None)  # a pure function of the data: resume redraws
    lengths = item_lengths(cfg, loop.data.train_items)
    best_weights: dict[str, torch.Tensor] | None = None
    stopped_early = False
    bar = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step", disable=not (main and progress),
               dynamic_ncols=True)
    t_start = time.perf_counter() - state["elapsed"]
    here = {"t0": time.perf_counter(), "steps": 0, "val_s": 0.0, "vals": 0}  # this process's own steps and validations
    loop.model.train()
    while state["step"] < total_steps:
        step = state["step"]
        items = [loop.data.train_items[i] for i in batch_at(step, per_epoch, len(loop.data.train_items), cfg,
                                                             acc.num_processes, weights, lengths)]
        loop.ctx.step_log.clear()
        loop.ctx.step = step
        train_loss, grad_norm = _optimizer_step(loop, items)
        if loop.ctx.companion is not None:  # grpo's discriminator: its turn, on what the step's passes showed it
            loop.ctx.log(**loop.ctx.companion.after_step())
        state["step"] = step = step + 1
        here["steps"] += 1
        state["tokens"] += sum(item_tokens(s) for s in items)
        state["elapsed"] = time.perf_counter() - t_start
        record: dict[str, Any] = {"step": step, "epoch": round(step / per_epoch, 3), "loss": train_loss,
                                  "lr": loop.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                  "tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9),
                                  "elapsed_s": round(state["elapsed"], 2),  # the earlier validations included
                                  **_step_log(loop)}
        scaling = scaler_state(getattr(acc, "scaler", None))
        if scaling is not None:  # fp16 loss scaling: the scale the next step starts from
            record["loss_scale"] = scaling["scale"]
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps) and loop.data.val_items:
            t_val = time.perf_counter()
            record.update(_validate(loop))
            here["val_s"] += time.perf_counter() - t_val
            here["vals"] += 1
            loop.model.train()
            improved, stopped_early = _track_best(cfg, state, record[f"val_{cfg.metric_for_best}"], step)
            if improved and keeps_best(cfg):
                best_weights = snapshot_trainable(loop.model, best_weights)
        state["history"].append(record)
        if main:
            _log(loop, record, bar)
        if on_eval is not None and main and "val_loss" in record:
            on_eval(step, record)
        bar.update(1)
        if (loop.deadline is not None and step < total_steps and here["steps"] >= 3
                and (step % loop.deadline.every == 0 or step & (step - 1) == 0)):  # also at 4, 8, 16, ...: early
            total_steps = _refit(loop, here, step, total_steps, bar)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            _checkpoint(loop, step)
        if stopped_early:
            if main:
                print(f"\nearly stopping at step {step}: validation {cfg.metric_for_best} has not improved for "
                      f"{cfg.early_stopping_patience} evaluations (best {state['best']:.4f})")
            break
    bar.close()
    return LoopResult(best_weights, stopped_early)


def _refit(loop: Loop, here: dict[str, Any], step: int, total: int, bar: Any) -> int:
    """The step count that ends by the deadline at the times seen so far (the main process decides); applied to the
    schedule, the state and the progress bar when it changes. Growing waits for a gain of 5% (at least 2 steps)."""
    deadline = loop.deadline
    assert deadline is not None
    now = time.perf_counter()
    step_s = (now - here["t0"] - here["val_s"]) / here["steps"]  # logging and checkpoints included
    eval_s = here["val_s"] / here["vals"] if here["vals"] else deadline.eval_s
    validates = bool(loop.cfg.eval_every and loop.data.val_items)
    new = refit_steps(deadline.at - time.monotonic(), step, deadline.cap, step_s, eval_s,
                      loop.cfg.eval_every if validates else 0)
    if not (new < total or new >= total + max(2, math.ceil(0.05 * total))):
        new = total
    if loop.acc.num_processes > 1:  # every process must stop at the same step
        from accelerate.utils import broadcast

        new = int(broadcast(torch.tensor([new], device=loop.acc.device))[0])
    if new == total:
        return total
    stretch_schedule(loop.scheduler, step, total, new)
    loop.state.setdefault("replans", []).append([step, total, new])
    loop.state["total_steps"] = new
    bar.total = new
    bar.refresh()
    if loop.acc.is_main_process:
        print(f"\nbudget: at step {step} a step takes {step_s:.2f} s"
              + (f" and a validation {eval_s:.1f} s" if validates else "")
              + f": {total} -> {new} steps to end within the budget (the learning-rate schedule follows)")
    return new


def refit_steps(left_s: float, step: int, cap: int, step_s: float, eval_s: float, eval_every: int) -> int:
    """The most total steps (at least step + 1, at most `cap`) whose remaining steps, and validations every
    `eval_every` steps plus one at the end (eval_every 0: none), take at most `left_s` seconds."""
    def cost(n: int) -> float:
        vals = (n // eval_every - step // eval_every + (1 if n % eval_every else 0)) if eval_every else 0
        return (n - step) * step_s + vals * eval_s

    lo, hi = step + 1, max(step + 1, cap)  # cost grows with n: the largest n that fits, by bisection
    if cost(lo) > left_s:
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left_s else (lo, mid - 1)
    return lo


def stretch_schedule(scheduler: Any, start: int, old: int, new: int) -> None:
    """Fit what is left of a LambdaLR schedule after step `start` (steps start..old) into steps start..new: the
    learning rate still reaches the value its schedule ends at (e.g. 0 for linear decay), at the new last step.
    A scheduler without lr_lambdas is left as it is."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None or new <= start or old <= start:
        return
    def fitted(fn: Callable[[float], float]) -> Callable[[int], float]:
        # multiplied before divided: the new last step maps exactly onto the old one (a schedule's final 0 stays 0)
        return lambda s: fn(start + (s - start) * (old - start) / (new - start)) if s > start else fn(s)

    scheduler.lr_lambdas = [fitted(fn) for fn in lambdas]


def _step_log(loop: Loop) -> dict[str, float]:
    """The objective's per-step scalars (ctx.step_log), each averaged over forward passes, then over processes."""
    acc, log = loop.acc, loop.ctx.step_log
    keys = sorted(log)
    if acc.num_processes > 1:  # every process runs the same objective: the same keys (sorted) on each
        keys = sorted(set().union(*_gather_keys(keys)))
    means = torch.tensor([sum(log[k]) / len(log[k]) if log.get(k) else float("nan") for k in keys],
                         dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1 and keys:
        means = acc.reduce(means, "mean")
    return {k: float(v) for k, v in zip(keys, means.tolist(), strict=True)}


def _gather_keys(keys: list[str]) -> list[list[str]]:
    from accelerate.utils import gather_object

    return list(gather_object([keys]))


def _backward(loop: Loop, step_items: list[Any]) -> tuple[torch.Tensor, int]:
    """Forward and backward passes over this process's share of a step; returns (loss sum, step's loss terms)."""
    acc, cfg = loop.acc, loop.cfg
    world = acc.num_processes
    mine = step_items[acc.process_index::world]
    size = cfg.micro_batch_size or len(mine)
    micro = [loop.objective.collate(loop.ctx, mine[i:i + size]) for i in range(0, len(mine), size)]
    # the step's loss is a mean over all its loss terms, on every process together
    n_global = sum(loop.objective.count(b) for b in micro)
    if world > 1:
        n_global = int(acc.reduce(torch.tensor(n_global, device=acc.device), "sum"))
    n_global = max(n_global, 1)
    # A sharded model gathers its weights in every forward, on every process together: a process with fewer
    # micro-batches than another repeats its first one with weight 0 so that all run the same number of passes.
    weights = [1.0] * len(micro)
    if loop.sharded:
        extra = max_over_processes(len(micro), acc.device) - len(micro)
        micro, weights = [micro[0]] * extra + micro, [0.0] * extra + weights
    loss_sum = torch.zeros((), device=acc.device)
    for j, (batch, weight) in enumerate(zip(micro, weights, strict=True)):
        sync = j == len(micro) - 1
        with _no_sync(loop, sync):
            loss, _ = loop.loss_module(**to_device(batch, acc.device))
            # DDP and FSDP average gradients over processes; scale so the result is the global token mean.
            acc.backward(loss * (weight * world / n_global))
        loss_sum += loss.detach() * weight
    return loss_sum, n_global


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on the run's device. To a GPU through pinned memory without waiting: a plain `.to("cuda")`
    of a pageable tensor waits for the stream to finish everything queued before it (one host sync per tensor: 16
    of the 38 per optimizer step of a 1B full fine-tuning with 4 micro-batches, profiled on an H200), so the host
    could not queue the next micro-batch's kernels while the GPU ran the last one's."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if v.device.type == "cpu" else v.to(device)
            for k, v in batch.items()}


def _no_sync(loop: Loop, sync: bool) -> contextlib.AbstractContextManager[Any]:
    if loop.sharded:
        return gradient_sync(loop.loss_module, sync)
    return contextlib.nullcontext() if sync else loop.acc.no_sync(loop.loss_module)


def _optimizer_step(loop: Loop, step_items: list[Any]) -> tuple[float, float]:
    """One optimizer step over this process's share of the step's items; returns (train loss, grad norm)."""
    acc, cfg = loop.acc, loop.cfg
    loss_sum, n_global = _backward(loop, step_items)
    grad_norm = float("nan")
    if cfg.max_grad_norm > 0:
        grad_norm = (clip_grad_norm(loop.loss_module.parameters(), cfg.max_grad_norm) if loop.sharded else
                     float(acc.clip_grad_norm_(loop.loss_module.parameters(), cfg.max_grad_norm)))
    loss = float(acc.reduce(loss_sum, "sum")) / n_global
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) if cfg.max_grad_norm > 0 else _finite_grads(loop)):
        if math.isfinite(loss) and _scale_overflow(loop):
            # fp16 loss scaling: the scaled gradients overflowed; the scaler skips this update and halves its scale
            loop.optimizer.step()
            loop.scheduler.step()  # the schedule stays a function of the step (exact resume)
            loop.optimizer.zero_grad(set_to_none=True)
            return loss, grad_norm
        # Stop before the update: the weights (and any checkpoint written so far) stay those of the last good step.
        loop.optimizer.zero_grad(set_to_none=True)
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        raise TrainingError(f"training diverged at step {loop.state['step'] + 1}: {what} (lr={cfg.lr:g})",
                            "lower lr or keep max_grad_norm on; resume=true continues from the last checkpoint, "
                            "written before this step")
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def _scale_overflow(loop: Loop) -> bool:
    """Non-finite gradients under fp16 loss scaling are an overflow of the scale, while the scale is still above 1:
    below, the unscaled gradients themselves are not finite (the run diverged)."""
    scaler = getattr(loop.acc, "scaler", None)
    return scaler is not None and float(scaler.get_scale()) >= 1.0


def _finite_grads(loop: Loop) -> bool:
    """Every gradient finite (checked on every process: a NaN on one spreads to all with the next update)."""
    acc = loop.acc
    bad = torch.zeros((), device=acc.device)
    for p in loop.loss_module.parameters():
        if p.grad is not None:
            bad += (~torch.isfinite(p.grad)).any()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    return not bool(bad)


def keeps_best(cfg: RunConfig) -> bool:
    """The run ends on its best validation's weights (early stopping, or a task metric picks the checkpoint);
    otherwise it ends on its last step's, and the loop keeps no copy of the best."""
    return bool(cfg.early_stopping_patience) or cfg.metric_for_best != "loss"


def finite_weights(model: torch.nn.Module) -> bool:
    """Every trainable parameter finite (an infinite lr turns finite gradients into infinite weights)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def measure_step(loop: Loop, per_epoch: int, probe_steps: int = 5, max_seconds: float | None = None
                 ) -> tuple[float, float]:
    """(seconds of an average optimizer step, seconds of one validation pass).

    The first steps' batches are run forward and backward (the gradients are dropped and the RNG restored, so the
    run is unchanged) and timed per token: the mean over all but the first (which pays one-off costs), times the
    tokens of an average step of the epoch, so a probe batch longer or shorter than the average does not skew the
    estimate. A validation pass is charged as forward-only work (`forward_share` of forward + backward: a third when
    every weight trains, about half for an adapter on a frozen model) on the validation tokens. With `max_seconds`,
    probing stops early (after at least 2 steps) once it has taken that long: slow steps are measured well enough
    by fewer of them. Every process measures; the slowest decides, so all agree."""
    acc, cfg = loop.acc, loop.cfg
    n = len(loop.data.train_items)
    lengths = item_lengths(cfg, loop.data.train_items)
    rates = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    loop.model.train()
    started = time.perf_counter()
    # the probe's forward passes may train a companion (grpo's discriminator): its state is put back afterwards
    saved = loop.ctx.companion.state() if loop.ctx.companion is not None else None
    with torch.random.fork_rng(devices=devices):
        for step in range(probe_steps):
            if max_seconds is not None and step >= 2 and time.perf_counter() - started > max_seconds:
                break
            items = [loop.data.train_items[i] for i in batch_at(step, per_epoch, n, cfg, acc.num_processes,
                                                                 lengths=lengths)]
            tokens = sum(item_tokens(item) for item in items) or len(items)
            loop.ctx.step = step
            t0 = time.perf_counter()
            _backward(loop, items)
            loop.optimizer.zero_grad(set_to_none=True)
            rates.append((time.perf_counter() - t0) / tokens)
    if saved is not None:
        loop.ctx.companion.load_state(*saved)
    loop.ctx.step_log.clear()
    later = rates[1:] or rates
    per_token = sum(later) / len(later)  # the mean: an occasional slow step is part of what the run will pay
    per_token = float(acc.reduce(torch.tensor(per_token, device=acc.device), "max")) if acc.num_processes > 1 \
        else per_token
    step_s = per_token * (total_tokens(loop.data.train_items) or n) / max(1, per_epoch) * 1.05  # + update, logging
    eval_s = per_token * forward_share(loop.model, cfg.gradient_checkpointing) * total_tokens(loop.data.val_items)
    return step_s, eval_s


def total_tokens(items: Sequence[Any]) -> float:
    """Tokens in `items`: their sum, or over 4,000 items (a pretraining cache may hold millions) an even sample's
    mean times their number."""
    n = len(items)
    sample = range(0, n, max(1, n // 2000))
    return sum(item_tokens(items[i]) for i in sample) / max(1, len(sample)) * n


def forward_share(model: torch.nn.Module, checkpointing: bool) -> float:
    """The share of a training step's time per token that a forward pass alone takes (a validation pass, the
    features of a classification head's probe), counted in forward passes of matmul work: the forward is one; the
    backward's gradients of the activations are one more, through every layer; the gradients of the weights are one
    more for the weights that train, a fraction f of them; gradient checkpointing runs the forward again. Every
    weight training: 1/3; LoRA or a soft prompt on a frozen model (f near 0): about 1/2, not 1/3 (auto's estimate of
    a probe head's forward pass over python-docs' 395 pages was 229 s where it took 459-482 s). method=freeze stops
    the backward at its lowest trained layer, so there the share is somewhat more than this."""
    trained = total = 0
    for p in model.parameters():
        total += p.numel()
        trained += p.numel() if p.requires_grad else 0
    return 1.0 / (2.0 + trained / max(1, total) + (1.0 if checkpointing else 0.0))


def fit_steps_to_budget(loop: Loop, budget: float, per_epoch: int, planned: int, probe_steps: int = 5,
                        evaluations: int | None = None) -> tuple[int, int]:
    """(optimizer steps, eval_every) that fit `budget` seconds, the validation passes included, from the step time
    `measure_step` takes on this run's own batches. Never more than `planned` steps.

    With `evaluations` (eval_every was chosen from the data, not set by the recipe), the validations are spread
    again over the steps that fit: that many of them (fewer when they would take more than EVAL_SHARE of the
    budget), not the ones planned for the uncut schedule (which a budget may cut to fewer than one)."""
    cfg = loop.cfg
    given, t0 = budget, time.monotonic()
    step_s, pass_s = measure_step(loop, per_epoch, min(probe_steps, planned), max_seconds=0.03 * budget)
    # a validation is the loss pass, and with a task metric to pick the best checkpoint by, that metric's own pass
    # over the same items too (_validate); charged one pass, python-docs-sections' 5 validations ran 70 s over
    eval_s = pass_s * (2 if cfg.metric_for_best != "loss" else 1)
    budget = max(0.05 * given, given - (time.monotonic() - t0))  # the timing steps are spent time too
    deadline_at = time.monotonic() + budget
    eval_every = cfg.eval_every
    if evaluations and eval_every:
        # at most EVAL_SHARE of the budget validates: slow validations (long examples) become fewer, not longer
        if eval_s > 0:
            evaluations = max(1, min(evaluations, int(EVAL_SHARE * budget / eval_s)))
        steps = max(1, min(planned, int((budget - evaluations * eval_s) / step_s)))
        eval_every = max(1, steps // evaluations)
    else:
        per_step = step_s + (eval_s / eval_every if eval_every else 0.0)
        steps = max(1, min(planned, int(budget / per_step)))
    if loop.acc.num_processes > 1:  # the main process decides (its budget paid the before evaluation): all agree
        from accelerate.utils import broadcast

        steps, eval_every = (int(v) for v in broadcast(torch.tensor([steps, eval_every], device=loop.acc.device)))
    loop.deadline = Deadline(deadline_at, planned, eval_s, max(1, steps // 10))
    if loop.acc.is_main_process:
        print(f"budget {given:g} s: a step takes {step_s:.2f} s (measured on {min(probe_steps, planned)} steps, "
              f"{given - budget:.0f} s)"
              + (f", validation {eval_s:.1f} s every {eval_every} steps" if eval_every and eval_s else "")
              + f" -> {steps} steps ({steps / per_epoch:.2f} epochs; the recipe planned {planned})")
    return steps, eval_every


def _validate(loop: Loop) -> dict[str, float]:
    """val_loss (over all processes), val_perplexity and, when metric_for_best is a task metric, every val_<metric>
    the objective reports."""
    val_loss = distributed_val_loss(loop)
    record = {"val_loss": val_loss, "val_perplexity": perplexity(val_loss)}
    if loop.cfg.metric_for_best != "loss":
        record.update(_task_metrics(loop))
    return record


def _track_best(cfg: RunConfig, state: dict[str, Any], score: float, step: int) -> tuple[bool, bool]:
    """Update best / bad-evaluation counts; returns (improved, stop early now)."""
    sign = 1.0 if higher_is_better(cfg.metric_for_best) else -1.0
    if state["best"] is None or sign * (score - state["best"]) > 1e-6:
        state["best"], state["bad_evals"], state["best_step"] = score, 0, step
        return True, False
    state["bad_evals"] += 1
    return False, bool(cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience)


def _log(loop: Loop, record: dict[str, Any], bar: Any) -> None:
    with open(loop.run_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if loop.tracking:
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", *sorted(loop.ctx.step_log),
                *(k for k in record if k.startswith("val_")))
        loop.acc.log({f"train/{key}" if "val" not in key else f"eval/{key}": record[key] for key in keys
                      if key in record and not math.isnan(record[key])}, step=record["step"])
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))


def _checkpoint(loop: Loop, step: int) -> None:
    from accelerate.utils import gather_object

    acc = loop.acc
    rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    model = acc.unwrap_model(loop.loss_module).model
    if not finite_weights(model):
        raise TrainingError(f"training diverged at step {step}: its update made weights non-finite "
                            f"(lr={loop.cfg.lr:g})",
                            "lower lr; resume=true continues from the last checkpoint, written before this step")
    if loop.sharded:  # every process writes its shards
        save_sharded(loop.run_dir / "checkpoints" / f"step-{step:06d}", loop.loss_module, loop.optimizer,
                     loop.scheduler, rngs, loop.state, acc.is_main_process, scaler=getattr(acc, "scaler", None))
        if acc.is_main_process:
            prune_checkpoints(loop.run_dir, loop.cfg.keep_checkpoints, (loop.identity.get("run") or {}).get("id"))
        acc.wait_for_everyone()
        return
    if acc.is_main_process:
        save_checkpoint(loop.run_dir / "checkpoints" / f"step-{step:06d}", model, loop.optimizer, loop.scheduler,
                        rngs, loop.state, manifest=loop.identity, companion=loop.ctx.companion,
                        scaler=getattr(acc, "scaler", None))
        prune_checkpoints(loop.run_dir, loop.cfg.keep_checkpoints, (loop.identity.get("run") or {}).get("id"))
    acc.wait_for_everyone()


def _task_metrics(loop: Loop) -> dict[str, float]:
    """The objective's scalar metrics on the validation split as val_<name>, computed on the main process.

    Raises:
        ConfigError: the objective does not report cfg.metric_for_best.
    """
    from accelerate.utils import broadcast_object_list

    acc, cfg = loop.acc, loop.cfg
    found: list[Any] = [None]
    if acc.is_main_process:
        # in the steps' precision, as the validation loss is: these passes only pick the best checkpoint and stop
        # early, and in float32 they took several times as long on a CPU with bf16 units (the report's before and
        # after evaluations stay in the precision `eval`, `predict` and `serve` use)
        with acc.autocast() if not loop.sharded else contextlib.nullcontext():
            metrics = loop.objective.evaluate(loop.ctx, loop.model, loop.data.val_items, loop.data.val_examples,
                                              progress=False).metrics
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
def distributed_val_loss(loop: Loop) -> float:
    """Mean validation loss over all processes (each takes every world_size-th item)."""
    acc, items = loop.acc, loop.data.val_items
    # index by position: items may be a lazy (memory-mapped) sequence without slicing
    mine: Sequence[Any] = [items[i] for i in range(acc.process_index, len(items), acc.num_processes)]
    size = loop.cfg.micro_batch_size or loop.cfg.batch_size
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    starts = list(range(0, len(mine), size))
    counted = [True] * len(starts)
    if loop.sharded:  # same number of forward passes on every process (see _backward); extra ones not counted
        extra = max_over_processes(len(starts), acc.device) - len(starts)
        starts, counted = starts + [0] * extra, counted + [False] * extra
        mine = mine or [items[0]]
    for i, count in zip(starts, counted, strict=True):
        batch = loop.objective.collate(loop.ctx, list(mine[i:i + size]))
        loss, n = loop.loss_module(**to_device(batch, acc.device))
        if count:
            total += torch.stack([loss.double(), n.double()])
    total = acc.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1.0))
