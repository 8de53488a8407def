"""Issue 17: work per record is bounded by the configured length on every data path, and metric_for_best is checked
per objective when the recipe is read.

A record is cut before it is rendered and tokenized wherever it is truncated anyway (chat, prompt/completion,
alpaca, preference, unpaired, reward, grpo prompts, classification and seq2seq inference, masked-LM perplexity);
a document every token of which is kept (clm text, mlm, the pretraining stream, sliding-window perplexity) is
tokenized in windows. Either way the tokens equal those of tokenizing the whole record (then truncating).
"""

from __future__ import annotations

import json
import random
import resource
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from lmtailor import render
from lmtailor.cli import main
from lmtailor.config import load_config
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError

WORDS = ["list", "files", "tar", "grep", "é", "日本", "  ", "\n", "x" * 40, "-la", "🙂", "\n\n", "   ", "\t"]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(" .,") for _ in range(n))


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    from lmtailor.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture
def unclipped(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a function with clipping off: the whole record rendered and tokenized, as before the bound."""
    def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as m:
            m.setattr(render, "CLIP_MARGIN_TOKENS", 10**12)
            m.setattr(render, "STREAM_CHARS", 10**12)
            return fn(*args, **kwargs)
    return call


def _bounded(fn: Any, seconds: float, mib: int) -> Any:
    """fn() within `seconds` and `mib` MiB of Python allocations at peak (and of process peak growth)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.monotonic()
    try:
        out = fn()
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # KiB on Linux
    assert took < seconds, f"{took:.1f} s"
    assert peak < mib * 2**20 and grown < 4 * mib, (peak / 2**20, grown)
    return out


# ---- truncated records: cut first, same tokens ------------------------------------------------------------------

def _conversation(rng: random.Random, turns: int, size: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": _text(rng, size)}] if rng.random() < 0.5 else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": _text(rng, rng.randint(0, size))},
                 {"role": "assistant", "content": _text(rng, rng.randint(0, size))}]
    return msgs


def test_chat_records_cut_before_tokenizing_give_the_same_tokens(tok: Any, unclipped: Any) -> None:
    rng = random.Random(1)
    for turns, size, max_length in ((1, 5, 64), (3, 400, 32), (12, 60, 64), (40, 30, 16), (2, 3000, 512)):
        ex = Example(messages=_conversation(rng, turns, size), source="t:1")
        for on_prompt in (False, True):
            fast = render.tokenize_example(tok, ex, max_length, on_prompt)
            whole = unclipped(render.tokenize_example, tok, ex, max_length, on_prompt)
            assert [(s.input_ids, s.labels) for s in fast] == [(s.input_ids, s.labels) for s in whole]


def test_tail_cut_keeps_the_last_tokens(tok: Any) -> None:
    """reward (conversation_ids) and grpo keep a conversation's last max_length tokens: cut from the start."""
    from lmtailor.objectives.reward import conversation_ids

    rng = random.Random(2)
    for turns, size, max_length in ((1, 5, 64), (3, 400, 32), (20, 60, 64), (2, 3000, 128)):
        msgs = _conversation(rng, turns, size)
        whole = render.tokenize_example(tok, Example(messages=msgs), 10**9)[0].input_ids[-max_length:]
        assert conversation_ids(tok, msgs, max_length) == whole
        history = msgs[:-1]
        assert render.prompt_ids(tok, render.clip_messages(tok, history, max_length, "tail"))[-max_length:] == \
            render.prompt_ids(tok, history)[-max_length:]


def test_preference_sequences_equal_the_whole_rendering(tok: Any, unclipped: Any) -> None:
    from lmtailor.objectives.preference import answer_sequence

    rng = random.Random(3)
    for size, max_length in ((5, 64), (400, 32), (3000, 128)):
        history = [{"role": "user", "content": _text(rng, size)}]
        answer = [{"role": "assistant", "content": _text(rng, size)}]
        fast, n = answer_sequence(tok, history, answer, max_length, "t:1")
        whole, n_whole = unclipped(answer_sequence, tok, history, answer, max_length, "t:1")
        assert (fast.input_ids, fast.labels) == (whole.input_ids, whole.labels)
        assert min(n, max_length) == min(n_whole, max_length)


