"""Text augmentation for classification: random token dropout and neighbour swaps, applied to training batches.

Augmentation runs inside the loss module on token ids, so each epoch sees different noise, the torch RNG that
resume restores drives it, and evaluation (which runs without gradients) sees the text unchanged.
"""

from __future__ import annotations

import torch


def augment_ids(ids: list[int], p_drop: float, p_swap: float, generator: torch.Generator | None = None) -> list[int]:
    """Drop each token with probability p_drop (at least one is kept), then swap neighbours with probability p_swap.

    The first and last token never move: decoder classifiers read the last token, and a BOS/CLS token stays first.
    """
    out = list(ids)
    if p_drop > 0 and len(out) > 2:
        keep = (torch.rand(len(out), generator=generator) >= p_drop).tolist()
        keep[0] = keep[-1] = True
        out = [t for t, k in zip(out, keep, strict=True) if k]
    if p_swap > 0 and len(out) > 3:
        swaps = (torch.rand(len(out) - 3, generator=generator) < p_swap).tolist()
        i = 1
        while i < len(out) - 2:
            if swaps[i - 1]:
                out[i], out[i + 1] = out[i + 1], out[i]
                i += 2  # a token moves at most one place
            else:
                i += 1
    return out


def augment_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, p_drop: float,
                  p_swap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment each row of a right-padded batch (B, T) and re-pad it; returns (input_ids, attention_mask)."""
    rows = [augment_ids(row[mask.bool()].tolist(), p_drop, p_swap) for row, mask in zip(input_ids, attention_mask,
                                                                                       strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        mask[i, :len(r)] = 1
    return ids.to(input_ids.device), mask.to(attention_mask.device)
