"""Collate tokenized sequences into model inputs: packed rows without padding, or padded rows.

Targets are shifted inside each sequence before packing (targets[t] = labels[t + 1]), so the last token of one
example never learns to predict the first token of the next. In packed rows the position ids restart at 0 for every
sequence; transformers turns such position ids into a block-diagonal causal mask (no attention across examples).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmtailor.data.example import IGNORE, Tokenized


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


def balanced_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """As few rows as `pack_bins` at `capacity`, but of similar lengths: a batch is padded to its longest row, so
    8 examples of 1,054 tokens in all packed at 1,024 become rows of about 527 rather than 1,024 + 30 padded to
    1,024 (a step that computed 2,048 positions then computes about 1,060). The capacity of the smaller rows starts
    at an even share of the tokens and grows in 2% steps of `capacity` until that many rows hold them."""
    rows = pack_bins(lengths, capacity)
    if len(rows) < 2:
        return rows
    total = sum(min(n, capacity) for n in lengths)
    target = max(max(min(n, capacity) for n in lengths), -(-total // len(rows)))
    grow = max(1, capacity // 50)
    while target < capacity:
        tried = pack_bins(lengths, target)
        if len(tried) <= len(rows):
            return tried
        target += grow
    return rows


def shared_prefix(seqs: Sequence[Tokenized], min_len: int = 4) -> int:
    """Length of the leading tokens all `seqs` share and on which no loss is taken (0 if under `min_len`).

    Such a prefix (typically the system prompt and the user-turn header) is computed once per packed row: causal
    attention makes its hidden states independent of what follows, so this is exact. The prefix must also leave
    each sequence at least one token and must not hold a target (its last position would predict a different
    token in each sequence).
    """
    if len(seqs) < 2:
        return 0
    first = seqs[0].input_ids
    n = min(len(s.input_ids) for s in seqs) - 1
    p = 0
    while p < n and all(s.input_ids[p] == first[p] for s in seqs):
        p += 1
    # labels[1..p] are the targets of prefix positions 0..p-1: all must be ignored
    while p > 0 and any(x != IGNORE for s in seqs for x in s.labels[1:p + 1]):
        p -= 1
    return p if p >= min_len else 0


def collate(seqs: Sequence[Tokenized], pad_id: int, packing: bool = True, pack_length: int = 1024,
            share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Build a batch: input_ids, targets, position_ids (R, L) and an attention_mask.

    `targets` are already shifted and hold -100 where no loss is taken (prompt, padding, sequence ends).
    Padded batches carry a (R, L) attention_mask. Packed rows carry `segment_ids` (R, L): 0 for a prompt prefix
    shared by the row's sequences and held once (`share_prefix`), k for the k-th sequence, -1 for padding; every
    sequence attends to the shared prefix and, causally, to itself.
    """
    if packing:
        rows: list[tuple[list[int], list[int], list[int], list[int]]] = []  # ids, targets, positions, segments
        for group in balanced_bins([len(s.input_ids) for s in seqs], pack_length):
            members = [seqs[i] for i in sorted(group)]  # keep the data order inside a row
            p = shared_prefix(members) if share_prefix else 0
            ids, tgt, pos, seg = list(members[0].input_ids[:p]), [IGNORE] * p, list(range(p)), [0] * p
            for k, s in enumerate(members, start=1):
                ids += s.input_ids[p:]
                tgt += shifted_targets(s)[p:]
                pos += list(range(p, len(s.input_ids)))
                seg += [k] * (len(s.input_ids) - p)
            rows.append((ids, tgt, pos, seg))
        width = max(len(r[0]) for r in rows)
        for ids, tgt, pos, seg in rows:
            pad = width - len(ids)
            ids += [pad_id] * pad
            tgt += [IGNORE] * pad
            pos += list(range(pad))  # padding forms its own sequence: nothing attends to it
            seg += [-1] * pad
        batch = {
            "input_ids": torch.tensor([r[0] for r in rows]),
            "targets": torch.tensor([r[1] for r in rows]),
            "position_ids": torch.tensor([r[2] for r in rows]),
        }
        # the loss module turns segments into per-example attention (CPU) or a block mask
        batch["segment_ids"] = torch.tensor([r[3] for r in rows])
        return batch
    width = max(len(s.input_ids) for s in seqs)
    ids_t = torch.full((len(seqs), width), pad_id)
    tgt_t = torch.full((len(seqs), width), IGNORE)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s.input_ids)
        ids_t[r, :n] = torch.tensor(s.input_ids)
        tgt_t[r, :n] = torch.tensor(shifted_targets(s))
        mask[r, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids_t, "targets": tgt_t, "position_ids": positions, "attention_mask": mask}


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """(R, L) segment ids -> (R, 1, L, L) boolean causal mask: same segment, or a key in the shared prefix (0)."""
    q, k = seg[:, :, None], seg[:, None, :]  # (R, L, 1), (R, 1, L)
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (((q == k) | ((k == 0) & (q >= 0))) & causal)[:, None]
