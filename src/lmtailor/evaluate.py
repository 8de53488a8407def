"""Held-out evaluation: loss and perplexity on the training renderer's tokens, generation metrics, comparisons."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmtailor.config import GenerationSettings
from lmtailor.data.example import Example
from lmtailor.data.packing import collate
from lmtailor.generate import generate
from lmtailor.objectives import CausalLMLoss
from lmtailor.render import Tokenized, prompt_messages
from lmtailor.report import compared_metrics, fmt_metric


@torch.inference_mode()
def loss_sums(loss_module: nn.Module, seqs: Sequence[Tokenized], pad_id: int, batch_tokens: int = 2048,
              row_tokens: int = 512, progress: bool = False, desc: str = "eval loss") -> tuple[float, int]:
    """(sum of token losses, supervised tokens) over `seqs`, in batches of `batch_tokens` packed in rows."""
    total, count = 0.0, 0
    device = next(loss_module.parameters()).device
    batches: list[list[Tokenized]] = []
    cur: list[Tokenized] = []
    size = 0
    for s in seqs:
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
        batch = collate(group, pad_id, packing=True, pack_length=width, share_prefix=True)
        loss, n = loss_module(**{k: v.to(device) for k, v in batch.items()})
        total += float(loss)
        count += int(n)
    return total, count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def normalize(text: str) -> str:
    """Whitespace-insensitive comparison form: strip, collapse runs of spaces, drop surrounding backticks."""
    text = text.strip().strip("`").strip()
    return re.sub(r"\s+", " ", text)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    if not refs:
        return float("nan")
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs, strict=False)) / len(refs)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score) if refs else float("nan")


def evaluate_model(model: nn.Module, tok: Any, val_seqs: Sequence[Tokenized], val_examples: Sequence[Example],
                   gen: GenerationSettings, n_generate: int, progress: bool = True, label: str = "") -> dict[str, Any]:
    """Loss/perplexity on `val_seqs`; exact match and chrF of greedy answers on the first chat examples."""
    model.eval()
    out: dict[str, Any] = {}
    if val_seqs:
        total, count = loss_sums(CausalLMLoss(model), val_seqs, tok.pad_token_id, progress=progress,
                                 desc=f"{label} loss".strip())
        out["loss"] = total / max(count, 1)
        out["perplexity"] = perplexity(out["loss"])
        out["eval_tokens"] = count
    chats = [ex for ex in val_examples if ex.messages is not None][:n_generate]
    if chats:
        prompts, refs = zip(*(prompt_messages(ex) for ex in chats), strict=False)
        preds = generate(model, tok, list(prompts), gen, progress=progress, desc=f"{label} generate".strip())
        out["exact_match"] = exact_match(preds, refs)
        out["chrf"] = chrf(preds, refs)
        out["samples"] = [
            {"prompt": p[-1]["content"], "reference": r, "prediction": y}
            for p, r, y in zip(prompts, refs, preds, strict=True)
        ]
    return out


def comparison_table(before: dict[str, Any], after: dict[str, Any], samples: int = 3) -> str:
    """A plain-text before/after table of every scalar metric both evaluations report (loss, and the task
    metrics: accuracy, macro_f1, bleu, chrf, rougeL, exact_match, ...), plus a few sample answers."""
    rows = [("metric", "before", "after", "change")]
    rows += [(k, fmt_metric(k, b), fmt_metric(k, a), fmt_metric(k, a - b, sign=True))
             for k, b, a in compared_metrics(before, after) if a is not None and b is not None]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for s_before, s_after in list(zip(before.get("samples", []), after.get("samples", []), strict=False))[:samples]:
        lines += ["", f"Q: {s_before['prompt']}", f"   reference: {s_before['reference']}",
                  f"   before:    {s_before['prediction']}", f"   after:     {s_after['prediction']}"]
    return "\n".join(lines)


def evaluate_run(target: str, data: str, fmt: str = "auto", n_generate: int = 40, max_length: int = 512,
                 out: str | None = None, gen: GenerationSettings | None = None, metric: str = "default",
                 context: int | None = None, stride: int | None = None) -> dict[str, Any]:
    """Evaluate a run folder or model on a data file: loss, perplexity, and (for chats) exact match and chrF.

    metric="perplexity" instead scores raw text with a sliding window of `context` tokens advancing by `stride`
    (pseudo-perplexity for masked LMs).
    """
    if metric == "perplexity":
        from lmtailor.pretrain.perplexity import evaluate_perplexity

        return evaluate_perplexity(target, data, context or max_length, stride, fmt, out)
    from lmtailor.data.validate import load_examples
    from lmtailor.io import atomic_write_json
    from lmtailor.models import load_for_inference
    from lmtailor.render import tokenize_all

    model, tok, info = load_for_inference(target)
    examples = load_examples(data, fmt, system_prompt=info.get("system_prompt"))
    seqs, _ = tokenize_all(tok, examples, max_length)
    metrics = evaluate_model(model, tok, seqs, examples, gen or GenerationSettings(), n_generate, label="eval:")
    metrics.update(model=target, data=data, examples=len(examples))
    if out:
        atomic_write_json(out, metrics)
    return metrics
