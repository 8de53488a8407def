"""Offline preference tuning: `dpo` (sigmoid), `ipo`, `orpo` and `simpo` on pairs (data.format: preference), `kto`
on unpaired completions with a desirable/undesirable label (data.format: unpaired).

Every objective scores answers by their log-probability under the policy (summed over the answer's tokens, or
averaged per token for ipo, orpo and simpo). The reference model costs no second copy: with LoRA it is the same
model with the adapter disabled (peft's `disable_adapter()`), computed in the step under no_grad; with full or
freeze fine-tuning, the reference log-probs of every sequence are computed once before training from the untrained
weights and stored in the run folder (`reference_logps.safetensors`), so a resumed run reads the same numbers.

Packing: a pair is one row [prompt | chosen | rejected] whose prompt is computed once and attended by both answers
(the shared-prefix segments of data.packing); the log-probs equal those of two separate rows (tests check this).

Losses are per pair (or per item for kto) and summed; the loop divides by the pairs of the step, so a step's loss
is the mean over its pairs whatever the micro-batching.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmtailor.config import Strict
from lmtailor.data.example import IGNORE, Example, Tokenized
from lmtailor.data.packing import shared_prefix, shifted_targets
from lmtailor.errors import ConfigError, DataError
from lmtailor.objectives.causal import evaluate as causal_evaluate
from lmtailor.objectives.causal import load_model, target_logits
from lmtailor.objectives.common import recipe_tokenizer
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import clip_messages, prompt_ids, tokenize_example

REFERENCE_FILE = "reference_logps.safetensors"
ADAPTERS = ("lora",)  # methods whose reference is the model with its adapter disabled


# ---- settings -------------------------------------------------------------------------------------------------

class DpoSettings(Strict):
    """`dpo:` options (Rafailov et al. 2023, the sigmoid loss)."""

    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped preference labels "
                                   "(conservative DPO)")


class IpoSettings(Strict):
    """`ipo:` options (Azar et al. 2023; log-ratios averaged per answer token, as TRL does)."""

    beta: float = Field(0.1, gt=0, description="tau: the target margin of the log-ratios is 1 / (2 beta)")


class OrpoSettings(Strict):
    """`orpo:` options (Hong et al. 2024): the answer's NLL plus beta times the odds-ratio loss; no reference."""

    beta: float = Field(0.1, gt=0, description="lambda: weight of the odds-ratio term against the chosen NLL")


class SimpoSettings(Strict):
    """`simpo:` options (Meng et al. 2024): length-averaged log-probs with a target margin; no reference."""

    beta: float = Field(2.0, gt=0, description="scale of the average log-prob difference")
    gamma: float = Field(0.5, ge=0, description="target reward margin (TRL's simpo_gamma)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped preference labels")


class KtoSettings(Strict):
    """`kto:` options (Ethayarajh et al. 2024) on unpaired completions labeled desirable or not."""

    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    desirable_weight: float = Field(1.0, gt=0, description="loss weight of desirable completions")
    undesirable_weight: float = Field(1.0, gt=0, description="loss weight of undesirable completions")
    kl: Literal["mismatched", "none"] = Field(
        "mismatched", description="the KL reference point: mismatched = each prompt with the next item's completion "
        "in the micro-batch (as TRL), under policy and reference (needs method lora); none = 0")


# ---- losses: per pair (B,), from per-sequence log-probs --------------------------------------------------------

