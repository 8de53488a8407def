"""Decoding options, stop strings, adapters on and off, and the interactive chat verb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# ---- the repetition stop, on a rigged model that loops ---------------------------------------------------------

# On the tiny BPE tokenizer (conftest): the raw LOOP_PROMPT and any chat prompt are answered "tar" (353), then
# " by name list" (397 365 380) over and over; the raw CHAIN_PROMPT is answered by CHAIN, 20 distinct tokens,
# then EOS. (Greedy decoding follows the last token: the table keys are the prompts' last tokens.)
LOOP_PROMPT, CHAIN_PROMPT = "To list files", "To count lines"
HEAD, CYCLE = [353], [397, 365, 380]
CHAIN = list(range(100, 120))


def build_looper(tiny: Path, folder: Path) -> Path:
    """The tiny llama rigged so that greedy decoding follows a fixed next-token table (see above).

    Every block's output projections are zero, so the last hidden state is the current token's embedding: one
    constant dimension (every token) plus, for each token of the table, a dimension of its own. The output head
    (untied) maps each token's own dimension to its successor (logit ~40) and the constant one to EOS (~1).
    """
    import shutil

    from transformers import AutoConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tiny))
    loop_end, chain_end = (tok(p)["input_ids"][-1] for p in (LOOP_PROMPT, CHAIN_PROMPT))
    chat_end = prompt_ids(tok, [{"role": "user", "content": "x"}])[-1]
    table = {loop_end: HEAD[0], chat_end: HEAD[0], HEAD[0]: CYCLE[0], CYCLE[0]: CYCLE[1], CYCLE[1]: CYCLE[2],
             CYCLE[2]: CYCLE[0], chain_end: CHAIN[0], **dict(zip(CHAIN, CHAIN[1:], strict=False))}
    assert len(table) == 7 + len(CHAIN) - 1 and not set(table.values()) & set(tok.all_special_ids), "distinct"
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.tie_word_embeddings = False
    model = LlamaForCausalLM(cfg)
    width = cfg.hidden_size
    assert len(table) < width
    emb, head = torch.zeros(cfg.vocab_size, width), torch.zeros(cfg.vocab_size, width)
    emb[:, 0] = 1.0
    head[cfg.eos_token_id, 0] = 1.0
    for dim, (tok_id, nxt) in enumerate(table.items(), start=1):
        emb[tok_id, dim] = 4.0
        head[nxt, dim] = 10.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(head)
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def looper(tiny_model, tmp_path_factory):
    return build_looper(tiny_model, tmp_path_factory.mktemp("looper"))


class Steps:
    """A model whose generate() records how many new tokens each call decoded."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def parameters(self):
        return self.model.parameters()

    def generate(self, input_ids, **kw):
        out = self.model.generate(input_ids=input_ids, **kw)
        self.steps.append(out.shape[1] - input_ids.shape[1])
        return out


def loop_texts(tok):
    """(one copy kept by the stop, the unstopped loop of n tokens, the chain answer)."""
    def text(ids):
        return tok.decode(ids, skip_special_tokens=True).strip()
    return (text(HEAD + CYCLE), lambda n: text((HEAD + CYCLE * n)[:n]), text(CHAIN))


def test_the_rigged_model_loops_without_the_stop_and_stops_with_it(looper):
    from lmtailor.metrics import looping

    model, tok = load_pretrained(str(looper)).eval(), load_tokenizer(str(looper))
    one_copy, unstopped, chain = loop_texts(tok)
    prompts = [LOOP_PROMPT, CHAIN_PROMPT]
    off = Steps(model)
    free = generate(off, tok, prompts, GenerationSettings(max_new_tokens=40, stop_repeats=0), raw=True)
    assert free == [unstopped(40), chain] and off.steps == [40], "no rule: the loop runs to max_new_tokens"
    assert looping(free[0]) and not looping(free[1]) and not looping(one_copy)

    on = Steps(model)
    assert GenerationSettings().stop_repeats == 3, "on by default"
    got = generate(on, tok, prompts, GenerationSettings(max_new_tokens=40), raw=True)
    assert got == [one_copy, chain], "the looping row keeps one copy; the chain row of the same batch is whole"
    assert on.steps == [len(CHAIN) + 1], "the batch ran on for the chain row (its EOS), not to max_new_tokens"
    alone = Steps(model)
    assert generate(alone, tok, [LOOP_PROMPT], GenerationSettings(max_new_tokens=40), raw=True) == [one_copy]
    assert alone.steps == [13], "stopped at the 4th copy of the 3-token n-gram: 12 tokens after 'tar'"
    # through the chat template (its last token starts the loop) and streaming: the same single copy
    msgs = [{"role": "user", "content": "anything"}]
    assert generate(model, tok, [msgs], GenerationSettings(max_new_tokens=40)) == [one_copy]
    pieces = list(stream(model, tok, msgs, GenerationSettings(max_new_tokens=40)))
    assert "".join(pieces).strip() == one_copy and len(pieces) > 1, "streamed piece by piece, nothing taken back"
    assert "".join(stream(model, tok, msgs, GenerationSettings(max_new_tokens=20, stop_repeats=0))).strip() == \
        unstopped(20)


