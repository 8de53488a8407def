"""Online tuning: `objective: grpo` (group relative policy optimization, Shao et al. 2024).

For each prompt of a step the current policy samples `grpo.group` answers; each is scored by the recipe's rewards
(built-in verifiable checks, or a Python function the recipe names explicitly); advantages are the rewards
normalized within their group; the loss is the clipped policy-gradient objective plus beta times a KL penalty
(k3 estimator) to the reference, which is the same model with its LoRA adapter disabled. With
`reward.discriminator` a judge trained alongside (see objectives/discriminator.py) rewards answers it takes for the
data's own.

Every step logs (history.jsonl and the trackers) reward_mean/reward_std of the samples, kl (token mean of the k3
estimate), answer_length (tokens), looping (share of answers the looping detector flags) and, with a discriminator,
disc_accuracy (on the step's reals and fakes, before it trains on them), disc_real_prob (its mean P(real) of the
samples) and disc_loss.

Sampling is seeded per answer, not drawn from a shared RNG stream: answer j of training example i at optimizer
step s is sampled with the Gumbel-max trick (the argmax of logits / temperature plus Gumbel noise, an exact draw
from the softmax) whose noise comes from a generator seeded by (seed, s, i, j) alone. So what an answer is does
not depend on which micro-batch or process samples it, nor on what else shares its batch: one process with
accumulation and N processes under DDP sample the same answers (tests/test_distributed.py), and a resumed run
samples exactly what the uninterrupted one did. Advantages are normalized within each prompt's group, which one
forward pass always holds whole, so the loss of a step (a mean over all its answers) and its gradient are the same
however the step is split. One policy update per generation: the ratio is 1 in value and the clip only matters for
its gradient form (as TRL's default num_iterations=1).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from lmtailor.config import Strict
from lmtailor.data.example import IGNORE, Example
from lmtailor.errors import ConfigError
from lmtailor.metrics import looping_share
from lmtailor.models import unwrap_peft
from lmtailor.objectives.causal import load_model, target_logits
from lmtailor.objectives.common import recipe_tokenizer
from lmtailor.objectives.discriminator import Discriminator, DiscriminatorSettings, answer_features, answer_ids
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import clip_messages, prompt_ids, prompt_messages


class GrpoRewards(Strict):
    """`grpo.reward:` the terms of the reward, summed with their weights (at least one must be set)."""

    exact_match: float = Field(0.0, ge=0, description="weight of 1 when the answer equals the data's reference")
    regex: str | None = Field(None, description="a pattern: 1 when the answer matches it (re.search)")
    regex_weight: float = Field(1.0, description="weight of the regex term")
    length: int | None = Field(None, ge=1, description="target answer length in characters: the term is "
                               "-|length - target| / target")
    length_weight: float = Field(1.0, description="weight of the length term")
    stop: float = Field(0.0, ge=0, description="weight of 1 when the answer ended with EOS within max_new_tokens")
    function: str | None = Field(None, description="FILE.py:NAME, a function (prompt, answer, reference) -> float "
                                 "in a Python file of your own; imported only because this key names it")
    function_weight: float = Field(1.0, description="weight of the function's reward")
    model: str | None = Field(None, description="a reward run (objective: reward) whose score of the prompt and "
                              "answer is the reward")
    model_weight: float = Field(1.0, description="weight of the reward run's score")
    discriminator: DiscriminatorSettings | None = Field(
        None, description="a judge trained alongside on the data's answers (real) versus the policy's samples "
        "(fake): its P(real) of a sample is the reward (method lora: it reads the base model's features)")

    @model_validator(mode="after")
    def _some(self) -> GrpoRewards:
        if not (self.exact_match or self.regex or self.length or self.stop or self.function or self.model
                or self.discriminator):
            raise ValueError("set at least one reward: exact_match, regex, length, stop, function, model or "
                             "discriminator")
        if self.function is not None and not re.fullmatch(r".+\.py:[A-Za-z_]\w*", self.function):
            raise ValueError(f"function must be FILE.py:NAME; got {self.function!r}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        return self


class GrpoSettings(Strict):
    """`grpo:` options."""

    group: int = Field(4, ge=2, description="answers sampled per prompt (advantages are relative within them)")
    max_new_tokens: int = Field(32, ge=1, description="longest sampled answer")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    beta: float = Field(0.04, ge=0, description="weight of the KL penalty to the reference (0: none)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clip range of the probability ratio")
    reward: GrpoRewards = Field(default_factory=lambda: GrpoRewards(stop=1.0))


@dataclass
class PromptItem:
    """A prompt's token ids (as the renderer gives them to generation), the data's reference answer, and the
    item's position in its split (what seeds its samples)."""

    input_ids: list[int]
    reference: str
    prompt: str
    index: int = 0