def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO on summed log-probs of policy (pc, pr) and reference (rc, rr)."""
    z = beta * ((pc - rc) - (pr - rr))
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def ipo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, nc: torch.Tensor,
             nr: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO's squared loss on the log-ratios averaged over each answer's nc / nr tokens."""
    delta = (pc - rc) / nc - (pr - rr) / nr
    return (delta - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO: the chosen answer's mean token NLL minus beta * log sigmoid(log odds ratio of the mean log-probs)."""
    ac, ar = pc / nc, pr / nr
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    return -ac - beta * F.logsigmoid(log_odds)


def simpo_loss(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO: sigmoid loss on beta * (mean log-prob difference) - gamma."""
    z = beta * (pc / nc - pr / nr) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def kto_loss(p: torch.Tensor, r: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO per item: log-ratio p - r against the (detached, non-negative) KL estimate `kl`."""
    ratio = p - r
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable.bool(), good, bad)


# ---- items ----------------------------------------------------------------------------------------------------

@dataclass
class PairItem:
    """A preference pair: prompt + chosen and prompt + rejected, labels only on the answers."""

    chosen: Tokenized
    rejected: Tokenized

    @property
    def input_ids(self) -> list[int]:
        """The tokens a packed row feeds the model (the shared prompt once)."""
        p = shared_prefix([self.chosen, self.rejected])
        return self.chosen.input_ids + self.rejected.input_ids[p:]


@dataclass
class UnpairedItem:
    """A kto item: prompt + completion (labels on the completion), its label, and where the completion starts."""

    seq: Tokenized
    desirable: bool
    prompt_len: int

    @property
    def input_ids(self) -> list[int]:
        return self.seq.input_ids


def seq_key(seq: Tokenized) -> str:
    """A content key of a sequence and its supervised positions (what a stored reference log-prob is filed by)."""
    h = hashlib.sha256(repr((seq.input_ids, [x != IGNORE for x in seq.labels])).encode())
    return h.hexdigest()[:24]


def answer_sequence(tok: Any, history: list[dict[str, str]], answer: list[dict[str, str]], max_length: int,
                    source: str) -> tuple[Tokenized, int]:
    """(the conversation rendered by the one renderer with labels on the answer's assistant turns only, prompt
    length in tokens)."""
    seq = tokenize_example(tok, Example(messages=history + answer, source=source), max_length)[0]
    # the prompt's tokens, its work bounded by max_length (a prompt cut here is longer than max_length anyway)
    prompt = prompt_ids(tok, clip_messages(tok, history, max_length))
    n_prompt = len(prompt)
    assert seq.input_ids[:n_prompt] == prompt[:max_length], "the renderer keeps the prompt a prefix"
    labels = [IGNORE] * n_prompt + seq.labels[n_prompt:]
    return Tokenized(seq.input_ids, labels[:max_length], source), n_prompt


def _split(ex: Example) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(history, the answer's turns) of a preference example: the answer starts after the last user turn."""
    assert ex.messages is not None
    last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
    return ex.messages[:last_user + 1], ex.messages[last_user + 1:]


def prepare_pairs(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[PairItem], dict[str, Any]]:
    """Render each pair's two conversations; a pair whose answers are cut away by max_length is dropped."""
    tok, max_length = ctx.tokenizer, ctx.cfg.max_length
    items, dropped, truncated = [], 0, 0
    for ex in examples:
        if "rejected" not in ex.meta:
            raise DataError(f"{ex.source}: objective {ctx.cfg.objective} needs preference pairs (fields prompt or "
                            "messages, chosen, rejected)", "use data.format: preference")
        history, chosen = _split(ex)
        c, n = answer_sequence(tok, history, chosen, max_length, ex.source)
        r, _ = answer_sequence(tok, history, ex.meta["rejected"], max_length, ex.source)
        truncated += len(c.input_ids) == max_length or len(r.input_ids) == max_length
        if c.n_supervised == 0 or r.n_supervised == 0:
            dropped += 1
            continue
        items.append(PairItem(c, r))
    _remember(ctx, [s for it in items for s in (it.chosen, it.rejected)])
    return items, {"pairs": len(items), "dropped_no_target": dropped, "truncated": truncated,
                   "tokens": sum(len(it.input_ids) for it in items)}


def prepare_unpaired(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[UnpairedItem], dict[str, Any]]:
    tok, max_length = ctx.tokenizer, ctx.cfg.max_length
    items, dropped = [], 0
    for ex in examples:
        if "desirable" not in ex.meta:
            raise DataError(f"{ex.source}: objective kto needs labeled completions (fields prompt or messages, "
                            "completion, label true/false)", "use data.format: unpaired")
        history, answer = _split(ex)
        seq, n = answer_sequence(tok, history, answer, max_length, ex.source)
        if seq.n_supervised == 0:
            dropped += 1
            continue
        items.append(UnpairedItem(seq, bool(ex.meta["desirable"]), n))
    _remember(ctx, [it.seq for it in items])
    desirable = sum(it.desirable for it in items)
    return items, {"examples": len(items), "desirable": desirable, "undesirable": len(items) - desirable,
                   "dropped_no_target": dropped, "tokens": sum(len(it.input_ids) for it in items)}


def _remember(ctx: ObjectiveContext, seqs: list[Tokenized]) -> None:
    """Note the sequences whose reference log-probs a run without adapters stores before training."""
    ctx.stats.setdefault("reference_seqs", {}).update({seq_key(s): s for s in seqs})


# ---- batches --------------------------------------------------------------------------------------------------

def pack_rows(groups: list[list[tuple[Tokenized, int]]], pad_id: int, share: bool) -> dict[str, torch.Tensor]:
    """One row per group of (sequence, index): the group's common prompt once (segment 0, `share`), then each
    sequence (segments 1, 2, ...). `seq_index` (R, L) names the sequence each target belongs to (-1: none)."""
    rows = []
    for group in groups:
        seqs = [s for s, _ in group]
        p = shared_prefix(seqs) if share else 0
        ids, tgt, pos, seg, idx = list(seqs[0].input_ids[:p]), [IGNORE] * p, list(range(p)), [0] * p, [-1] * p
        for k, (s, i) in enumerate(group, start=1):
            t = shifted_targets(s)[p:]
            ids += s.input_ids[p:]
            tgt += t
            pos += list(range(p, len(s.input_ids)))
            seg += [k] * (len(s.input_ids) - p)
            idx += [i if x != IGNORE else -1 for x in t]
        rows.append((ids, tgt, pos, seg, idx))
    width = max(len(r[0]) for r in rows)
    out = []
    for ids, tgt, pos, seg, idx in rows:
        pad = width - len(ids)
        out.append((ids + [pad_id] * pad, tgt + [IGNORE] * pad, pos + list(range(pad)), seg + [-1] * pad,
                    idx + [-1] * pad))
    names = ("input_ids", "targets", "position_ids", "segment_ids", "seq_index")
    return {name: torch.tensor([r[j] for r in out]) for j, name in enumerate(names)}


def pad_rows(seqs: list[tuple[Tokenized, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each sequence in its own right-padded row (the unpacked layout)."""
    width = max(len(s.input_ids) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    tgt = torch.full((len(seqs), width), IGNORE)
    idx = torch.full((len(seqs), width), -1)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, i) in enumerate(seqs):
        n = len(s.input_ids)
        t = torch.tensor(shifted_targets(s))
        ids[r, :n], tgt[r, :n], mask[r, :n] = torch.tensor(s.input_ids), t, 1
        idx[r, :n] = torch.where(t != IGNORE, i, -1)
    return {"input_ids": ids, "targets": tgt, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "attention_mask": mask, "seq_index": idx}


def _rows(groups: list[list[tuple[Tokenized, int]]], pad_id: int, packing: bool, share: bool
          ) -> dict[str, torch.Tensor]:
    if packing:
        return pack_rows(groups, pad_id, share)
    return pad_rows([member for group in groups for member in group], pad_id)


def _stored(ctx: ObjectiveContext, seqs: list[Tokenized]) -> torch.Tensor | None:
    table = ctx.stats.get("reference_logps")
    if table is None:
        return None
    return torch.tensor([table[seq_key(s)] for s in seqs], dtype=torch.float64)


def collate_pairs(ctx: ObjectiveContext, items: list[PairItem]) -> dict[str, torch.Tensor]:
    """Sequence 2i is pair i's chosen answer, 2i + 1 its rejected one."""
    cfg = ctx.cfg
    groups = [[(it.chosen, 2 * i), (it.rejected, 2 * i + 1)] for i, it in enumerate(items)]
    batch = _rows(groups, ctx.tokenizer.pad_token_id, cfg.packing, cfg.share_prefix)
    batch["n_seq"] = torch.tensor(2 * len(items))
    ref = _stored(ctx, [s for it in items for s in (it.chosen, it.rejected)])
    if ref is not None:
        batch["ref_logps"] = ref
    return batch


def mismatched(a: UnpairedItem, b: UnpairedItem, max_length: int) -> Tokenized:
    """a's prompt followed by b's completion (kto's KL reference point)."""
    ids = a.seq.input_ids[:a.prompt_len] + b.seq.input_ids[b.prompt_len:]
    labels = [IGNORE] * a.prompt_len + b.seq.labels[b.prompt_len:]
    return Tokenized(ids[:max_length], labels[:max_length], a.seq.source)


def collate_unpaired(ctx: ObjectiveContext, items: list[UnpairedItem]) -> dict[str, torch.Tensor]:
    """Sequence i is item i; with kl=mismatched, sequence B + i is item i's prompt with item i+1's completion,
    packed in item i's row (they share the prompt)."""
    cfg, n = ctx.cfg, len(items)
    groups = [[(it.seq, i)] for i, it in enumerate(items)]
    if ctx.settings.kl == "mismatched":
        for i, it in enumerate(items):
            other = mismatched(it, items[(i + 1) % n], cfg.max_length)
            if other.n_supervised:
                groups[i].append((other, n + i))
    batch = _rows(groups, ctx.tokenizer.pad_token_id, cfg.packing, cfg.share_prefix)
    batch["n_seq"] = torch.tensor(2 * n)
    batch["desirable"] = torch.tensor([float(it.desirable) for it in items])
    ref = _stored(ctx, [it.seq for it in items])
    if ref is not None:
        batch["ref_logps"] = ref
    return batch


def count(batch: dict[str, torch.Tensor]) -> int:
    """Pairs (or kto items) of a batch: the loss is a mean over them."""
    return int(batch["desirable"].numel()) if "desirable" in batch else int(batch["n_seq"]) // 2


# ---- log-probs and the loss module ------------------------------------------------------------------------------

def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (S,), answer tokens (S,)) of the batch's S sequences."""
    targets, index = batch["targets"], batch["seq_index"]
    keep = targets != IGNORE  # (R, L)
    logits = target_logits(model, batch["input_ids"], batch["position_ids"], keep, batch.get("attention_mask"),
                           batch.get("segment_ids"))  # (N, V)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets[keep][:, None])[:, 0]  # (N,)
    n_seq = int(batch["n_seq"])
    where = index[keep]
    sums = token_logps.new_zeros(n_seq).index_add(0, where, token_logps)
    counts = token_logps.new_zeros(n_seq).index_add(0, where, torch.ones_like(token_logps))
    return sums, counts


def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs under the reference: the stored ones, or the model with its adapter disabled."""
    if "ref_logps" in batch:
        stored = batch["ref_logps"].float()
        n = int(batch["n_seq"])
        # kto's mismatched sequences have no stored reference (they depend on the batch); kl=mismatched is lora-only
        return torch.cat([stored, stored.new_zeros(n - len(stored))]) if len(stored) < n else stored
    disable = getattr(model, "disable_adapter", None)
    with torch.no_grad():
        if disable is None:  # no adapter and nothing stored: the model is its own reference (before training)
            return sequence_logps(model, batch)[0]
        with disable():
            return sequence_logps(model, batch)[0]


@dataclass
class Scores:
    """Per-sequence policy log-probs, token counts and reference log-probs (None: reference-free)."""

    logps: torch.Tensor
    counts: torch.Tensor
    ref: torch.Tensor | None


LossFn = Callable[[Any, Scores, dict[str, torch.Tensor]], torch.Tensor]


def _pair_loss(settings: Any, s: Scores, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    pc, pr = s.logps[0::2], s.logps[1::2]
    nc, nr = s.counts[0::2], s.counts[1::2]
    if isinstance(settings, DpoSettings):
        assert s.ref is not None
        return dpo_loss(pc, pr, s.ref[0::2], s.ref[1::2], settings.beta, settings.label_smoothing)
    if isinstance(settings, IpoSettings):
        assert s.ref is not None
        return ipo_loss(pc, pr, s.ref[0::2], s.ref[1::2], nc, nr, settings.beta)
    if isinstance(settings, OrpoSettings):
        return orpo_loss(pc, pr, nc, nr, settings.beta)
    assert isinstance(settings, SimpoSettings)
    return simpo_loss(pc, pr, nc, nr, settings.beta, settings.gamma, settings.label_smoothing)


def _kto_loss(settings: KtoSettings, s: Scores, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    assert s.ref is not None
    n = len(batch["desirable"])
    kl = s.logps.new_zeros(())
    if settings.kl == "mismatched":
        have = s.counts[n:] > 0
        if bool(have.any()):
            kl = (s.logps[n:] - s.ref[n:])[have].mean().clamp(min=0).detach()
    return kto_loss(s.logps[:n], s.ref[:n], batch["desirable"], kl, settings.beta, settings.desirable_weight,
                    settings.undesirable_weight)


class PreferenceLoss(nn.Module):
    """forward(**batch) -> (sum of per-pair losses, pairs)."""

    def __init__(self, model: nn.Module, settings: Any, needs_reference: bool,
                 ctx: ObjectiveContext | None = None) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.needs_reference = needs_reference
        self.ctx = ctx  # where the step's margins are logged (None: not logged)

    def scores(self, **batch: torch.Tensor) -> Scores:
        logps, counts = sequence_logps(self.model, batch)
        ref = reference_logps(self.model, batch) if self.needs_reference else None
        return Scores(logps, counts, ref)

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(**batch)
        fn = _kto_loss if isinstance(self.settings, KtoSettings) else _pair_loss
        losses = fn(self.settings, s, batch)  # type: ignore[arg-type]
        if self.ctx is not None and fn is _pair_loss:
            self.ctx.log(**step_margins(self.settings, s))
        return losses.sum(), torch.tensor(len(losses), device=losses.device)


def step_margins(settings: Any, s: Scores) -> dict[str, float]:
    """The implicit rewards of a batch's pairs, as `pair_metrics` reports them: reward_margin (chosen minus
    rejected), reward_accuracy, chosen_reward, rejected_reward (logged every step)."""
    with torch.no_grad():
        pc, pr, nc, nr = s.logps[0::2], s.logps[1::2], s.counts[0::2], s.counts[1::2]
        beta = float(settings.beta)
        if s.ref is not None:
            rc, rr = beta * (pc - s.ref[0::2]), beta * (pr - s.ref[1::2])
        else:  # reference-free objectives: the reward is the (scaled) mean log-prob
            rc, rr = beta * pc / nc.clamp(min=1), beta * pr / nr.clamp(min=1)
        margin = rc - rr
        return {"reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean()),
                "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean())}


# ---- hooks ----------------------------------------------------------------------------------------------------

def _needs_reference(ctx: ObjectiveContext) -> bool:
    return not isinstance(ctx.settings, OrpoSettings | SimpoSettings)


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    """The loss module; without an adapter, first the reference log-probs of every sequence (stored in the run)."""
    cfg = ctx.cfg
    if cfg.method in ("prompt_tuning", "prefix_tuning"):
        raise ConfigError(f"objective {cfg.objective} does not train soft prompts (method={cfg.method})",
                          "use method lora, full or freeze")
    needs = _needs_reference(ctx)
    if needs and cfg.method not in ADAPTERS:
        if isinstance(ctx.settings, KtoSettings) and ctx.settings.kl == "mismatched":
            raise ConfigError(f"kto.kl=mismatched needs the reference of batch-dependent sequences, which only "
                              f"method lora computes (method is {cfg.method})", "set kto.kl=none, or method=lora")
        ctx.stats["reference_logps"] = store_reference(ctx, model)
    return PreferenceLoss(model, ctx.settings, needs, ctx)


@torch.inference_mode()
def store_reference(ctx: ObjectiveContext, model: nn.Module, batch_size: int = 8, write: bool = True
                    ) -> dict[str, float]:
    """Reference log-probs of every prepared sequence from the untrained model, written to the run folder once
    (a resumed run reads them back, so its reference is the first start's)."""
    from safetensors.torch import load, save

    from lmtailor import crypto
    from lmtailor.io import atomic_write_bytes

    seqs: dict[str, Tokenized] = ctx.stats.get("reference_seqs", {})
    path = Path(ctx.run_dir) / REFERENCE_FILE if ctx.run_dir is not None and write else None
    table: dict[str, float] = dict(ctx.stats.get("reference_logps") or {})  # from the same base, if computed
    if path is not None and ctx.cfg.resume and (path.exists() or path.with_name(path.name + crypto.SUFFIX).exists()):
        stored = load(crypto.read_bytes(path))
        table.update(zip(_keys(stored["keys"]), stored["logps"].tolist(), strict=True))
    missing = [k for k in seqs if k not in table]
    if missing:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        for i in range(0, len(missing), batch_size):
            keys = missing[i:i + batch_size]
            batch = pad_rows([(seqs[k], j) for j, k in enumerate(keys)], ctx.tokenizer.pad_token_id)
            batch["n_seq"] = torch.tensor(len(keys))
            logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
            table.update(zip(keys, logps.double().tolist(), strict=True))
        model.train(was)
    if path is not None and (missing or not ctx.cfg.resume):  # a fresh start replaces any earlier run's file
        keys = sorted(table)
        data = save({"keys": torch.tensor([[int(k[j:j + 8], 16) for j in range(0, 24, 8)] for k in keys]),
                     "logps": torch.tensor([table[k] for k in keys], dtype=torch.float64)})
        key = crypto.sealing_key()
        if key is None:
            atomic_write_bytes(path, data)
        else:
            crypto.write_bytes(path.with_name(path.name + crypto.SUFFIX), data, key)
    return table


def _keys(t: torch.Tensor) -> list[str]:
    return ["".join(f"{int(x):08x}" for x in row) for row in t.tolist()]


@torch.inference_mode()
def _all_scores(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Any], collate: Any, batch_size: int = 8
                ) -> tuple[Scores, list[dict[str, torch.Tensor]], float, int]:
    """Scores of every item, concatenated pair by pair, and the summed loss."""
    loss_module = PreferenceLoss(model, ctx.settings, _needs_reference(ctx))
    if _needs_reference(ctx) and not hasattr(model, "disable_adapter") and "reference_logps" not in ctx.stats:
        # A model without an adapter, evaluated outside its training run: the reference is the base model, loaded
        # for this once (within a run, the log-probs stored before training are used).
        base = load_model(ctx, next(model.parameters()).dtype).to(next(model.parameters()).device)
        ctx.stats["reference_logps"] = store_reference(ctx, base, write=False)
        del base
    device = next(model.parameters()).device
    logps, counts, refs, batches = [], [], [], []
    total, n = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(ctx, [items[j] for j in range(i, min(i + batch_size,
                                                                                           len(items)))]).items()}
        s = loss_module.scores(**batch)
        fn = _kto_loss if isinstance(ctx.settings, KtoSettings) else _pair_loss
        losses = fn(ctx.settings, s, batch)  # type: ignore[arg-type]
        total, n = total + float(losses.sum()), n + len(losses)
        logps.append(s.logps.cpu())
        counts.append(s.counts.cpu())
        if s.ref is not None:
            refs.append(s.ref.cpu())
        batches.append(batch)
    scores = Scores(torch.cat(logps), torch.cat(counts), torch.cat(refs) if refs else None)
    return scores, batches, total, n


def pair_metrics(ctx: ObjectiveContext, model: nn.Module, items: Sequence[PairItem]) -> dict[str, float]:
    """loss; reward accuracy (chosen's implicit reward above rejected's) and mean margin; the chosen and rejected
    answers' mean log-probs; logp_accuracy: chosen more likely per token than rejected."""
    s, _, total, n = _all_scores(ctx, model, items, collate_pairs)
    pc, pr, nc, nr = s.logps[0::2], s.logps[1::2], s.counts[0::2], s.counts[1::2]
    beta = float(ctx.settings.beta)
    if s.ref is not None:
        rc, rr = beta * (pc - s.ref[0::2]), beta * (pr - s.ref[1::2])
    else:  # reference-free objectives: the reward is the (scaled) mean log-prob
        rc, rr = beta * pc / nc, beta * pr / nr
    margin = rc - rr
    return {"loss": total / max(n, 1), "reward_accuracy": float((margin > 0).float().mean()),
            "reward_margin": float(margin.mean()), "chosen_reward": float(rc.mean()),
            "rejected_reward": float(rr.mean()), "chosen_logp": float((pc / nc).mean()),
            "rejected_logp": float((pr / nr).mean()), "logp_accuracy": float((pc / nc > pr / nr).float().mean()),
            "pairs": len(items)}


def kto_metrics(ctx: ObjectiveContext, model: nn.Module, items: Sequence[UnpairedItem]) -> dict[str, float]:
    """loss; reward accuracy: the implicit reward beta * (policy - reference) log-prob is positive exactly for the
    desirable completions."""
    s, batches, total, n = _all_scores(ctx, model, items, collate_unpaired)
    assert s.ref is not None
    real = torch.cat([torch.arange(len(b["desirable"])) + sum(int(c["n_seq"]) for c in batches[:j])
                      for j, b in enumerate(batches)])
    reward = ctx.settings.beta * (s.logps[real] - s.ref[real])
    good = torch.tensor([it.desirable for it in items])
    out = {"loss": total / max(n, 1), "reward_accuracy": float(((reward > 0) == good).float().mean()),
           "examples": len(items)}
    if bool(good.any()):
        out["desirable_reward"] = float(reward[good].mean())
    if bool((~good).any()):
        out["undesirable_reward"] = float(reward[~good].mean())
    return out


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Any], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Preference metrics on the held-out items (pair_metrics / kto_metrics), plus the usual generation metrics of
    the first eval.generate_examples prompts against the chosen (kto: desirable) answers."""
    model.eval()
    out: dict[str, Any] = {}
    if items:
        kto = isinstance(items[0], UnpairedItem)
        out.update(kto_metrics(ctx, model, items) if kto else pair_metrics(ctx, model, items))
    chats = [ex for ex in examples if ex.meta.get("desirable", True)]
    if chats and ctx.cfg.eval.generate_examples != 0:
        generated = causal_evaluate(ctx, model, [], chats, progress=progress, desc=desc).metrics
        out.update(generated)
    return Evaluation(out)


GENERATED = ("exact_match", "chrf", "looping")  # of the answers to the first eval.generate_examples prompts
PAIRS: dict[str, Any] = dict(tokenizer=recipe_tokenizer, model=load_model, prepare=prepare_pairs,
                             collate=collate_pairs, count=count, build=build, evaluate=evaluate,
                             primary_metric="reward_accuracy",
                             metrics=("reward_accuracy", "reward_margin", "logp_accuracy", *GENERATED))
register_objective("dpo", "direct preference optimization (sigmoid) on chosen/rejected pairs, reference = the "
                   "model without its adapter", settings=DpoSettings, **PAIRS)
register_objective("ipo", "identity preference optimization (squared loss on mean log-ratios) on pairs",
                   settings=IpoSettings, **PAIRS)
register_objective("orpo", "odds-ratio preference optimization: chosen NLL + odds-ratio loss, no reference",
                   settings=OrpoSettings, **PAIRS)
register_objective("simpo", "simple preference optimization: length-normalized margin loss, no reference",
                   settings=SimpoSettings, **PAIRS)
register_objective("kto", "Kahneman-Tversky optimization on unpaired completions labeled desirable or not",
                   settings=KtoSettings, tokenizer=recipe_tokenizer, model=load_model, prepare=prepare_unpaired,
                   collate=collate_unpaired, count=count, build=build, evaluate=evaluate,
                   primary_metric="reward_accuracy", metrics=("reward_accuracy", *GENERATED))