def test_loop_rule_on_token_lists():
    from lmtailor.generate import LOOP_MIN_TOKENS, ends_in_loop, loop_cut, loop_safe

    assert LOOP_MIN_TOKENS == 12
    loop = [1, 2] + [7, 8, 9] * 4  # 4 copies of a 3-gram: 12 tokens
    assert ends_in_loop(loop, 3) and not ends_in_loop(loop[:-1], 3) and loop_cut(loop, 3) == 5
    assert not ends_in_loop(loop, 0) and loop_cut(loop, 0) == len(loop)
    assert loop_cut(loop + [5, 6], 3) == 5, "the first loop counts, whatever follows"
    assert not ends_in_loop([4, 5, 5], 3) and loop_cut([4, 5, 5, 6], 3) == 4, "`a a`: short repeats stay"
    assert not ends_in_loop([3] + [5] * 11, 3) and ends_in_loop([5] * 12, 3), "1 token: 12 copies"
    assert ends_in_loop([3] + [5, 6] * 6, 3) and not ends_in_loop([3, 6] + [5, 6] * 5, 3), "2 tokens: 6 copies"
    long = list(range(20, 36))  # a 16-token n-gram: 3 copies
    assert ends_in_loop(long * 3, 3) and not ends_in_loop(long * 2, 3) and loop_cut(long * 3, 3) == 16
    assert not ends_in_loop(list(range(20, 37)) * 3, 3), "n-grams longer than 16 tokens are not looked for"
    assert ends_in_loop([1] + [7, 8, 9] * 2, 2) is False and ends_in_loop([7, 8, 9] * 4, 2)
    # streaming holds back only what a later cut could remove
    assert loop_safe([1, 2, 3, 4], 3) == 4 and loop_safe([1, 2, 7, 8, 7, 8, 7], 3) == 4
    seq = [1, 2] + [7, 8, 9] * 4
    assert all(loop_safe(seq[:k], 3) <= loop_cut(seq, 3) for k in range(1, len(seq) + 1)), "never taken back"


def test_stop_repeats_setting():
    from pydantic import ValidationError

    assert GenerationSettings(stop_repeats=0).stop_repeats == 0
    with pytest.raises(ValidationError, match="at least 2"):
        GenerationSettings(stop_repeats=1)
    with pytest.raises(ValidationError):
        GenerationSettings(stop_repeats=-1)


def engine_rows(model, tok, repeats: int, max_tokens: int = 30):
    """One request of the two raw prompts (one batch) through the server's engine: (texts from the deltas,
    {row: (finish reason, tokens)}, the engine's stats)."""
    import threading
    import time

    from lmtailor.serve.engine import Engine, Job, Limits, Sampling
    from lmtailor.serve.models import Slot

    events: list[tuple] = []
    done = threading.Event()

    def emit(e):
        events.append(e)
        if sum(x[0] in ("done", "error") for x in events) == 2:
            done.set()

    engine = Engine(Limits())
    try:
        prompts = [list(tok(p)["input_ids"]) for p in (LOOP_PROMPT, CHAIN_PROMPT)]
        engine.submit(Job(slot=Slot("looper", model, tok), prompts=prompts, sampling=Sampling(), max_tokens=max_tokens,
                          stop=[], emit=emit, deadline=time.monotonic() + 60, stop_repeats=repeats))
        assert done.wait(60), events
    finally:
        engine.close()
    texts = ["".join(e[2] for e in events if e[0] == "delta" and e[1] == r).strip() for r in (0, 1)]
    return texts, {e[1]: e[2:] for e in events if e[0] == "done"}, engine.stats


def test_server_engine_stops_a_looping_row_alone(looper):
    """The batching engine: a looping and a chain row in one batch; the streamed deltas join to the final text."""
    model, tok = load_pretrained(str(looper)).eval(), load_tokenizer(str(looper))
    one_copy, unstopped, chain = loop_texts(tok)
    texts, ends, stats = engine_rows(model, tok, 3)
    assert texts == [one_copy, chain] and stats["max_rows"] == 2
    assert ends == {0: ("stop", 13), 1: ("stop", len(CHAIN) + 1)}
    texts, ends, _ = engine_rows(model, tok, 0)
    assert texts == [unstopped(30), chain] and ends == {0: ("length", 30), 1: ("stop", len(CHAIN) + 1)}
