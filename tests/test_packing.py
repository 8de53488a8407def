"""Packing: no padding, no attention across examples, targets never cross an example boundary."""

from __future__ import annotations

import pytest
import torch

from lmtailor.data.example import Example
from lmtailor.data.packing import balanced_bins, collate, pack_bins, segment_mask, shared_prefix
from lmtailor.models import load_pretrained, load_tokenizer
from lmtailor.objectives.causal import CausalLMLoss
from lmtailor.render import IGNORE, tokenize_example


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return load_pretrained(str(tiny_model)).eval(), load_tokenizer(str(tiny_model))


def _seqs(tok, pairs):
    return [tokenize_example(tok, Example(messages=[{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]), 128)[0]
            for q, a in pairs]


def test_pack_bins_fit_and_cover():
    lengths = [5, 9, 3, 7, 2, 8]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 34 tokens need at least 4 rows of 10


def test_balanced_bins_keep_the_row_count_and_pad_less():
    lengths = [130, 128, 135, 127, 140, 133, 131, 130]  # 1,054 tokens: first-fit at 1,024 leaves a 130-token row
    first_fit, balanced = pack_bins(lengths, 1024), balanced_bins(lengths, 1024)
    assert len(balanced) == len(first_fit) == 2
    assert sorted(i for b in balanced for i in b) == list(range(8))
    width = max(sum(lengths[i] for i in b) for b in balanced)
    assert width <= 1024 and width < 600 < max(sum(lengths[i] for i in b) for b in first_fit)
    assert balanced_bins([5, 9, 3], 100) == pack_bins([5, 9, 3], 100)  # one row: nothing to balance


def test_packed_rows_have_no_padding_and_reset_positions(model_tok):
    _, tok = model_tok
    from conftest import PAIRS

    seqs = _seqs(tok, PAIRS[:4])
    batch = collate(seqs, tok.pad_token_id, packing=True, pack_length=1024)
    assert batch["input_ids"].shape == (1, sum(len(s.input_ids) for s in seqs))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0] + list(torch.tensor([len(s.input_ids) for s in seqs[:-1]]).cumsum(0).tolist())
    # the last position of every example has no target (it would otherwise predict the next example)
    for end in starts[1:]:
        assert batch["targets"][0, end - 1] == IGNORE


def test_packed_loss_equals_separate_loss(model_tok):
    """Block-diagonal attention: packing changes nothing about each example's loss."""
    model, tok = model_tok
    from conftest import PAIRS

    seqs = _seqs(tok, PAIRS)
    loss_fn = CausalLMLoss(model)
    with torch.no_grad():
        packed, n_packed = loss_fn(**collate(seqs, tok.pad_token_id, packing=True, pack_length=1024))
        padded, n_padded = loss_fn(**collate(seqs, tok.pad_token_id, packing=False))
        single = [loss_fn(**collate([s], tok.pad_token_id, packing=False)) for s in seqs]
    assert int(n_packed) == int(n_padded) == sum(int(n) for _, n in single) == sum(s.n_supervised for s in seqs)
    assert torch.allclose(packed, padded, rtol=1e-4)
    assert torch.allclose(packed, sum(loss for loss, _ in single), rtol=1e-4)


def test_loss_matches_transformers_own_loss(model_tok):
    model, tok = model_tok
    from conftest import PAIRS

    seq = _seqs(tok, PAIRS[:1])[0]
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        ref = model(input_ids=ids, labels=torch.tensor([seq.labels])).loss
        ours, n = CausalLMLoss(model)(**collate([seq], tok.pad_token_id, packing=True, pack_length=128))
    assert torch.allclose(ours / n, ref, rtol=1e-5)


def test_shared_prefix_is_held_once_and_changes_no_loss(model_tok):
    model, tok = model_tok
    from conftest import PAIRS

    system = {"role": "system", "content": "You answer with one shell command and nothing else."}
    seqs = [tokenize_example(tok, Example(messages=[system, {"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]), 128)[0]
            for q, a in PAIRS]
    plain = collate(seqs, tok.pad_token_id, packing=True, pack_length=1024)
    shared = collate(seqs, tok.pad_token_id, packing=True, pack_length=1024, share_prefix=True)
    saved = plain["input_ids"].shape[1] - shared["input_ids"].shape[1]
    assert saved >= 9 * 10  # the system turn and user header, once instead of ten times
    assert int((shared["segment_ids"] == 0).sum()) >= 10  # the prefix, held once
    loss_fn = CausalLMLoss(model)
    with torch.no_grad():
        a, n_a = loss_fn(**plain)
        b, n_b = loss_fn(**shared)  # per-example attention (CPU path)
        masked = {k: v for k, v in shared.items() if k != "segment_ids"}
        c, _ = loss_fn(**masked, attention_mask=segment_mask(shared["segment_ids"]))  # block-mask path (GPUs)
    assert int(n_a) == int(n_b) and torch.allclose(a, b, rtol=1e-5) and torch.allclose(b, c, rtol=1e-5)


def test_no_prefix_is_shared_when_it_would_carry_a_target(model_tok):
    _, tok = model_tok
    seqs = [tokenize_example(tok, Example(messages=[{"role": "user", "content": "list files"},
                                                    {"role": "assistant", "content": a}]), 128, train_on_prompt=True)[0]
            for a in ("ls", "ls -la")]
    assert shared_prefix(seqs) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_example_by_example_attention_matches_the_block_mask_with_its_gradients(dtype):
    """The CPU path (segment_attention: each example with the shared prefix) against one dense SDPA over the block
    mask, forward and backward, with grouped heads, a gap between examples and padding at the end; in bf16 the
    scores run in float32, so it is checked against float64 within bf16's rounding."""
    import torch.nn.functional as F

    from lmtailor.objectives.attention import segment_attention, segment_bounds

    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, -1, -1, -1, -1, -1],
                        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, 2, 2, 2, 2, 2, 2, -1, -1]])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 20, 8, generator=gen, dtype=torch.float64) for h in (6, 2, 2))
    weight = torch.randn(2, 20, 6, 8, generator=gen, dtype=torch.float64)
    real = (seg >= 0)[:, :, None, None]

    def run(fn, q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        (out.double() * weight * real).sum().backward()
        return out.double() * real, q.grad.double(), k.grad.double(), v.grad.double()

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=segment_mask(seg), enable_gqa=True).transpose(1, 2)

    ours = run(lambda q, k, v: segment_attention(None, q, k, v, None, packed_segments=segment_bounds(seg))[0],
               *(t.to(dtype) for t in (q, k, v)))
    ref = run(dense, q, k, v)
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()
    assert ours[0].abs().sum() > 0 and ours[1][1, :, 10:12].abs().sum() == 0  # the gap gets no gradient
