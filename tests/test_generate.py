"""Decoding options, stop strings, adapters on and off, and the interactive chat verb."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmtailor.config import GenerationSettings
from lmtailor.generate import cut_at_stop, generate, stream
from lmtailor.models import add_lora, load_pretrained, load_tokenizer
from lmtailor.render import prompt_ids


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """The tiny model fully fine-tuned for a few steps, so that it answers with words, not blank lines."""
    from conftest import PAIRS
    from lmtailor.cli import main

    root = tmp_path_factory.mktemp("gen")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={root / 'run'}",
                 "method=full", "lr=1e-2", "max_steps=40", "batch_size=5", "data.val_size=0",
                 "eval.before_after=false", "--no-progress"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def model_tok(trained):
    return load_pretrained(str(trained / "model")).eval(), load_tokenizer(str(trained / "model"))


def test_cut_at_stop():
    assert cut_at_stop("ls -la\n# done", ["\n", "#"]) == "ls -la"
    assert cut_at_stop("pwd", ["zzz"]) == "pwd"


def test_greedy_is_deterministic_and_batched_equals_single(model_tok):
    model, tok = model_tok
    s = GenerationSettings(max_new_tokens=6, batch_size=4)
    prompts = ["list files", "count lines in a big file please", "pwd"]
    batched = generate(model, tok, prompts, s)
    single = [generate(model, tok, [p], s)[0] for p in prompts]
    assert batched == single  # left padding does not change greedy answers


def test_stop_strings_end_the_answer(model_tok):
    model, tok = model_tok
    free = generate(model, tok, ["list files"], GenerationSettings(max_new_tokens=12))[0]
    assert len(free) > 2
    stop = free[1:3]
    cut = generate(model, tok, ["list files"], GenerationSettings(max_new_tokens=12, stop=[stop]))[0]
    assert stop not in cut and free.startswith(cut)


def test_sampling_options_change_the_output_and_follow_the_seed(model_tok):
    model, tok = model_tok
    s = GenerationSettings(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3)
    torch.manual_seed(0)
    a = generate(model, tok, ["list files"] * 4, s)
    torch.manual_seed(0)
    b = generate(model, tok, ["list files"] * 4, s)
    assert a == b and len(set(a)) > 1


def test_stream_yields_the_same_text_as_generate(model_tok):
    model, tok = model_tok
    s = GenerationSettings(max_new_tokens=8)
    msgs = [{"role": "user", "content": "list files"}]
    assert "".join(stream(model, tok, msgs, s)).strip() == generate(model, tok, [msgs], s)[0]


def test_adapter_on_and_off(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = add_lora(load_pretrained(str(tiny_model)), 4, 8, 0.0, ["q_proj", "v_proj"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "list files"}])])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        plain = load_pretrained(str(tiny_model)).eval()(input_ids=ids).logits
    assert torch.allclose(base, plain, atol=1e-5) and not torch.allclose(tuned, base, atol=1e-3)


def test_raw_prompts_skip_the_chat_template(model_tok):
    model, tok = model_tok
    s = GenerationSettings(max_new_tokens=5)
    raw = generate(model, tok, ["To list files"], s, raw=True)[0]
    ids = torch.tensor([tok("To list files")["input_ids"]])
    direct = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert raw == tok.decode(direct[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_chat_verb_keeps_the_conversation(trained):
    proc = subprocess.run([sys.executable, "-m", "lmtailor", "chat", str(trained), "--max-new-tokens", "3"],
                          input="list files\ncount lines\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot> ") == 2 and "chatting with" in proc.stdout
