"""The discriminator reward of `grpo` (`grpo.reward.discriminator`): the adversarial set-up of GANs for text.

A classifier learns to tell the data's reference answers ("real") from the policy's sampled answers ("fake"); the
probability it gives a sampled answer of being real is that answer's reward, so the generator (the policy) is
pushed towards answers the classifier cannot tell from the references.

Design (the cheapest sound choice): the classifier is a small head on the policy's own backbone with its LoRA
adapter disabled, i.e. on the frozen base model's features of the answer's positions: their input embeddings (what
was written) and their last hidden states (in what context: they attend to the prompt, so the judgement is
conditional on the question), each layer-normalized per position and mean-pooled over the answer. The embeddings are
there because a small or untrained base's last states may barely tell one token from another. No second model is
loaded; the features cost one forward pass without gradient; only the head (2 x hidden_size + 1 parameters, or a
one-hidden-layer MLP) trains, with its own AdamW. As the features come from the frozen base, the generator cannot
change how the judge sees an answer, only which answers it writes; and the judge cannot drift through the
generator's updates.

Schedule: during a generator step the discriminator stays as it is: every forward pass of the step (each
micro-batch, on every process) has its sampled answers scored by the same judge (the rewards, and its accuracy on
the pass's reals and fakes before it has trained on them, which is what `disc_accuracy` logs) and keeps their
features. After the generator's optimizer step the judge takes `steps_per_gen_step` optimizer steps (0: a frozen
judge) on all the reals and fakes of the step; its loss is their class-balanced mean over the whole step.
Real and fake answers are both tokenized from their text (a sampled answer is decoded first), so the judge cannot
tell them apart by a tokenization the tokenizer itself would never produce; a reference longer than
max_new_tokens is cut to that length, as a sample is.

Exact resume: the head's weights and its optimizer state are the run's `companion` (ObjectiveContext), which every
checkpoint saves (after the judge's turn); training the head uses no randomness. Under DDP each process holds a
share of the step's reals and fakes: its loss is its share's sum over the step's global counts and the head's
gradients are summed over processes, which is the gradient of the global mean. So every process keeps the same
head, and N processes train the judge as one process does with the same global batch (however it accumulates).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmtailor.checkpoint import join_optimizer, split_optimizer
from lmtailor.config import Strict
from lmtailor.models import unwrap_peft


class DiscriminatorSettings(Strict):
    """`grpo.reward.discriminator:` a judge trained alongside on reference answers (real) versus samples (fake)."""

    weight: float = Field(1.0, gt=0, description="weight of the judge's probability that an answer is real")
    lr: float = Field(1e-3, gt=0, description="learning rate of the judge (AdamW)")
    steps_per_gen_step: int = Field(1, ge=0, description="judge updates after each generator (optimizer) step, on "
                                    "all its reals and fakes (0: the judge stays as it starts)")
    hidden: int = Field(0, ge=0, description="width of a hidden layer of the head (0: a linear head)")
    seed: int = Field(0, description="seed of the head's initial weights (a linear head starts at zero)")


class Discriminator:
    """The head and its optimizer; `state`/`load_state` make it a checkpointed companion of the run."""

    def __init__(self, width: int, settings: DiscriminatorSettings, device: torch.device) -> None:
        self.settings = settings
        with torch.random.fork_rng(devices=[]):  # seeded apart: the run's RNG stream is not consumed
            torch.manual_seed(settings.seed)
            if settings.hidden:
                self.head: nn.Module = nn.Sequential(nn.Linear(width, settings.hidden), nn.GELU(),
                                                     nn.Linear(settings.hidden, 1))
            else:
                self.head = nn.Linear(width, 1)
                nn.init.zeros_(self.head.weight)  # P(real) = 0.5 for every answer until it learns
                nn.init.zeros_(self.head.bias)
        self.head.to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.lr, weight_decay=0.0)
        self.updates = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (reals, fakes) of this step's passes

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) logit of "real" for (N, H) features."""
        return self.head(features)[:, 0]

    @staticmethod
    def accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> float:
        """Class-balanced accuracy (a tie counts half), in [0, 1]."""
        def right(x: torch.Tensor) -> float:
            return float(((x > 0).float() + 0.5 * (x == 0).float()).mean())

        return (right(real_logits) + right(-fake_logits)) / 2

    def loss(self, real: torch.Tensor, fake: torch.Tensor, n_real: float | None = None,
             n_fake: float | None = None) -> torch.Tensor:
        """Class-balanced binary cross-entropy of reals (label 1) and fakes (label 0): each class's sum over its
        count (by default the rows given; under DDP the step's count over every process)."""
        r, f = self.logits(real), self.logits(fake)
        real_sum = F.binary_cross_entropy_with_logits(r, torch.ones_like(r), reduction="sum")
        fake_sum = F.binary_cross_entropy_with_logits(f, torch.zeros_like(f), reduction="sum")
        return (real_sum / (n_real or len(r)) + fake_sum / (n_fake or len(f))) / 2

    def observe(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """Keep a training pass's (B, H) real and (BG, H) fake features for the judge's turn after the step."""
        self.pending.append((real.detach().float(), fake.detach().float()))

    def after_step(self) -> dict[str, float]:
        """The judge's turn after a generator step: `steps_per_gen_step` updates on every real and fake the step's
        passes observed (on every process); returns {"disc_loss": the step's loss before the first update}."""
        import torch.distributed as dist

        if not self.pending:
            return {}
        real = torch.cat([r for r, _ in self.pending])
        fake = torch.cat([f for _, f in self.pending])
        self.pending = []
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        counts = torch.tensor([len(real), len(fake)], dtype=torch.float64, device=real.device)
        if world > 1:  # every process takes its turn together: the counts, then each update's gradient, summed
            dist.all_reduce(counts)
        n_real, n_fake = float(counts[0]), float(counts[1])
        first = float("nan")
        for k in range(max(1, self.settings.steps_per_gen_step)):  # a frozen judge (0 steps) still reports its loss
            train = k < self.settings.steps_per_gen_step
            with torch.set_grad_enabled(train):
                loss = self.loss(real, fake, n_real, n_fake)
            if k == 0:
                first_t = loss.detach().reshape(1).double()
                if world > 1:
                    dist.all_reduce(first_t)
                first = float(first_t[0])
            if not train:
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # each process's loss is its share of the global mean: the sum is the global gradient
                for p in self.head.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
            self.optimizer.step()
            self.updates += 1
        return {"disc_loss": first}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able rest) of the head and its optimizer: copies, safe to keep while training goes on."""
        opt_tensors, opt_rest = split_optimizer(self.optimizer.state_dict())
        tensors = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        tensors.update({f"optimizer.{k}": v.clone() for k, v in opt_tensors.items()})
        return tensors, {"optimizer": opt_rest, "updates": self.updates}

    def load_state(self, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
        device = next(self.head.parameters()).device
        self.head.load_state_dict({k.removeprefix("head."): v.to(device) for k, v in tensors.items()
                                   if k.startswith("head.")})
        opt = {k.removeprefix("optimizer."): v.clone() for k, v in tensors.items() if k.startswith("optimizer.")}
        self.optimizer.load_state_dict(join_optimizer(opt, rest["optimizer"]))
        self.updates = int(rest["updates"])
        self.pending = []


def answer_ids(tokenizer: Any, text: str, stopped: bool, limit: int) -> list[int]:
    """The tokens of an answer as the judge sees it: its text tokenized, EOS when it ended, at most `limit`."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if stopped:
        ids.append(tokenizer.eos_token_id)
    return ids[:limit] or [tokenizer.eos_token_id if stopped else tokenizer.pad_token_id]