EVAL_STEP = -1  # the step part of the sampling seed of evaluations: every evaluation draws alike


def sample_seeds(seed: int, step: int, indices: Sequence[int], group: int) -> list[int]:
    """The seeds of the `group` answers to each prompt (items at `indices`) at optimizer step `step`: (B * group,)
    in the order the rollout repeats the prompts, each a function of (seed, step, index, answer) alone."""
    def one(*parts: int) -> int:
        return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0])

    return [one(seed, step, i, j) for i in indices for j in range(group)]


class GumbelSampler:
    """A logits processor that turns greedy decoding into sampling at `temperature` with one torch generator per row
    (Gumbel-max: argmax(logits / T + G) with G ~ Gumbel(0, 1) is a draw from softmax(logits / T)). A row's draws
    depend only on its own seed and logits, never on the other rows of its batch."""

    def __init__(self, seeds: Sequence[int], temperature: float) -> None:
        self.seeds, self.temperature = list(seeds), temperature
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, vocab = scores.shape  # (BG, V)
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        assert n == len(self.generators), "one seed per sampled row"
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        tiny = torch.finfo(u.dtype).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1 - 1e-7)))
        return scores.float() / self.temperature + gumbel


RewardFn = Callable[[str, str, str], float]


def load_function(spec: str, base: Path | None = None) -> RewardFn:
    """The function NAME of FILE.py (relative paths from the working directory).

    Raises:
        ConfigError: no such file or function.
    """
    file, name = spec.rsplit(":", 1)
    path = Path(file) if base is None or Path(file).is_absolute() else base / file
    if not path.is_file():
        raise ConfigError(f"config key 'grpo.reward.function': no file {path}", "give FILE.py:NAME of a file of yours")
    module_spec = importlib.util.spec_from_file_location(f"lmtailor_reward_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key 'grpo.reward.function': {path} has no function {name!r}",
                          "define def NAME(prompt, answer, reference) -> float")
    return fn  # type: ignore[no-any-return]


class Rewarder:
    """The recipe's reward terms, summed: reward(prompt, answer, reference, stopped) -> float."""

    def __init__(self, spec: GrpoRewards) -> None:
        self.spec = spec
        self.pattern = re.compile(spec.regex) if spec.regex else None
        self.fn = load_function(spec.function) if spec.function else None
        self.scorer: tuple[Any, Any] | None = None  # (model, tokenizer) of the reward run, loaded on first use

    def batch(self, prompts: list[str], answers: list[str], references: list[str], stopped: list[bool]
              ) -> list[float]:
        """Rewards of many answers; the reward run (if any) scores them in batches."""
        out = [self(p, a, r, s) for p, a, r, s in zip(prompts, answers, references, stopped, strict=True)]
        if self.spec.model:
            if self.scorer is None:
                from lmtailor.runs import Run

                self.scorer = Run.open(self.spec.model).load()
            from lmtailor.objectives.reward import conversation_ids, rewards

            model, tok = self.scorer
            seqs = [conversation_ids(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}], 512)
                    for p, a in zip(prompts, answers, strict=True)]
            scores = rewards(model, tok.pad_token_id, seqs).tolist()
            out = [x + self.spec.model_weight * y for x, y in zip(out, scores, strict=True)]
        return out

    def __call__(self, prompt: str, answer: str, reference: str, stopped: bool) -> float:
        s, total = self.spec, 0.0
        if s.exact_match:
            total += s.exact_match * float(answer.strip() == reference.strip())
        if self.pattern is not None:
            total += s.regex_weight * float(bool(self.pattern.search(answer)))
        if s.length:
            total -= s.length_weight * abs(len(answer) - s.length) / s.length
        if s.stop:
            total += s.stop * float(stopped)
        if self.fn is not None:
            total += s.function_weight * float(self.fn(prompt, answer, reference))
        return total


