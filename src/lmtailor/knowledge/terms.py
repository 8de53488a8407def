"""`lmtailor terms mine`: candidate domain terms, ranked by how often they occur times how badly the tokenizer
splits them: count x (tokens - 1) for the term written after a space, as it mostly appears in running text. A term
the tokenizer already keeps whole scores 0 and is left out. Candidates are identifier-like words (letters, digits,
`_ - . +` inside) and, for scripts written without spaces (Chinese, Japanese), runs of 2 to 4 such characters.
The list feeds `lmtailor tokenizer extend --terms`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmtailor.errors import ConfigError
from lmtailor.io import atomic_write_text
from lmtailor.outputs import check_output, existing, replacing

_WORD = re.compile(r"(?<![\w.+-])[A-Za-z][\w+-]*(?:\.[A-Za-z_][\w+-]*)*[A-Za-z0-9+]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+")


def candidates(texts: Iterable[str], cjk_max: int = 4) -> Counter[str]:
    """Counts of candidate terms in the texts."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in _WORD.findall(text) if len(w) >= 4)
        for run in _CJK.findall(text):
            counts.update(run[i:i + n] for n in range(2, cjk_max + 1) for i in range(len(run) - n + 1))
    return counts


def rank_terms(counts: Counter[str], tok: Any, top: int = 200, min_count: int = 3) -> list[dict[str, Any]]:
    """The `top` terms by count x (tokens - 1), each as {"term", "count", "tokens", "score"}."""
    rows: list[dict[str, Any]] = []
    for term, n in counts.items():
        if n < min_count:
            continue
        pieces = len(tok(" " + term if term.isascii() else term, add_special_tokens=False)["input_ids"])
        if pieces > 1:
            rows.append({"term": term, "count": n, "tokens": pieces, "score": n * (pieces - 1)})
    rows.sort(key=lambda r: (-r["score"], r["term"]))
    # a CJK run counted inside a longer kept run is dropped when the longer one is as frequent
    kept: list[dict[str, Any]] = []
    for r in rows:
        if not r["term"].isascii() and any(r["term"] in k["term"] and k["count"] >= r["count"] for k in kept):
            continue
        kept.append(r)
        if len(kept) == top:
            break
    return kept


def mine_terms(corpus: str, out: str | Path, tokenizer: str = "smollm2-135m-instruct", top: int = 200,
               min_count: int = 3, force: bool = False) -> str:
    """Write the top terms of a corpus (files, folders, catalog:NAME), one per line; return a report.

    Raises:
        ConfigError: the corpus holds no candidate term the tokenizer splits; `out` exists (without `force`: with
            it, the old file is kept as a backup) or cannot be written.
    """
    target = check_output(out, force, folder=False, inputs=existing(corpus))
    from lmtailor.knowledge.chunk import read_documents
    from lmtailor.models import load_tokenizer

    tok = load_tokenizer(tokenizer, chat=False)
    counts = candidates(d.text for d in read_documents(corpus))
    rows = rank_terms(counts, tok, top, min_count)
    if not rows:
        raise ConfigError(f"{corpus}: no term occurs {min_count}+ times and is split by the tokenizer",
                          "lower --min-count or give more text")
    with replacing(target, force):
        atomic_write_text(target, "".join(r["term"] + "\n" for r in rows))
    before = sum(r["count"] * r["tokens"] for r in rows)
    lines = [f"{len(rows)} terms written to {out} (from {len(counts)} candidates); as one token each they would "
             f"save {before - sum(r['count'] for r in rows)} of {before} tokens of their occurrences",
             "  term                          count  tokens"]
    lines += [f"  {r['term'][:28]:28} {r['count']:6}  {r['tokens']:6}" for r in rows[:15]]
    return "\n".join(lines)
