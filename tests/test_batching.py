"""The epoch's batches: a seeded shuffle, optionally grouped by length so padded batches pad less."""

from __future__ import annotations

import numpy as np

from lmtailor.loop import step_batches


def _padded(batches: list[np.ndarray], lengths: np.ndarray) -> int:
    return int(sum(lengths[b].max() * len(b) for b in batches))


def test_plain_batches_are_the_seeded_shuffle_cut_in_order():
    batches = step_batches(20, 8, seed=3, world=1)
    assert np.array_equal(np.concatenate(batches), np.random.default_rng(3).permutation(20))
    assert [len(b) for b in batches] == [8, 8, 4]


def test_grouped_batches_cover_the_epoch_once_and_pad_far_less():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 20, 900), rng.integers(100, 300, 100)])  # short texts, a long tail
    plain = step_batches(1000, 8, seed=1, world=1)
    grouped = step_batches(1000, 8, seed=1, world=1, lengths=lengths)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(1000))
    assert len(grouped) == len(plain)  # the schedule (steps per epoch) is unchanged
    assert _padded(grouped, lengths) < 0.6 * _padded(plain, lengths)
    again = step_batches(1000, 8, seed=1, world=1, lengths=lengths)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again, strict=True))  # resume redraws the same
    other = step_batches(1000, 8, seed=2, world=1, lengths=lengths)
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, other, strict=True))
    # the long examples are not all at the start or end of the epoch: the batch order is shuffled
    first_long = min(i for i, b in enumerate(grouped) if lengths[b].max() >= 100)
    assert first_long < len(grouped) // 2