# ---- hooks ----------------------------------------------------------------------------------------------------

def prepare(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[PromptItem], dict[str, Any]]:
    """The prompts of chat examples (the reference is the last assistant turn), cut to max_length from the left."""
    tok, keep = ctx.tokenizer, ctx.cfg.max_length - ctx.settings.max_new_tokens
    if keep < 8:
        raise ConfigError(f"max_length ({ctx.cfg.max_length}) leaves no room for grpo.max_new_tokens "
                          f"({ctx.settings.max_new_tokens})", "raise max_length")
    items: list[PromptItem] = []
    for ex in examples:
        if ex.messages is None:
            continue
        history, reference = prompt_messages(ex)
        tail = clip_messages(tok, history, keep, keep="tail")  # work bounded by max_length, same last tokens
        items.append(PromptItem(prompt_ids(tok, tail)[-keep:], reference, history[-1]["content"], len(items)))
    return items, {"prompts": len(items), "tokens": sum(len(i.input_ids) for i in items)}


def collate(ctx: ObjectiveContext, items: list[PromptItem]) -> dict[str, torch.Tensor]:
    """Left-padded prompts (B, P), their mask, and the item positions (rewards look their texts up)."""
    pad = ctx.tokenizer.pad_token_id
    width = max(len(i.input_ids) for i in items)
    ids = torch.full((len(items), width), pad)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, item in enumerate(items):
        ids[r, width - len(item.input_ids):] = torch.tensor(item.input_ids)
        mask[r, width - len(item.input_ids):] = 1
    texts = ctx.stats.setdefault("grpo_texts", {})
    keys = []
    for item in items:  # prompt and reference by a small integer key: batches hold tensors only
        key = texts.setdefault((item.prompt, item.reference), len(texts))
        keys.append(key)
    return {"prompt_ids": ids, "prompt_mask": mask, "text_key": torch.tensor(keys),
            "item_index": torch.tensor([item.index for item in items]),
            "n_answers": torch.tensor(len(items) * ctx.settings.group)}


def count(batch: dict[str, torch.Tensor]) -> int:
    """Sampled answers of the batch: the loss is a mean over them (of each answer's token mean)."""
    return int(batch["n_answers"])


@dataclass
class Rollout:
    completions: torch.Tensor  # (BG, T)
    mask: torch.Tensor  # (BG, T) 1 on answer tokens through the first EOS
    answers: list[str]
    rewards: torch.Tensor  # (BG,)
    real: torch.Tensor | None = None  # (B, H) the judge's features of the references (with a discriminator)
    fake: torch.Tensor | None = None  # (BG, H) and of the samples


