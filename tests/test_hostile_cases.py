"""The hostile inputs of issue 17 one by one: each is a one-line error naming the flag, key, file, line or field.

Flags and config values out of range, a YAML alias bomb, a lone surrogate in JSON, a Parquet file whose footer is
fine but whose pages are not, and a huge record (work bounded by max_length, identical results for normal ones).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from lmtailor.cli import main
from lmtailor.config import MAX_YAML_NODES, load_config
from lmtailor.data.validate import load_examples
from lmtailor.errors import ConfigError, DataError


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("argv", "named"), [
    (["generate", "nowhere", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "nowhere", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "nowhere", "hi", "--temperature", "-1"], "--temperature"),
    (["chat", "nowhere", "--stop-repeats", "1"], "stop_repeats"),
    (["eval", "nowhere", "--data", "x.jsonl", "--context", "-1"], "--context"),
    (["eval", "nowhere", "--data", "x.jsonl", "--stride", "-5"], "--stride"),
    (["eval", "nowhere", "--data", "x.jsonl", "--context", "8", "--stride", "9"], "--stride"),
    (["eval", "nowhere", "--data", "x.jsonl", "--max-length", "0"], "--max-length"),
    (["eval", "nowhere", "--data", "x.jsonl", "--generate", "-3"], "--generate"),
    (["tokenizer", "train", "--corpus", "x", "--vocab-size", "0", "--out", "t"], "--vocab-size"),
    (["serve", "nowhere", "--max-batch-size", "0"], "--max-batch-size"),
    (["serve", "nowhere", "--max-queue", "0"], "--max-queue"),
    (["serve", "nowhere", "--timeout", "nan"], "--timeout"),
    (["serve", "nowhere", "--port", "99999"], "--port"),
    (["validate", "seed=-1"], "'seed'"),
    (["validate", f"seed={2**70}"], "'seed'"),
    (["validate", "data.split_seed=-2"], "'data.split_seed'"),
    (["validate", "metric_for_best=bogus"], "allowed values for sft: loss, perplexity"),
    (["validate", "objective=classify", "metric_for_best=bleu"], "allowed values for classify: loss, accuracy"),
])
def test_out_of_range_flags_and_values(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, argv: list[str], named: str) -> None:
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, argv)
    assert named in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_metric_for_best_suggests_the_close_name() -> None:
    with pytest.raises(ConfigError, match="did you mean macro_f1"):
        load_config(None, ["objective=classify", "metric_for_best=macro-f1"])
    assert load_config(None, ["metric_for_best=chrf"]).metric_for_best == "chrf"


# ---- YAML -------------------------------------------------------------------------------------------------------

def _bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefghi", "bcdefghij"[: levels - 1], strict=False):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb())
    assert len(recipe.read_bytes()) < 700
    start = time.monotonic()
    err = _one_line_error(capsys, ["validate", str(recipe)])
    assert time.monotonic() - start < 5
    assert f"{recipe}:" in err and "alias" in err


def test_yaml_aliases_within_the_bound_still_work(tmp_path: Path) -> None:
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("lora:\n  target_modules: &m [q_proj, v_proj]\ntune:\n  lora.target_modules: [*m]\n")
    assert load_config(recipe).lora.target_modules == ["q_proj", "v_proj"]
    assert MAX_YAML_NODES >= 10_000


def test_recursive_yaml_alias_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("lora: &x\n  r: 8\n  self: *x\n")
    with pytest.raises(ConfigError, match=r"loop.yaml:\d+: not valid YAML: .*recursive"):
        load_config(recipe)


def test_run_config_and_canary_files_use_the_bounded_loader(tmp_path: Path) -> None:
    from lmtailor.errors import CheckpointError
    from lmtailor.privacy.canary import load_canaries
    from lmtailor.runs import read_config

    (tmp_path / "config.yaml").write_text(_bomb())
    with pytest.raises(CheckpointError, match="alias"):
        read_config(tmp_path)
    (tmp_path / "c.canaries.yaml").write_text(_bomb())
    with pytest.raises(ConfigError, match="alias"):
        load_canaries(tmp_path / "c.canaries.yaml")


# ---- data files -------------------------------------------------------------------------------------------------

def test_lone_surrogate_in_json_names_file_line_and_field(tmp_path: Path) -> None:
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text('{"instruction": "fine \\ud83d\\ude00", "output": "ok"}\n'
                     '{"instruction": "bad \\ud800 here", "output": "x"}\n')
    with pytest.raises(DataError) as err:
        load_examples(str(jsonl))
    assert err.value.problems == [f"{jsonl}:2: instruction: holds a lone UTF-16 surrogate escape (like \\ud800), "
                                  "which is not text; remove it or write the character whole"]
    whole = tmp_path / "s.json"
    whole.write_text('[{"instruction": "a", "output": "b"},\n {"messages": [{"role": "user", "content": "x"}, '
                     '{"role": "assistant", "content": "\\uDFFF"}]}]')
    with pytest.raises(DataError) as err:
        load_examples(str(whole))
    assert err.value.problems[0].startswith(f"{whole}:2: messages[1].content: holds a lone")
    pair = tmp_path / "pair.jsonl"  # an escaped pair is one character, and fine
    pair.write_text('{"instruction": "\\ud83d\\ude00", "output": "ok"}\n')
    assert load_examples(str(pair))[0].messages[0]["content"] == "\U0001f600"


def _parquet(path: Path, rows: int = 400, compression: str = "snappy") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"instruction": f"question {i} " * 4, "output": f"answer {i}"}
                                  for i in range(rows)])
    pq.write_table(table, path, compression=compression)
    return path.read_bytes()


@pytest.mark.parametrize("compression", ["snappy", "none", "zstd"])
def test_parquet_with_valid_footer_and_corrupt_pages(tmp_path: Path, compression: str) -> None:
    good = _parquet(tmp_path / "good.parquet", compression=compression)
    footer = int.from_bytes(good[-8:-4], "little") + 8
    outcomes = {"error": 0, "read": 0}
    for seed in range(8):
        rng = random.Random(seed)
        data = bytearray(good)
        for _ in range(30):  # damage only the pages, never the footer
            data[rng.randrange(4, len(data) - footer)] = rng.randrange(256)
        bad = tmp_path / f"bad{seed}.parquet"
        bad.write_bytes(bytes(data))
        try:
            load_examples(str(bad))
            outcomes["read"] += 1  # damage that still decodes (e.g. inside uncompressed text) is data
        except DataError as e:
            outcomes["error"] += 1
            where = [e.message, *e.problems]
            assert any(str(bad) in line for line in where), where
    assert outcomes["error"] >= 1, outcomes


# ---- bounded work for huge records ------------------------------------------------------------------------------

def test_huge_record_tokenized_within_max_length_bound(tiny_model: Path) -> None:
    from lmtailor import render
    from lmtailor.data.example import Example
    from lmtailor.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    rng = random.Random(0)
    words = ["list", "files", "tar", "grep", "é", "日本", "  ", "\n", "x" * 40, "-la", "🙂"]

    def text(n: int) -> str:
        return "".join(rng.choice(words) + rng.choice(" .,") for _ in range(n))

    for n_words, max_length in ((5, 64), (400, 32), (3000, 64), (3000, 512), (20000, 16)):
        ex = Example(messages=[{"role": "user", "content": text(n_words)},
                               {"role": "assistant", "content": text(n_words // 2 + 1)}], source="t:1")
        clipped = render.tokenize_example(tok, ex, max_length)
        old = render.CLIP_MARGIN_TOKENS
        try:
            render.CLIP_MARGIN_TOKENS = 10**9  # no clipping: the whole record tokenized, then truncated
            whole = render.tokenize_example(tok, ex, max_length)
        finally:
            render.CLIP_MARGIN_TOKENS = old
        assert [(t.input_ids, t.labels) for t in clipped] == [(t.input_ids, t.labels) for t in whole]

    huge = Example(messages=[{"role": "user", "content": "word " * 2_000_000},  # 10 MB
                             {"role": "assistant", "content": "ok"}], source="t:1")
    start = time.monotonic()
    (seq,) = render.tokenize_example(tok, huge, 64)
    assert len(seq.input_ids) == 64 and time.monotonic() - start < 5


def test_record_over_the_maximum_size_is_a_problem_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtailor.data import sources

    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", 1000)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n"
                    + json.dumps({"instruction": "x" * 2000, "output": "b"}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert err.value.problems[0].startswith(f"{path}:2: the record is") and "maximum record size" in \
        err.value.problems[0]


# ---- the removed int8 speed-up ------------------------------------------------------------------------------------
# The hand-written int8 kernel lost to llama.cpp q8_0 (benchmarks/results/serve_load.json) and was removed: every
# verb with --speedup refuses int8 (and any unknown value) in one line that names the allowed values and says where
# int8 is served now, before any model loads or anything is written.

SPEEDUP_VERBS = [
    ["generate", "nowhere", "hi"],
    ["chat", "nowhere"],
    ["serve", "nowhere"],
    ["serve", "nowhere", "--engine", "llama.cpp"],
    ["pairs", "make", "nowhere", "--data", "x.jsonl", "--out", "pairs.jsonl"],
]


@pytest.mark.parametrize("head", SPEEDUP_VERBS, ids=lambda h: "-".join(h[:2]))
@pytest.mark.parametrize("value", ["int8", "INT8", "int4", ""])
def test_removed_or_unknown_speedup_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, head: list[str], value: str) -> None:
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, [*head, "--speedup", value])
    assert "--speedup" in err and "allowed values: none, fp16, bf16" in err
    if value == "int8":
        assert "removed" in err and "--gguf-type q8_0" in err and "--engine llama.cpp" in err
    assert not any(tmp_path.iterdir())

