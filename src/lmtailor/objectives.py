"""Training objectives: registered by short name, each wraps a model into a module `batch -> (loss_sum, n)`.

The training loop divides `loss_sum` by the number of supervised tokens of the whole optimizer step (over all
micro-batches and processes), so the loss is a token mean that does not depend on how a step is split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.data.packing import collate
from lmtailor.models import unwrap_peft
from lmtailor.render import IGNORE, Tokenized, tokenize_all


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


# ---- hooks: how an objective loads its model, turns examples into items, batches them and evaluates ----------

def load_causal_lm(cfg: RunConfig, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from lmtailor.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    return load_model(cfg.base_model, dtype=dtype, trust_remote_code=cfg.trust_remote_code), tok


def prepare_render(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool
                   ) -> tuple[list[Tokenized], dict[str, Any]]:
    seqs, dropped = tokenize_all(tok, examples, cfg.max_length, train_on_prompt)
    return seqs, {"sequences": len(seqs), "dropped_no_target": dropped,
                  "tokens": sum(len(s.input_ids) for s in seqs), "supervised_tokens": sum(s.n_supervised for s in seqs)}


def collate_packed(items: list[Tokenized], tok: Any, cfg: RunConfig) -> dict[str, torch.Tensor]:
    return collate(items, tok.pad_token_id, cfg.packing, cfg.pack_length, cfg.share_prefix)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def evaluate_causal(model: nn.Module, tok: Any, items: list[Tokenized], examples: list[Example], cfg: RunConfig,
                    label: str = "", progress: bool = True) -> dict[str, Any]:
    from lmtailor.evaluate import evaluate_model

    return evaluate_model(model, tok, items, examples, cfg.generation, cfg.eval.generate_examples,
                          progress=progress, label=label)


def item_tokens(item: Any) -> int:
    """Tokens an item feeds the model (throughput accounting)."""
    ids = getattr(item, "input_ids", None)
    return len(ids) if ids is not None else 0


@dataclass(frozen=True)
class Objective:
    """A registered training objective and the hooks the training loop calls.

    build: model -> loss module whose forward(**batch) returns (sum of losses, number of loss terms).
    load: (cfg, dtype) -> (model, tokenizer). prepare: (tok, examples, cfg, train_on_prompt) -> (items, stats).
    collate: (items, tok, cfg) -> batch of tensors. count: batch -> number of loss terms in it.
    evaluate: (model, tok, items, examples, cfg, label, progress) -> metrics dict (held-out, before and after).
    """

    name: str
    description: str
    build: Callable[[nn.Module], nn.Module]
    train_on_prompt: bool = False
    load: Callable[..., tuple[nn.Module, Any]] = load_causal_lm
    prepare: Callable[..., tuple[list[Any], dict[str, Any]]] = prepare_render
    collate: Callable[..., dict[str, torch.Tensor]] = collate_packed
    count: Callable[[dict[str, torch.Tensor]], int] = count_targets
    evaluate: Callable[..., dict[str, Any]] = evaluate_causal


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, description: str, build: Callable[[nn.Module], nn.Module],
                       train_on_prompt: bool = False, **hooks: Callable[..., Any]) -> Objective:
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
    unknown = set(hooks) - {"load", "prepare", "collate", "count", "evaluate"}
    if unknown or not all(callable(h) for h in hooks.values()):
        raise ValueError(f"objective {name!r}: hooks must be callables among load, prepare, collate, count, evaluate")
    OBJECTIVES[name] = Objective(name, description, build, train_on_prompt, **hooks)
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