@pytest.mark.parametrize("shape", ["chat", "many turns", "preference", "reward", "grpo"])
def test_multi_megabyte_record_with_max_length_64_is_quick_and_small(tok: Any, shape: str) -> None:
    from lmtailor.objectives.preference import answer_sequence
    from lmtailor.objectives.reward import conversation_ids

    big = "word " * 1_000_000  # 5 MB
    turns = [m for _ in range(20_000) for m in ({"role": "user", "content": "word " * 25},
                                                 {"role": "assistant", "content": "ok " * 25})]  # 5 MB, 40k turns
    user, answer = {"role": "user", "content": big}, {"role": "assistant", "content": big}
    calls = {
        "chat": lambda: render.tokenize_example(tok, Example(messages=[user, answer]), 64)[0].input_ids,
        "many turns": lambda: render.tokenize_example(tok, Example(messages=turns), 64)[0].input_ids,
        "preference": lambda: answer_sequence(tok, [user], [answer], 64, "t:1")[0].input_ids,
        "reward": lambda: conversation_ids(tok, [user, answer], 64),
        "grpo": lambda: render.prompt_ids(tok, render.clip_messages(tok, turns[:-1], 64, "tail"))[-64:],
    }
    ids = _bounded(calls[shape], seconds=5, mib=64)
    assert len(ids) == 64


# ---- kept documents: windows, same tokens -----------------------------------------------------------------------

def test_long_documents_tokenized_in_windows_equal_one_call(tok: Any) -> None:
    rng = random.Random(4)
    text = _text(rng, 10_000)
    for special in (False, True):
        whole = list(tok(text, add_special_tokens=special)["input_ids"])
        for window in (3000, 8000, 10**6):
            assert render.encode_long(tok, text, special, window=window) == whole


def test_clm_text_record_keeps_every_chunk(tok: Any, unclipped: Any) -> None:
    rng = random.Random(5)
    ex = Example(text=_text(rng, 12_000), source="t:1")
    assert len(ex.text or "") > render.STREAM_CHARS
    fast = render.tokenize_example(tok, ex, 64)
    whole = unclipped(render.tokenize_example, tok, ex, 64)
    assert len(fast) > 50 and [s.input_ids for s in fast] == [s.input_ids for s in whole]


def test_pretraining_stream_of_a_long_document_equals_one_call(tok: Any) -> None:
    from lmtailor.pretrain.corpus import _blocks

    rng = random.Random(6)
    docs = [_text(rng, 20), _text(rng, 10_000), _text(rng, 50)]
    ids: list[int] = []
    for d in docs:
        ids += list(tok(d, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    blocks = list(_blocks(iter(docs), tok, 64, batch_chars=4096))
    assert [t for b in blocks for t in b] == ids


# ---- a huge record through the real CLI -------------------------------------------------------------------------

def test_huge_record_trains_through_the_cli(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"list files {i}", "output": "ls -la"} for i in range(8)]
    rows.append({"instruction": "word " * 1_000_000, "output": "ok"})  # a 5 MB record
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--no-progress", f"base_model={tiny_model}", f"data.path={data}", "max_length=64",
                 "max_steps=1", "batch_size=2", f"output_dir={tmp_path / 'run'}", "eval.before_after=false",
                 "eval.generate_examples=0", "data.val_fraction=0.2"]) == 0
    assert (tmp_path / "run/model").is_dir()


# ---- metric_for_best per objective ------------------------------------------------------------------------------

@pytest.mark.parametrize(("objective", "good", "bad", "allowed"), [
    ("sft", "chrf", "macro_f1", "loss, perplexity, exact_match, chrf"),
    ("clm", "perplexity", "accuracy", "loss, perplexity"),
    ("classify", "macro_f1", "bleu", "loss, accuracy, macro_f1"),
    ("seq2seq", "rougeL", "accuracy", "bleu, chrf, rouge1"),
    ("dpo", "reward_accuracy", "accuracy", "reward_accuracy, reward_margin"),
    ("kto", "reward_accuracy", "macro_f1", "reward_accuracy"),
    ("reward", "accuracy", "chrf", "loss, accuracy, margin"),
    ("grpo", "reward_mean", "chrf", "loss, reward_mean"),
    ("mlm", "masked_accuracy", "chrf", "masked_accuracy"),
    ("span", "loss", "bogus", "loss, perplexity"),
])
def test_metric_for_best_is_checked_per_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  objective: str, good: str, bad: str, allowed: str) -> None:
    assert load_config(None, [f"objective={objective}", f"metric_for_best={good}"]).metric_for_best == good
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"objective={objective}", f"metric_for_best={bad}"])
    assert "config key 'metric_for_best'" in str(err.value) and f"allowed values for {objective}: " in str(err.value)
    assert allowed in str(err.value) and "\n" not in str(err.value)
    run = tmp_path / "run"
    assert main(["train", f"objective={objective}", f"metric_for_best={bad}", f"output_dir={run}"]) == 2
    assert "metric_for_best" in capsys.readouterr().err
    assert not run.exists()  # refused before any folder was made
