"""Training objectives: registered by short name, each wraps a model into a module `batch -> (loss_sum, n)`.

The training loop divides `loss_sum` by the number of supervised tokens of the whole optimizer step (over all
micro-batches and processes), so the loss is a token mean that does not depend on how a step is split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.models import unwrap_peft
from lmtailor.render import IGNORE


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy computed only where a target exists.

    The output head runs on the supervised positions alone: with a 49k vocabulary the logits of every position
    (B*T*V floats) cost more memory traffic than the rest of the step, and most positions carry no loss in SFT.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hf = unwrap_peft(self.model)
        backbone = hf.base_model  # the decoder stack without the LM head (e.g. LlamaModel)
        head = hf.get_output_embeddings()
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state  # (R, L, H)
        keep = targets != IGNORE  # (R, L)
        logits = head(hidden[keep])  # (N, V): only supervised positions
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    build: Callable[[nn.Module], nn.Module]
    train_on_prompt: bool  # supervise every token (pretraining) rather than assistant turns only


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, description: str, build: Callable[[nn.Module], nn.Module],
                       train_on_prompt: bool = False) -> Objective:
    """Add an objective selectable as `objective: NAME` in a recipe.

    Raises:
        ValueError: the name is taken or not a lowercase identifier, or build is not callable.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"objective name must be lowercase letters, digits, - or _: {name!r}")
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    if not callable(build):
        raise ValueError(f"objective {name!r}: build must be callable")
    OBJECTIVES[name] = Objective(name, description, build, train_on_prompt)
    return OBJECTIVES[name]


def get_objective(name: str) -> Objective:
    from lmtailor.errors import ConfigError

    if name not in OBJECTIVES:
        raise ConfigError(f"config key 'objective': unknown objective {name!r}",
                          f"allowed values are {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


register_objective("sft", "causal LM loss on assistant turns of chats (instruction tuning)", CausalLMLoss)
register_objective("clm", "causal LM loss on every token (continued pretraining on raw text)", CausalLMLoss,
                   train_on_prompt=True)