class GrpoLoss(nn.Module):
    def __init__(self, model: nn.Module, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.settings: GrpoSettings = ctx.settings
        self.rewarder = Rewarder(self.settings.reward)
        self.tok = ctx.tokenizer
        spec = self.settings.reward.discriminator
        if spec is not None and ctx.companion is None:  # one judge per run: evaluate and build share it
            width = 2 * int(unwrap_peft(model).config.hidden_size)  # embeddings and last states
            ctx.companion = Discriminator(width, spec, next(model.parameters()).device)
        self.judge: Discriminator | None = ctx.companion if spec is not None else None

    @torch.no_grad()
    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, text_key: torch.Tensor,
                group: int, seeds: Sequence[int]) -> Rollout:
        """Sample `group` answers per prompt (row r of the (B * group) rows drawn with seeds[r]) and score them."""
        from transformers import GenerationConfig, LogitsProcessorList

        s, tok = self.settings, self.tok
        ids, mask = prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0)
        # the policy's own distribution: a bare generation config (none of the model's sampling defaults), greedy
        # over logits the Gumbel sampler has perturbed with each row's own noise
        config = GenerationConfig(do_sample=False, max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        out = self.model.generate(input_ids=ids, attention_mask=mask,  # type: ignore[operator]
                                  generation_config=config,
                                  logits_processor=LogitsProcessorList([GumbelSampler(seeds, s.temperature)]))
        completions = out[:, ids.shape[1]:]  # (BG, T)
        eos = completions == tok.eos_token_id
        first = torch.where(eos.any(1), eos.int().argmax(1), completions.shape[1])
        steps = torch.arange(completions.shape[1], device=completions.device)
        cmask = (steps[None] <= first[:, None]).long()
        answers = [tok.decode(c[:int(f)], skip_special_tokens=True).strip() for c, f in zip(completions, first,
                                                                                            strict=True)]
        by_key = {v: k for k, v in self.ctx.stats["grpo_texts"].items()}
        texts = [by_key[int(k)] for k in text_key.repeat_interleave(group).tolist()]
        stopped = eos.any(1).tolist()
        rewards = torch.tensor(self.rewarder.batch([p for p, _ in texts], answers, [r for _, r in texts],
                                                   stopped), device=completions.device)
        if self.judge is None:
            return Rollout(completions, cmask, answers, rewards)
        limit, pad = s.max_new_tokens, tok.pad_token_id
        fake = answer_features(self.model, prompt_ids, prompt_mask, [i // group for i in range(len(answers))],
                               [answer_ids(tok, a, st, limit) for a, st in zip(answers, stopped, strict=True)], pad)
        real = answer_features(self.model, prompt_ids, prompt_mask, list(range(len(prompt_ids))),
                               [answer_ids(tok, r, True, limit) for _, r in texts[::group]], pad)
        judged = torch.sigmoid(self.judge.logits(fake))
        rewards = rewards + self.judge.settings.weight * judged.to(rewards.dtype)
        return Rollout(completions, cmask, answers, rewards, real, fake)

    def token_logps(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, r: Rollout) -> torch.Tensor:
        """(BG, T) log-probs of the answer tokens (0 outside the mask)."""
        group = r.completions.shape[0] // prompt_ids.shape[0]
        ids = torch.cat([prompt_ids.repeat_interleave(group, 0), r.completions], 1)
        mask = torch.cat([prompt_mask.repeat_interleave(group, 0), r.mask], 1)
        p = prompt_ids.shape[1]
        targets = torch.full_like(ids, IGNORE)
        targets[:, p - 1:-1] = torch.where(r.mask.bool(), r.completions, IGNORE)
        keep = targets != IGNORE
        logits = target_logits(self.model, ids, (mask.cumsum(-1) - 1).clamp(min=0), keep, mask).float()
        flat = torch.log_softmax(logits, -1).gather(-1, targets[keep][:, None])[:, 0]
        out = torch.zeros(ids.shape, dtype=flat.dtype, device=flat.device)
        out[keep] = flat
        return out[:, p - 1:-1]

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, text_key: torch.Tensor,
                item_index: torch.Tensor, n_answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        was = self.model.training
        self.model.eval()  # sampling without dropout
        training = torch.is_grad_enabled()  # a training pass (not validation)
        seeds = sample_seeds(self.ctx.cfg.seed, self.ctx.step if training else EVAL_STEP, item_index.tolist(),
                             s.group)
        r = self.rollout(prompt_ids, prompt_mask, text_key, s.group, seeds)
        self.model.train(was)
        grouped = r.rewards.view(-1, s.group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        logp = self.token_logps(prompt_ids, prompt_mask, r)
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - s.epsilon, 1 + s.epsilon) * adv)
        kl = torch.zeros_like(logp)
        if s.beta:
            disable = getattr(self.model, "disable_adapter", None)
            assert disable is not None, "build refuses grpo with beta > 0 without an adapter"
            with torch.no_grad(), disable():
                ref = self.token_logps(prompt_ids, prompt_mask, r)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token + s.beta * kl
        m = r.mask.float()
        per_answer = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
        self.ctx.log(reward_mean=float(r.rewards.mean()), reward_std=float(r.rewards.std()),
                     kl=float((kl.detach() * m).sum() / m.sum().clamp(min=1)), answer_length=float(m.sum(1).mean()),
                     looping=looping_share(r.answers))
        if self.judge is not None and r.real is not None and r.fake is not None:
            with torch.no_grad():
                real_logits, fake_logits = self.judge.logits(r.real), self.judge.logits(r.fake)
            self.ctx.log(disc_accuracy=Discriminator.accuracy(real_logits, fake_logits),
                         disc_real_prob=float(torch.sigmoid(fake_logits).mean()))
            if training:  # the judge's turn comes after the step's last pass (Discriminator.after_step)
                self.judge.observe(r.real, r.fake)
        return per_answer.sum(), torch.tensor(len(per_answer), device=per_answer.device)


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    if ctx.settings.beta and ctx.cfg.method != "lora":
        raise ConfigError(f"grpo's KL reference is the model with its adapter disabled: method {ctx.cfg.method} "
                          "has none", "use method lora, or grpo.beta=0")
    if ctx.settings.reward.discriminator is not None and ctx.cfg.method != "lora":
        raise ConfigError(f"grpo.reward.discriminator reads the base model's features (adapter disabled): method "
                          f"{ctx.cfg.method} has no adapter", "use method lora")
    return GrpoLoss(model, ctx)


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[PromptItem], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Mean and spread of the reward of `group` answers sampled per held-out prompt (a fixed seed, so every
    evaluation draws alike), answer length and the share of looping answers."""
    if not items:
        return Evaluation()
    loss_module = GrpoLoss(model, ctx)
    model.eval()
    device = next(model.parameters()).device
    rewards, lengths, answers = [], [], []
    for i in range(0, len(items), 8):
        batch = collate(ctx, list(items[i:i + 8]))
        seeds = sample_seeds(ctx.cfg.seed, EVAL_STEP, batch["item_index"].tolist(), ctx.settings.group)
        r = loss_module.rollout(batch["prompt_ids"].to(device), batch["prompt_mask"].to(device),
                                batch["text_key"].to(device), ctx.settings.group, seeds)
        rewards.append(r.rewards.cpu())
        lengths.append(r.mask.sum(1).float().cpu())
        answers += r.answers
    all_r = torch.cat(rewards)
    return Evaluation({"reward_mean": float(all_r.mean()), "reward_std": float(all_r.std()),
                       "answer_length": float(torch.cat(lengths).mean()), "looping": looping_share(answers),
                       "prompts": len(items),
                       "samples": [{"prompt": it.prompt, "reference": it.reference, "prediction": a}
                                   for it, a in zip(items, answers[::ctx.settings.group], strict=False)]})


register_objective("grpo", "online RL: sample a group of answers per prompt, score them with the recipe's rewards, "
                   "clipped group-relative policy gradient with a KL penalty to the reference (LoRA disabled)",
                   settings=GrpoSettings, tokenizer=recipe_tokenizer, model=load_model, prepare=prepare,
                   collate=collate, count=count, build=build, evaluate=evaluate, primary_metric="reward_mean",
                   metrics=("reward_mean", "looping"))
