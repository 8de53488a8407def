"""What autograd keeps for backward in one `lmtailor train` CLM step of a llama model, counted tensor by tensor.

Every tensor saved for backward (torch.autograd.graph.saved_tensors_hooks) is recorded once per storage, parameters
left out; a 2-block model minus a 1-block one gives the bytes per block. This is the first-principles count that
`lmtailor.plan.activation_bytes` should follow (the resident-set peak of benchmarks/plan_accuracy.py adds the
transients of the backward pass and what the allocator keeps).

    python benchmarks/plan_census.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def saved_bytes(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, seq: int, rows: int,
                lora: bool = False, ckpt: bool = False) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtailor.objectives.causal import CausalLMLoss

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True, max_position_embeddings=seq))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model.enable_input_require_grads()
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, vocab, (rows, seq))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CausalLMLoss(model)(input_ids=ids, targets=targets, position_ids=torch.arange(seq).expand(rows, seq),
                            attention_mask=torch.ones(rows, seq, dtype=torch.long))
    return sum(seen.values())


def main() -> None:
    seq, rows = 64, 2
    for h, i, nh, kv, v in [(96, 200, 6, 2, 1000), (64, 128, 4, 4, 500)]:
        kvd = kv * (h // nh)
        for lora, ckpt in [(False, False), (True, False), (False, True)]:
            one = saved_bytes(h, i, 1, nh, kv, v, seq, rows, lora, ckpt)
            per = (saved_bytes(h, i, 2, nh, kv, v, seq, rows, lora, ckpt) - one) / (seq * rows * 4)
            print(f"hidden {h} inter {i} heads {nh} kv_dim {kvd} lora={lora} ckpt={ckpt}: {per:.0f} floats per block "
                  f"and token (8h + 2kv + 4i + heads + 2 = {8 * h + 2 * kvd + 4 * i + nh + 2}); rest "
                  f"{(one - per * seq * rows * 4) / 4 / (rows * (seq - 1)):.0f} floats per supervised token "
                  f"(vocab {v})")


if __name__ == "__main__":
    main()
