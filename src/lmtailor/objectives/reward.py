"""Reward models: `objective: reward` trains a scalar head on preference pairs (Bradley-Terry), and `score` rates
any conversation with a trained reward run.

The model is the base with a one-output sequence-classification head (on a decoder, on the last non-pad token, as
`classify` does); a pair's loss is -log sigmoid(r(chosen) - r(rejected)), optionally plus a small penalty that
keeps rewards centred on 0 (TRL's center_rewards_coefficient). Conversations are rendered by the one renderer, so
the reward sees exactly the text a chat model writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmtailor.config import Strict
from lmtailor.data.example import Example
from lmtailor.errors import DataError
from lmtailor.objectives.classify import ClassItem, collate_items
from lmtailor.objectives.common import override_dropout, recipe_tokenizer
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import clip_messages, tokenize_example

EVAL_BATCH = 16


class RewardSettings(Strict):
    """`reward:` options."""

    center: float = Field(0.0, ge=0, description="weight of the mean squared reward (r_chosen + r_rejected)^2, "
                          "which keeps rewards centred on 0 (TRL's center_rewards_coefficient, e.g. 0.01)")
    dropout: float | None = Field(None, ge=0, lt=1, description="override every dropout probability of the model "
                                  "config")


@dataclass
class RewardPair:
    """The token ids of prompt + chosen and prompt + rejected, as rendered."""

    chosen: list[int]
    rejected: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.chosen + self.rejected


def conversation_ids(tok: Any, messages: list[dict[str, str]], max_length: int) -> list[int]:
    """A whole conversation's token ids through the one renderer, cut to the last max_length tokens (the answer,
    which the head reads at the end, is kept)."""
    tail = clip_messages(tok, messages, max_length, keep="tail")  # work bounded by max_length, same last tokens
    ids = tokenize_example(tok, Example(messages=tail), 1 << 62)[0].input_ids
    return ids[-max_length:]


def bradley_terry_loss(rc: torch.Tensor, rr: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(rc - rr) + center * (rc + rr)^2."""
    loss = -F.logsigmoid(rc - rr)
    return loss + center * (rc + rr) ** 2 if center else loss


# ---- hooks --------------------------------------------------------------------------------------------------

def load_model(ctx: ObjectiveContext, dtype: torch.dtype) -> nn.Module:
    """The base model with a new one-output head."""
    from lmtailor.models import load_model_config, load_pretrained

    cfg, s = ctx.cfg, ctx.settings
    config = load_model_config(cfg.base_model, cfg.trust_remote_code)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.problem_type = "regression"
    config.pad_token_id = ctx.tokenizer.pad_token_id  # a decoder head finds the last token by it
    if s.dropout is not None:
        override_dropout(config, s.dropout)
    return load_pretrained(cfg.base_model, "AutoModelForSequenceClassification", dtype=dtype, config=config,
                           trust_remote_code=cfg.trust_remote_code)


def prepare(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[RewardPair], dict[str, Any]]:
    tok, max_length = ctx.tokenizer, ctx.cfg.max_length
    items = []
    for ex in examples:
        if "rejected" not in ex.meta or ex.messages is None:
            raise DataError(f"{ex.source}: objective reward needs preference pairs (fields prompt or messages, "
                            "chosen, rejected)", "use data.format: preference")
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        history = ex.messages[:last_user + 1]
        items.append(RewardPair(conversation_ids(tok, ex.messages, max_length),
                                conversation_ids(tok, history + ex.meta["rejected"], max_length)))
    return items, {"pairs": len(items), "tokens": sum(len(it.input_ids) for it in items)}


def collate(ctx: ObjectiveContext, items: list[RewardPair]) -> dict[str, torch.Tensor]:
    """2B right-padded rows: the chosen conversations, then the rejected ones."""
    rows = [ClassItem(it.chosen, 0) for it in items] + [ClassItem(it.rejected, 0) for it in items]
    batch = collate_items(rows, ctx.tokenizer.pad_token_id)
    del batch["labels"]
    return batch


def count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0]) // 2


class RewardLoss(nn.Module):
    def __init__(self, model: nn.Module, center: float) -> None:
        super().__init__()
        self.model = model
        self.center = center

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # (2B,)
        rc, rr = rewards.chunk(2)
        loss = bradley_terry_loss(rc, rr, self.center)
        return loss.sum(), torch.tensor(len(rc), device=loss.device)


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    return RewardLoss(model, ctx.settings.center)


@torch.inference_mode()
def rewards(model: nn.Module, pad_id: int, seqs: Sequence[list[int]], batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """(N,) scalar rewards of token sequences, in order (batched by length)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_items([ClassItem(seqs[i], 0) for i in idx], pad_id)
        out[idx] = model(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits[:, 0].float().cpu()
    return out


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[RewardPair], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Pairwise accuracy (the chosen answer scored higher), the mean margin and the Bradley-Terry loss."""
    if not items:
        return Evaluation()
    r = rewards(model, ctx.tokenizer.pad_token_id, [it.chosen for it in items] + [it.rejected for it in items])
    rc, rr = r.chunk(2)
    return Evaluation({"loss": float(bradley_terry_loss(rc, rr, ctx.settings.center).mean()),
                       "accuracy": float((rc > rr).float().mean()), "margin": float((rc - rr).mean()),
                       "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()), "pairs": len(items)})


def score(run: Any, conversations: list[list[dict[str, str]]], batch_size: int = EVAL_BATCH) -> list[float]:
    """Rewards of conversations (each ending with the answer to score) from a trained reward run (a folder or an
    opened `Run`)."""
    from lmtailor.runs import Run

    opened = run if isinstance(run, Run) else Run.open(run)
    model, tok = opened.load()
    max_length = int(opened.config.get("max_length", 512))
    seqs = [conversation_ids(tok, c, max_length) for c in conversations]
    return rewards(model, tok.pad_token_id, seqs, batch_size).tolist()


register_objective("reward", "reward model: a scalar head trained on chosen/rejected pairs (Bradley-Terry)",
                   settings=RewardSettings, tokenizer=recipe_tokenizer, model=load_model, prepare=prepare,
                   collate=collate, count=count, build=build, evaluate=evaluate, primary_metric="accuracy",
                   metrics=("accuracy", "margin"))
