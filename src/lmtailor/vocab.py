"""`lmtailor terms report`: what a domain vocabulary bought, measured: tokens per term under the base tokenizer and
under the extended one, and the domain perplexity of the base model and of the extended + trained model on held-out
domain text.

Perplexity per token is not comparable across two tokenizers (the extended one cuts the same text into fewer,
harder-to-predict tokens), so the report also gives the comparable figures: the text's total negative
log-likelihood spread over its words (word-level perplexity) and over its UTF-8 bytes (bits per byte). Both models
score the same text, joined into one stream with EOS between documents, with the same sliding window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtailor.errors import ConfigError
from lmtailor.io import atomic_write_json


def read_terms(path: str | Path) -> list[str]:
    """The terms of a `terms mine` / `tokenizer extend --terms` file, one per line (blank lines skipped)."""
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"--terms {f}: no such file", "give the file `lmtailor terms mine` wrote")
    terms = [t.strip() for t in f.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not terms:
        raise ConfigError(f"--terms {f}: no terms in it", "one term per line")
    return terms


def tokens_per_term(tok: Any, terms: Sequence[str]) -> float:
    """Mean token count of the terms, each written after a space as in running text (as `terms mine` counts)."""
    counts = [len(tok(" " + t if t.isascii() else t, add_special_tokens=False)["input_ids"]) for t in terms]
    return sum(counts) / len(counts)


def domain_nll(model: Any, tok: Any, texts: Sequence[str], context: int, stride: int) -> dict[str, float]:
    """The texts' negative log-likelihood under a model, per token, per word and per byte."""
    from lmtailor.objectives.causal import sliding_window_nll

    ids: list[int] = []
    for doc in tok(list(texts), add_special_tokens=False)["input_ids"]:
        ids += doc + [tok.eos_token_id]
    total, count = sliding_window_nll(model, ids, context, stride)
    words = sum(len(t.split()) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    return {"tokens": len(ids), "perplexity_per_token": math.exp(min(total / max(count, 1), 50.0)),
            "perplexity_per_word": math.exp(min(total / max(words, 1), 50.0)),
            "bits_per_byte": total / max(n_bytes, 1) / math.log(2)}


def vocab_report(terms: str | Path, base: str, tuned: str, text: str, context: int = 512, stride: int | None = None,
                 out: str | None = None) -> dict[str, Any]:
    """Tokens per term and domain perplexity before (the base model) and after (the extended + trained run).

    Args:
        terms: the terms file given to `tokenizer extend`.
        base: the model before: name or folder (its tokenizer and weights).
        tuned: the run (or model folder) after: trained on the extended vocabulary.
        text: held-out domain text: file, folder or catalog:NAME (chats are scored on their joined turns).
        context: sliding-window length in tokens; stride: tokens it advances (default context / 2).
        out: also write the report as JSON here.

    Raises:
        ConfigError: a missing or empty terms file, a window that does not fit, or no text.
    """
    from lmtailor.data.validate import load_examples
    from lmtailor.runs import Run

    words = read_terms(terms)
    stride = stride or max(context // 2, 1)
    if not 1 <= stride <= context:
        raise ConfigError(f"--stride {stride} with --context {context}", "the stride must be 1 to the context")
    texts = [ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages or [])
             for ex in load_examples(text)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"--text {text}: no text in it", "give held-out domain documents")
    report: dict[str, Any] = {"terms": len(words), "text": text, "documents": len(texts), "context": context,
                              "stride": stride}
    for label, target in (("before", base), ("after", tuned)):
        run = Run.open(target)
        model, tok = run.load(merge=True)
        report[label] = {"model": target, "vocabulary": len(tok), "tokens_per_term": tokens_per_term(tok, words),
                         **domain_nll(model, tok, texts, context, stride)}
        del model
    if out:
        atomic_write_json(out, report)
    return report


def format_report(r: dict[str, Any]) -> str:
    """The report as a few lines for the terminal."""
    b, a = r["before"], r["after"]
    rows = [("vocabulary", "vocabulary", "{:,}"), ("tokens per term", "tokens_per_term", "{:.2f}"),
            ("text tokens", "tokens", "{:,}"), ("perplexity per token", "perplexity_per_token", "{:.2f}"),
            ("perplexity per word", "perplexity_per_word", "{:.2f}"), ("bits per byte", "bits_per_byte", "{:.3f}")]
    lines = [f"{r['terms']} terms; {r['documents']} held-out documents of {r['text']} (window {r['context']}, "
             f"stride {r['stride']})", f"  {'':22} {'before':>12} {'after':>12}"]
    lines += [f"  {name:22} {fmt.format(b[key]):>12} {fmt.format(a[key]):>12}" for name, key, fmt in rows]
    lines.append("  (per-token perplexity depends on the tokenizer; compare per word or bits per byte)")
    return "\n".join(lines)
