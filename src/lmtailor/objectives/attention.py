"""Attention for packed rows on CPU: each example attends to the row's shared prefix and, causally, to itself.

Registered with transformers as the attention implementation "lmtailor_segments"; the causal LM loss switches a
model to it for the duration of one forward pass (`segment_attention_for`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    if query.device.type == "cpu" and (query.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        # The CPU's bf16 attention backward is slower than float32's at example lengths (forward and backward of
        # 9 heads x 64, timed on an AMX Xeon: 1.46 vs 0.39 ms at 60 tokens, 2.96 vs 1.02 ms at 120); the scores are
        # a small share of a step's FLOPs, so they run in float32 (in finetune_throughput.py: about +10% tokens/s).
        compute = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        with torch.autocast("cpu", enabled=False):
            out, _ = segment_attention(module, query.float(), key.float(), value.float(), attention_mask, dropout,
                                       scaling, packed_segments)
        return out.to(compute), None
    gqa = query.shape[1] != key.shape[1]
    rows = []
    # Each row is cut into its pieces (prefix, examples, padding) with unbind and split, whose backward passes are
    # one stack and one cat. Indexing each example out of the row instead made every slice's backward write a
    # zero-filled copy of the whole row (in finetune_throughput.py: 47 such copies per layer and step).
    for (p, spans), q_row, k_row, v_row in zip(packed_segments, query.unbind(0), key.unbind(0), value.unbind(0),
                                               strict=True):
        cuts = _pieces(p, spans, q_row.shape[1])
        qs, ks, vs = (t.split([b - a for a, b, _ in cuts], dim=1) for t in (q_row, k_row, v_row))
        pieces = []
        for (a, b, kind), q, k, v in zip(cuts, qs, ks, vs, strict=True):
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if kind == "gap":  # padding: attends to nothing, and nothing attends to it
                pieces.append(torch.zeros_like(q))
            elif kind == "prefix" or not p:  # the shared prefix, or an example without one: causal on itself
                pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                             dropout_p=dropout, enable_gqa=gqa))
            else:  # every query sees the whole prefix and the example up to itself
                mask = torch.ones(b - a, p + b - a, dtype=torch.bool, device=q.device).tril(diagonal=p)
                pieces.append(F.scaled_dot_product_attention(
                    q, torch.cat([ks[0].unsqueeze(0), k], dim=2), torch.cat([vs[0].unsqueeze(0), v], dim=2),
                    attn_mask=mask, scale=scaling, dropout_p=dropout, enable_gqa=gqa))
        rows.append(torch.cat(pieces, dim=2)[0])
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _pieces(prefix: int, spans: list[tuple[int, int]], length: int) -> list[tuple[int, int, str]]:
    """A packed row of `length` positions cut into (start, end, kind) pieces that cover it in order: the shared
    prefix, each example, and the gaps (padding) between and after them."""
    cuts, at = ([(0, prefix, "prefix")] if prefix else []), prefix
    for a, b in spans:
        if a > at:
            cuts.append((at, a, "gap"))
        cuts.append((a, b, "example"))
        at = b
    if at < length:
        cuts.append((at, length, "gap"))
    return cuts


def _register_segment_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, lambda *args, **kwargs: None)  # no L x L mask is built


_register_segment_attention()


@contextlib.contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old
