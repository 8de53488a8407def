"""Causal language modelling: `sft` (loss on the assistant turns of chats) and `clm` (loss on every token, for
continued pretraining or a model from scratch), their loss, evaluation and sliding-window perplexity.

The loss module returns (sum of token losses, number of target tokens); the training loop divides by the target
count of the whole optimizer step (over all micro-batches and processes), so the loss is a token mean that does
not depend on how a step is split.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from lmtailor.config import Strict
from lmtailor.data.example import Example
from lmtailor.data.packing import collate as pack_collate
from lmtailor.data.packing import segment_mask
from lmtailor.generate import generate
from lmtailor.metrics import chrf, exact_match, looping_share, perplexity, tool_call_metrics
from lmtailor.models import is_prompt_learning, unwrap_peft
from lmtailor.objectives.attention import SEGMENT_ATTENTION, attention_implementation, segment_bounds
from lmtailor.objectives.common import prepare_blocks, recipe_model, recipe_tokenizer, texts
from lmtailor.objectives.registry import Evaluation, ObjectiveContext, register_objective
from lmtailor.render import IGNORE, Tokenized, encode_long, prompt_messages, tokenize_all
from lmtailor.toolcalls import answer_text


class ClmSettings(Strict):
    """`clm:` options."""

    eval_context: int | None = Field(None, ge=8, description="sliding-window perplexity of the held-out texts with "
                                     "this context, reported as window_perplexity (default: not computed)")
    eval_stride: int | None = Field(None, ge=1, description="tokens the window advances (default context / 2)")


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy computed only where a target exists.

    The output head runs on the supervised positions alone: with a 49k vocabulary the logits of every position
    (B*T*V floats) cost more memory traffic than the rest of the step, and most positions carry no loss in SFT.
    Packed rows (`segment_ids`) are attended example by example on CPU; elsewhere through a block mask.
    """

    def __init__(self, model: nn.Module, shared_prefix: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.shared_prefix = shared_prefix  # False: rows never hold a shared prefix (no host sync to look for one)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if is_prompt_learning(self.model):
            return self._through_peft(input_ids, targets, attention_mask, segment_ids)
        keep = targets != IGNORE  # (R, L)
        logits = target_logits(self.model, input_ids, position_ids, keep, attention_mask, segment_ids,
                               self.shared_prefix)
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


SHAPE_STEP = 64


def _cpu_bf16_autocast(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def target_logits(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                  shared_prefix: bool | None = None) -> torch.Tensor:
    """(N, V) logits of the positions where `keep` (R, L) is true, for padded or packed rows (see CausalLMLoss).
    `shared_prefix` False: the packed rows hold no shared prefix (segment 0), so a GPU run need not read the
    segments back to the host to find out before the forward pass."""
    hf: Any = unwrap_peft(model)
    backbone = hf.base_model  # the decoder stack without the LM head (e.g. LlamaModel)
    if segment_ids is not None and _cpu_bf16_autocast(input_ids.device):
        # Packed rows on CPU under bf16 autocast: oneDNN builds (and caches) a kernel per matrix shape, which costs
        # more than the product itself when the row width changes every step; padding the width to a multiple of
        # SHAPE_STEP makes shapes repeat (benchmarks/finetune_throughput.py, bf16 LoRA on an AMX Xeon: about +20%
        # tokens/s). The padding is a segment of its own that nothing attends to and that has no targets.
        pad = -input_ids.shape[1] % SHAPE_STEP
        input_ids, keep = F.pad(input_ids, (0, pad)), F.pad(keep, (0, pad))
        position_ids = torch.cat([position_ids, torch.arange(pad).expand(len(position_ids), pad)], dim=1)
        segment_ids = F.pad(segment_ids, (0, pad), value=-1)
    head = hf.get_output_embeddings()
    kwargs: dict[str, Any] = {}
    ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if segment_ids is not None:
        plain = hf.config._attn_implementation in (None, "sdpa", "eager")
        if input_ids.device.type == "cpu" and plain and not getattr(hf.config, "sliding_window", None):
            kwargs["packed_segments"] = segment_bounds(segment_ids)
            ctx = attention_implementation(hf.config, SEGMENT_ATTENTION)
        elif shared_prefix is not False and bool((segment_ids == 0).any()):
            attention_mask = segment_mask(segment_ids)
        # else: position ids restarting at 0 give transformers' own block-diagonal mask
    with ctx:
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False, **kwargs).last_hidden_state  # (R, L, H)
    logits = head(hidden[keep])  # (N, V): only supervised positions
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ---- hooks ----------------------------------------------------------------------------------------------------

def load_model(ctx: ObjectiveContext, dtype: torch.dtype) -> nn.Module:
    """A causal LM (pretrained, or built from `pretrain.scratch`), then depth-pruned / RoPE-scaled if asked."""
    from lmtailor.pretrain.structure import keep_first_layers, scale_rope

    model = recipe_model(ctx, dtype, "AutoModelForCausalLM")
    p = ctx.cfg.pretrain
    config: Any = model.config
    if p.keep_layers:
        before = config.num_hidden_layers
        keep_first_layers(model, p.keep_layers)
        print(f"depth pruning: kept the first {p.keep_layers} of {before} layers")
    if p.rope_factor:
        scale_rope(model, p.rope_factor)
        print(f"RoPE scaling: linear x{p.rope_factor:g}, max positions {config.max_position_embeddings}")
    return model


def prepare_chats(ctx: ObjectiveContext, examples: list[Example]) -> tuple[list[Tokenized], dict[str, Any]]:
    """Render and tokenize through the one chat renderer; the loss covers answers (or everything)."""
    seqs, dropped = tokenize_all(ctx.tokenizer, examples, ctx.cfg.max_length, ctx.train_on_prompt)
    return seqs, {"sequences": len(seqs), "dropped_no_target": dropped,
                  "tokens": sum(len(s.input_ids) for s in seqs), "supervised_tokens": sum(s.n_supervised for s in seqs)}


def prepare_text(ctx: ObjectiveContext, examples: list[Example]) -> tuple[Any, dict[str, Any]]:
    """clm: blocks of the token cache with pretrain.cache, else the rendered examples."""
    return prepare_blocks(ctx, examples) if ctx.cfg.pretrain.cache else prepare_chats(ctx, examples)


def collate(ctx: ObjectiveContext, items: list[Tokenized]) -> dict[str, torch.Tensor]:
    cfg = ctx.cfg
    return pack_collate(items, ctx.tokenizer.pad_token_id, cfg.packing, cfg.pack_length, cfg.share_prefix)


def count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def build(ctx: ObjectiveContext, model: nn.Module) -> nn.Module:
    return CausalLMLoss(model, shared_prefix=ctx.cfg.share_prefix)


@torch.inference_mode()
def loss_sums(loss_module: nn.Module, seqs: Sequence[Tokenized], pad_id: int, batch_tokens: int = 2048,
              row_tokens: int = 512, progress: bool = False, desc: str = "eval loss") -> tuple[float, int]:
    """(sum of token losses, supervised tokens) over `seqs`, in batches of `batch_tokens` packed in rows."""
    total, count = 0.0, 0
    device = next(loss_module.parameters()).device
    batches: list[list[Tokenized]] = []
    cur: list[Tokenized] = []
    size = 0
    for i in range(len(seqs)):  # by position: seqs may be a memory-mapped sequence
        s = seqs[i]
        if cur and size + len(s.input_ids) > batch_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += len(s.input_ids)
    if cur:
        batches.append(cur)
    for group in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
        # Rows of at most row_tokens: attention cost grows with the square of the row length.
        width = max(row_tokens, max(len(s.input_ids) for s in group))
        batch = pack_collate(group, pad_id, packing=True, pack_length=width, share_prefix=True)
        loss, n = loss_module(**{k: v.to(device) for k, v in batch.items()})
        total += float(loss)
        count += int(n)
    return total, count


def sample(ex: Example, prompt: str, reference: str, prediction: str) -> dict[str, Any]:
    """One sample answer for the reports: the prompt as the model saw it and, where retrieval added to it, the
    request as written with what was shown (the nearest training pair, or the passages' sources)."""
    out: dict[str, Any] = {"prompt": prompt, "reference": reference, "prediction": prediction}
    if "query" in ex.meta:
        out["question"] = str(ex.meta["query"])
        if "nearest" in ex.meta:
            out["shown"] = "its nearest training pair: {} -> {}".format(*ex.meta["nearest"])
        elif ex.meta.get("passages"):
            out["shown"] = f"{len(ex.meta['passages'])} passages from " + ", ".join(
                dict.fromkeys(str(p.get("source")) for p in ex.meta["passages"]))
    return out


def generation_examples(ctx: ObjectiveContext, examples: Sequence[Example]) -> list[Example]:
    """The held-out chats answered by generation: the first eval.generate_examples (default 40)."""
    limit = ctx.cfg.eval.generate_examples if ctx.cfg.eval.generate_examples is not None else 40
    return [ex for ex in examples if ex.messages is not None][:limit] if limit else []


def baseline(ctx: ObjectiveContext, train: Sequence[Example], val: Sequence[Example]) -> dict[str, dict[str, float]]:
    """The answer of the nearest training question (BM25), and copying the question, on the evaluated chats, scored
    as the evaluation scores the model: answers and references as text (a tool call as its <tool_call> block), and
    the tool-call scores of the nearest answer where the references call tools."""
    from lmtailor.baselines import answer_baselines, nearest_answers

    chats = generation_examples(ctx, val)
    if not chats:
        return {}
    chats_train = [ex for ex in train if ex.messages is not None]
    # the requests as the data gave them (data.retrieved_examples adds solved examples to the prompts)
    questions = [ex.meta.get("query", prompt_messages(ex)[0][-1]["content"]) for ex in chats_train]
    answers = [reference_text(ex) for ex in chats_train]
    held = [ex.meta.get("query", prompt_messages(ex)[0][-1]["content"]) for ex in chats]
    nearest = nearest_answers(questions, answers, held)  # one BM25 index for the text and the tool-call scores
    out = answer_baselines(questions, answers, held, [reference_text(ex) for ex in chats], nearest)
    calls = [reference_calls(ex) for ex in chats]
    called = [i for i, k in enumerate(calls) if k]
    if called and "nearest_answer" in out:
        out["nearest_answer"].update(tool_call_metrics([nearest[i] for i in called], [calls[i] or [] for i in called],
                                                       [chats[i].tools for i in called]))
    return out


def reference_text(ex: Example) -> str:
    """A chat's last assistant answer as the evaluation compares it: its content, a tool call as its block."""
    content = prompt_messages(ex)[1]
    calls = reference_calls(ex)
    return answer_text(content, calls) if calls else content


def reference_calls(ex: Example) -> list[dict[str, Any]] | None:
    """The tool calls of a chat's last assistant turn (None: it calls none)."""
    assert ex.messages is not None
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    calls = ex.messages[last].get("tool_calls")
    return json.loads(calls) if calls else None


def evaluate(ctx: ObjectiveContext, model: nn.Module, items: Sequence[Tokenized], examples: Sequence[Example],
             progress: bool = True, desc: str = "") -> Evaluation:
    """Loss and perplexity on the held-out items; exact match and chrF of greedy answers to the first
    eval.generate_examples chat examples (offered their tools), with the answers as samples, and tool-call scores
    where the reference calls a tool (`metrics.tool_call_metrics`); clm: sliding-window perplexity if asked."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    model.eval()
    out: dict[str, Any] = {}
    if items:
        total, n = loss_sums(CausalLMLoss(model), items, tok.pad_token_id, progress=progress,
                             desc=f"{desc} loss".strip())
        out.update(loss=total / max(n, 1), perplexity=perplexity(total / max(n, 1)), eval_tokens=n)
    chats = generation_examples(ctx, examples)
    if chats:
        prompts = [prompt_messages(ex)[0] for ex in chats]
        calls = [reference_calls(ex) for ex in chats]
        refs = [reference_text(ex) for ex in chats]  # a reference call as the text its <tool_call> block writes
        preds = generate(model, tok, list(prompts), cfg.generation, progress=progress,
                         desc=f"{desc} generate".strip(), tools=[ex.tools for ex in chats])
        out.update(exact_match=exact_match(preds, refs), chrf=chrf(preds, refs), looping=looping_share(preds))
        called = [i for i, k in enumerate(calls) if k]
        if called:  # chats whose reference answer calls a tool: parse rate, tool name, arguments
            out.update(tool_call_metrics([preds[i] for i in called], [calls[i] or [] for i in called],
                                         [chats[i].tools for i in called]))
        out["samples"] = [sample(ex, p[-1]["content"], r, y) for ex, p, r, y in zip(chats, prompts, refs, preds,
                                                                                    strict=True)]
    settings = ctx.settings
    if isinstance(settings, ClmSettings) and settings.eval_context and examples:
        context = settings.eval_context
        out["window_perplexity"] = sliding_window_perplexity(model, tok, texts(examples), context,
                                                             settings.eval_stride or max(1, context // 2))
    return Evaluation(out)


# ---- sliding-window perplexity ------------------------------------------------------------------------------

def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over n tokens.

    Every token but the first is scored exactly once, by the window where it is newest, with up to
    context - stride tokens of history before the scored stretch (stride = context: disjoint chunks).
    """
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        out.append((begin, end, max(prev_end, 1)))
        prev_end = end
        if end == n:
            break
    return out


@torch.inference_mode()
def sliding_window_nll(model: nn.Module, ids: list[int], context: int, stride: int, batch: int = 8
                       ) -> tuple[float, int]:
    """(sum of negative log-likelihoods, scored tokens) of one token stream."""
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed context ({context})")
    loss_module = CausalLMLoss(model)
    device = next(model.parameters()).device
    rows = []
    for begin, end, first in windows(len(ids), context, stride):
        x = ids[begin:end]
        # position i predicts token begin + i + 1; only tokens from `first` on are scored here
        tgt = [ids[begin + i + 1] if begin + i + 1 >= first and begin + i + 1 < end else IGNORE
               for i in range(len(x))]
        rows.append((x, tgt))
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        group = rows[i:i + batch]
        width = max(len(x) for x, _ in group)
        xs = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in group], device=device)  # (R, W)
        ts = torch.tensor([r[1] + [IGNORE] * (width - len(r[1])) for r in group], device=device)
        pos = torch.arange(width, device=device).expand(len(group), -1)
        loss, n = loss_module(input_ids=xs, targets=ts, position_ids=pos)  # right padding never reaches real tokens
        total, count = total + float(loss), count + int(n)
    return total, count


def sliding_window_perplexity(model: nn.Module, tok: Any, texts: list[str], context: int, stride: int) -> float:
    """Perplexity of `texts` joined by EOS into one stream, scored with a sliding window."""
    model.eval()
    ids: list[int] = []
    for text in texts:
        ids += encode_long(tok, text) + [tok.eos_token_id]
    total, count = sliding_window_nll(model, ids, context, stride)
    return math.exp(min(total / max(count, 1), 50.0))


HOOKS: dict[str, Any] = dict(tokenizer=recipe_tokenizer, model=load_model, collate=collate, count=count, build=build,
                             evaluate=evaluate)
register_objective("sft", "causal LM loss on the assistant turns of chats (instruction tuning)",
                   prepare=prepare_chats, baseline=baseline, primary_metric="chrf",
                   metrics=("perplexity", "exact_match", "chrf", "looping"), **HOOKS)
register_objective("clm", "causal LM loss on every token (continued pretraining on raw text, or from scratch)",
                   settings=ClmSettings, prepare=prepare_text, train_on_prompt=True, metrics=("perplexity",), **HOOKS)
