"""Perplexity of causal LMs with a sliding window, and pseudo-perplexity of masked LMs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.render import IGNORE


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
    from lmtailor.objectives import CausalLMLoss

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
    for doc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids += doc + [tok.eos_token_id]
    total, count = sliding_window_nll(model, ids, context, stride)
    return math.exp(min(total / max(count, 1), 50.0))


@torch.inference_mode()
def pseudo_perplexity(model: nn.Module, tok: Any, seqs: list[list[int]], max_tokens: int = 256, batch: int = 32
                      ) -> float:
    """Pseudo-perplexity of a masked LM (Salazar et al. 2020): mask each token in turn, score the original.

    Costs one forward pass per scored token, so only the first `max_tokens` non-special tokens are scored.
    """
    from lmtailor.models import unwrap_peft

    hf = unwrap_peft(model)
    hf.eval()
    device = next(hf.parameters()).device
    special = set(tok.all_special_ids)
    jobs = [(s, i) for s in seqs for i, t in enumerate(s) if t not in special][:max_tokens]
    total = 0.0
    for k in range(0, len(jobs), batch):
        group = jobs[k:k + batch]
        width = max(len(s) for s, _ in group)
        x = torch.full((len(group), width), tok.pad_token_id)
        attn = torch.zeros((len(group), width), dtype=torch.long)
        for r, (s, i) in enumerate(group):
            x[r, :len(s)] = torch.tensor(s)
            attn[r, :len(s)] = 1
            x[r, i] = tok.mask_token_id
        out = hf(input_ids=x.to(device), attention_mask=attn.to(device))
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (R, W, V)
        where = torch.tensor([i for _, i in group], device=device)
        picked = logits[torch.arange(len(group), device=device), where]  # (R, V)
        target = torch.tensor([s[i] for s, i in group], device=device)
        total += float(F.cross_entropy(picked.float(), target, reduction="sum"))
    return math.exp(min(total / max(len(jobs), 1), 50.0))


def _is_masked_lm(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)


def evaluate_perplexity(target: str, data: str, context: int = 512, stride: int | None = None, fmt: str = "auto",
                        out: str | None = None) -> dict[str, Any]:
    """`lmtailor eval --metric perplexity`: sliding-window perplexity (causal) or pseudo-perplexity (masked LM).

    Args:
        target: run folder, model folder or model name.
        data: held-out texts (file, folder, catalog:NAME); chats are scored on their joined turns.
        context: window length in tokens. stride: tokens the window advances (default context / 2).
    """
    from lmtailor.data.validate import load_examples
    from lmtailor.io import atomic_write_json

    examples = load_examples(data, fmt)
    texts = [ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages or [])
             for ex in examples]
    folder = Path(target) / "model" if (Path(target) / "model").is_dir() else Path(target)
    metrics: dict[str, Any] = {"model": target, "data": data, "examples": len(examples)}
    if _is_masked_lm(folder):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        model = AutoModelForMaskedLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        seqs = [ids[:context] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        metrics.update(metric="pseudo_perplexity", pseudo_perplexity=pseudo_perplexity(model, tok, seqs, 2048),
                       context=context)
    else:
        from lmtailor.models import load_for_inference

        model, tok, _ = load_for_inference(target)
        stride = stride or max(1, context // 2)
        metrics.update(metric="perplexity", context=context, stride=stride,
                       perplexity=sliding_window_perplexity(model, tok, texts, context, stride))
    if out:
        atomic_write_json(out, metrics)
    return metrics
