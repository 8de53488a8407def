"""Training objectives: registered by short name, each wraps a model into a module `batch -> (loss_sum, n)`.

The training loop divides `loss_sum` by the number of supervised tokens of the whole optimizer step (over all
micro-batches and processes), so the loss is a token mean that does not depend on how a step is split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.data.packing import collate, segment_mask
from lmtailor.models import is_prompt_learning, unwrap_peft
from lmtailor.render import IGNORE, Tokenized, tokenize_all

SEGMENT_ATTENTION = "lmtailor_segments"


def segment_bounds(segment_ids: torch.Tensor) -> list[tuple[int, list[tuple[int, int]]]]:
    """(R, L) segment ids (0 shared prefix, 1.. examples, -1 padding) -> per row (prefix length, [(start, end)])."""
    rows = []
    for row in segment_ids.tolist():
        prefix = sum(1 for x in row if x == 0)
        spans: list[tuple[int, int]] = []
        start = prefix
        for i in range(prefix + 1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                if row[start] > 0:
                    spans.append((start, i))
                start = i
        rows.append((prefix, spans))
    return rows


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      packed_segments: list[tuple[int, list[tuple[int, int]]]] | None = None, **kwargs: Any
                      ) -> tuple[torch.Tensor, None]:
    """Attention of packed rows computed example by example.

    A dense block-diagonal mask makes the CPU kernel pay for the whole L x L square of a packed row; here each
    example attends to the shared prefix and, causally, to itself, so the cost is the sum of its own squares.
    query: (R, Hq, L, D); key/value: (R, Hkv, L, D); returns (R, L, Hq, D) like transformers' sdpa path.
    """
    assert packed_segments is not None, "segment attention needs packed_segments"
    gqa = query.shape[1] != key.shape[1]
    out = torch.zeros_like(query)
    for r, (p, spans) in enumerate(packed_segments):
        if p:
            out[r:r + 1, :, :p] = F.scaled_dot_product_attention(
                query[r:r + 1, :, :p], key[r:r + 1, :, :p], value[r:r + 1, :, :p], is_causal=True, scale=scaling,
                dropout_p=dropout, enable_gqa=gqa)
        for a, b in spans:
            q = query[r:r + 1, :, a:b]
            if p:
                k = torch.cat([key[r:r + 1, :, :p], key[r:r + 1, :, a:b]], dim=2)
                v = torch.cat([value[r:r + 1, :, :p], value[r:r + 1, :, a:b]], dim=2)
                # every query sees the whole prefix and the example up to itself
                mask = torch.ones(b - a, p + b - a, dtype=torch.bool, device=q.device).tril(diagonal=p)
                out[r:r + 1, :, a:b] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                                      dropout_p=dropout, enable_gqa=gqa)
            else:
                out[r:r + 1, :, a:b] = F.scaled_dot_product_attention(
                    q, key[r:r + 1, :, a:b], value[r:r + 1, :, a:b], is_causal=True, scale=scaling,
                    dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, lambda *args, **kwargs: None)  # no L x L mask is built


_register_segment_attention()


@contextlib.contextmanager
def _attention(config: Any, name: str) -> Iterator[None]:
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy computed only where a target exists.

    The output head runs on the supervised positions alone: with a 49k vocabulary the logits of every position
    (B*T*V floats) cost more memory traffic than the rest of the step, and most positions carry no loss in SFT.
    Packed rows (`segment_ids`) are attended example by example on CPU; elsewhere through a block mask.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if is_prompt_learning(self.model):
            return self._through_peft(input_ids, targets, attention_mask, segment_ids)
        hf: Any = unwrap_peft(self.model)
        backbone = hf.base_model  # the decoder stack without the LM head (e.g. LlamaModel)
        head = hf.get_output_embeddings()
        kwargs: dict[str, Any] = {}
        ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if segment_ids is not None:
            plain = hf.config._attn_implementation in (None, "sdpa", "eager")
            if input_ids.device.type == "cpu" and plain and not getattr(hf.config, "sliding_window", None):
                kwargs["packed_segments"] = segment_bounds(segment_ids)
                ctx = _attention(hf.config, SEGMENT_ATTENTION)
            elif bool((segment_ids == 0).any()):
                attention_mask = segment_mask(segment_ids)
            # else: position ids restarting at 0 give transformers' own block-diagonal mask
        with ctx:
            hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              use_cache=False, **kwargs).last_hidden_state  # (R, L, H)
        keep = targets != IGNORE  # (R, L)
        logits = head(hidden[keep])  # (N, V): only supervised positions
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()

    def _through_peft(self, input_ids: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None,
                      segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft prompts live in the PEFT model's forward, which puts virtual tokens before every sequence: packed
        rows are split back into their examples (shared prefix included) and run as a padded batch."""
        seqs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if segment_ids is None:
            lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(
                input_ids)
            seqs = [(input_ids[r, :n], targets[r, :n]) for r, n in enumerate(lengths)]
        else:
            for r, (p, spans) in enumerate(segment_bounds(segment_ids)):
                for a, b in spans:
                    seqs.append((torch.cat([input_ids[r, :p], input_ids[r, a:b]]),
                                 torch.cat([targets[r, :p], targets[r, a:b]])))
        width = max(len(ids) for ids, _ in seqs)
        ids = input_ids.new_zeros(len(seqs), width)
        tgt = targets.new_full((len(seqs), width), IGNORE)
        mask = input_ids.new_zeros(len(seqs), width)
        for i, (x, y) in enumerate(seqs):
            ids[i, :len(x)], tgt[i, :len(y)], mask[i, :len(x)] = x, y, 1
        keep = tgt != IGNORE
        peft_model: Any = self.model
        peft_type = str(getattr(peft_model.active_peft_config, "peft_type", ""))
        if peft_type.endswith("PROMPT_TUNING"):
            # What PEFT's forward does (virtual token embeddings before the inputs), but with the output head on
            # the supervised positions only instead of the logits of every position.
            hf: Any = unwrap_peft(self.model)
            embeds = hf.get_input_embeddings()(ids)  # (B, W, H)
            if not getattr(self.model, "_adapters_disabled", False):
                prompts = peft_model.get_prompt(batch_size=len(seqs)).to(embeds.dtype)  # (B, P, H)
                embeds = torch.cat([prompts, embeds], dim=1)
                mask = torch.cat([mask.new_ones(len(seqs), prompts.shape[1]), mask], dim=1)
            hidden = hf.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            logits = hf.get_output_embeddings()(hidden[:, -width:][keep])  # (N, V)
        else:  # prefix tuning and others: through PEFT's own forward
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -width:][keep]  # after virtual tokens
        loss = F.cross_entropy(logits.float(), tgt[keep], reduction="sum")
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

import lmtailor.pretrain.objectives  # noqa: E402,F401  (registers mlm, span; pretraining hooks of clm)
import lmtailor.tasks.classify  # noqa: E402,F401  (registers the task objectives)
import lmtailor.tasks.seq2seq  # noqa: E402,F401