@torch.no_grad()
def answer_features(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: list[int],
                    answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """(N, 2H) features of N answers to the prompts of `rows` (indices into the left-padded (B, P) prompts): the
    base model's (adapter disabled) input embeddings and last hidden states of each answer's positions, each
    layer-normalized per position (so the head's lr does not depend on the base's scale), mean-pooled."""
    seqs = [prompt_ids[r][prompt_mask[r].bool()].tolist() + a for r, a in zip(rows, answers, strict=True)]
    width = max(len(s) for s in seqs)
    device = prompt_ids.device
    ids = torch.full((len(seqs), width), pad_id, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    pool = torch.zeros((len(seqs), width), device=device)  # (N, L) averaging weights over the answer's positions
    for i, (s, a) in enumerate(zip(seqs, answers, strict=True)):
        ids[i, width - len(s):] = torch.tensor(s, device=device)
        mask[i, width - len(s):] = 1
        pool[i, width - len(a):] = 1.0 / len(a)
    disable = getattr(model, "disable_adapter", None)
    assert disable is not None, "build refuses a discriminator without an adapter"
    with disable():
        states = unwrap_peft(model).base_model(input_ids=ids, attention_mask=mask,
                                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                                               output_hidden_states=True).hidden_states  # each (N, L, H)
    both = torch.cat([F.layer_norm(h.float(), h.shape[-1:]) for h in (states[0], states[-1])], -1)  # (N, L, 2H)
    return torch.einsum("nl,nlh->nh", pool, both)
