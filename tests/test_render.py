"""The one renderer: prompts, masks and EOS are the same for training, evaluation and generation."""

from __future__ import annotations

import pytest

from lmtailor.data.example import Example
from lmtailor.models import load_tokenizer
from lmtailor.render import IGNORE, prompt_ids, prompt_text, tokenize_example

CHAT = [
    {"role": "system", "content": "You answer with shell commands."},
    {"role": "user", "content": "list files"},
    {"role": "assistant", "content": "ls -la"},
    {"role": "user", "content": "count lines"},
    {"role": "assistant", "content": "wc -l f.txt"},
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_training_prompt_is_byte_identical_to_generation_prompt(tok):
    seq = tokenize_example(tok, Example(messages=CHAT), max_length=512)[0]
    for turn in (2, 4):  # the prompt before each assistant turn
        ids = prompt_ids(tok, CHAT[:turn])
        assert seq.input_ids[: len(ids)] == ids
        assert tok.decode(seq.input_ids[: len(ids)]) == prompt_text(tok, CHAT[:turn])
        # and what follows it in training is the assistant answer, supervised
        assert seq.labels[len(ids)] == seq.input_ids[len(ids)] != IGNORE
    assert prompt_text(tok, CHAT[:2]) == tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)


def test_only_assistant_tokens_and_their_eos_are_supervised(tok):
    seq = tokenize_example(tok, Example(messages=CHAT), max_length=512)[0]
    supervised = [t for t in seq.labels if t != IGNORE]
    assert tok.decode(supervised) == "ls -la<|im_end|>wc -l f.txt<|im_end|>"
    assert supervised.count(tok.eos_token_id) == 2  # EOS ends every assistant turn


def test_pad_equal_to_eos_does_not_mask_the_end_of_turn(tok):
    tok.pad_token = tok.eos_token  # as the bundled SmolLM2 ships
    seq = tokenize_example(tok, Example(messages=CHAT[:3]), max_length=512)[0]
    assert seq.labels[-2] == tok.eos_token_id  # last is the template's newline after EOS, never generated


def test_train_on_prompt_supervises_everything(tok):
    seq = tokenize_example(tok, Example(messages=CHAT), max_length=512, train_on_prompt=True)[0]
    assert seq.labels == seq.input_ids


def test_text_examples_chunk_and_end_with_eos(tok):
    text = " ".join(["the quick brown fox"] * 50)
    chunks = tokenize_example(tok, Example(text=text), max_length=32)
    assert len(chunks) > 2 and all(len(c.input_ids) <= 32 for c in chunks)
    assert chunks[-1].input_ids[-1] == tok.eos_token_id
    assert sum(len(c.input_ids) for c in chunks) == len(tok(text)["input_ids"]) + 1


def test_truncation_keeps_the_prompt(tok):
    seq = tokenize_example(tok, Example(messages=CHAT), max_length=10)[0]
    full = tokenize_example(tok, Example(messages=CHAT), 512)[0]
    assert len(seq.input_ids) == 10 and seq.input_ids == full.input_ids[:10]
