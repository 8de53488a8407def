"""Collate tokenized sequences into model inputs: packed rows without padding, or padded rows.

Targets are shifted inside each sequence before packing (targets[t] = labels[t + 1]), so the last token of one
example never learns to predict the first token of the next. In packed rows the position ids restart at 0 for every
sequence; transformers turns such position ids into a block-diagonal causal mask (no attention across examples).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmtailor.render import IGNORE, Tokenized


def shifted_targets(seq: Tokenized) -> list[int]:
    return seq.labels[1:] + [IGNORE]


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each group's total length fits `capacity`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], capacity)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def collate(seqs: Sequence[Tokenized], pad_id: int, packing: bool = True, pack_length: int = 1024
            ) -> dict[str, torch.Tensor]:
    """Build a batch: input_ids, targets, position_ids (R, L) and, when padded, attention_mask (R, L).

    `targets` are already shifted and hold -100 where no loss is taken (prompt, padding, sequence ends).
    """
    if packing:
        rows_ids: list[list[int]] = []
        rows_tgt: list[list[int]] = []
        rows_pos: list[list[int]] = []
        for group in pack_bins([len(s.input_ids) for s in seqs], pack_length):
            ids: list[int] = []
            tgt: list[int] = []
            pos: list[int] = []
            for i in sorted(group):  # keep the data order inside a row
                s = seqs[i]
                ids += s.input_ids
                tgt += shifted_targets(s)
                pos += list(range(len(s.input_ids)))
            rows_ids.append(ids)
            rows_tgt.append(tgt)
            rows_pos.append(pos)
        width = max(len(r) for r in rows_ids)
        for ids, tgt, pos in zip(rows_ids, rows_tgt, rows_pos, strict=True):
            pad = width - len(ids)
            ids += [pad_id] * pad
            tgt += [IGNORE] * pad
            pos += list(range(pad))  # padding forms its own sequence: nothing attends to it
        return {
            "input_ids": torch.tensor(rows_ids),
            "targets": torch.tensor(rows_tgt),
            "position_ids": torch.tensor(rows_pos),
        }
    width = max(len(s.input_ids) for s in seqs)
    ids_t = torch.full((len(seqs), width), pad_id)
    tgt_t = torch.full((len(seqs), width), IGNORE)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s.input_ids)
        ids_t[r, :n] = torch.tensor(s.input_ids)
        tgt_t[r, :n] = torch.tensor(shifted_targets(s))
        mask[r, :n] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids_t, "targets": tgt_t, "position_ids": pos, "attention_mask": mask}
