"""Hostile inputs: broken data files and configs give a DataError/ConfigError naming the problem, never a traceback.

Property tests (hypothesis, bounded) feed the data loaders truncated files, wrong encodings, BOMs, huge lines, wrong
types, missing fields, empty files and nested garbage in .jsonl/.json/.csv/.tsv/.txt, and the config parser random
overrides and YAML. A couple of fixed cases run the real CLI to check the one-line `error:` and exit code 2.
Pickle checkpoints are refused unless asked for, and remote code stays off by default.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtailor.config import DataSettings, RunConfig, load_config, parse_override
from lmtailor.data.validate import load_datasets, load_examples
from lmtailor.errors import CheckpointError, ConfigError, DataError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies -------------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | \
    st.text(max_size=20)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                        max_size=4), max_leaves=15)
field_names = st.sampled_from(["instruction", "output", "input", "system", "messages", "conversations", "prompt",
                               "completion", "text", "label", "source", "target", "role", "content"])
turn = st.dictionaries(st.sampled_from(["role", "content", "from", "value", "type"]),
                       json_values | st.sampled_from(["user", "assistant", "system", "gpt", "human", "robot"]),
                       max_size=3)
records = st.one_of(
    json_values,
    st.dictionaries(field_names, json_values | st.text(max_size=30), max_size=4),  # right names, wrong types
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries({"instruction": st.text(max_size=20), "output": st.text(max_size=20)}),
)


@st.composite
def file_bytes(draw: Any, suffix: str) -> bytes:
    """A data file of type `suffix`, likely broken in one or more ways."""
    rows = draw(st.lists(records, max_size=6))
    if suffix in (".jsonl", ".ndjson"):
        lines = [json.dumps(r, allow_nan=True) for r in rows]
        lines += draw(st.lists(st.text(max_size=30), max_size=2))  # garbage lines
        text = "\n".join(draw(st.permutations(lines)))
    elif suffix == ".json":
        doc = draw(st.sampled_from(["list", "container", "scalar", "single"]))
        text = json.dumps({"list": rows, "container": {"data": rows, "x": [1]}, "scalar": 3,
                           "single": rows[0] if rows else {}}[doc], allow_nan=True)
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        cells = st.text(alphabet=st.sampled_from(list('ab," \n\r\t\'x\\') + ["é", "\x00"]), max_size=8)
        header = draw(st.lists(st.sampled_from(["instruction", "output", "text", "", "messages", "a"]), max_size=4))
        body = draw(st.lists(st.lists(cells, max_size=5), max_size=4))
        text = "\n".join(sep.join(r) for r in [header, *body])
    else:
        text = draw(st.text(max_size=200))
    # Damage: truncate, nest, bloat, re-encode, add a BOM.
    if draw(st.booleans()) and text:
        text = text[:draw(st.integers(0, len(text)))]
    damage = draw(st.sampled_from(["none", "nested", "huge", "none"]))
    if damage == "nested":
        depth = draw(st.integers(100, 5000))
        text += "\n" + "[" * depth + "]" * draw(st.integers(0, depth))
    elif damage == "huge":
        text += "\n" + json.dumps({"text": "x" * 300_000})
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1", "cp1252"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 9)) == 0:
        data = draw(st.binary(max_size=64))
    return data


def _check_load(data: bytes, suffix: str, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            examples = load_examples(str(path), fmt)
        except DataError as e:
            text = str(e)
            assert text and "\n" not in e.message, text
            where = [e.message, *e.problems]
            assert any(str(path) in line for line in where), where  # the error names the file
            for line in e.problems:
                assert line.startswith(f"{path}:"), line  # ...and each bad record its line
            return
        assert examples and all(e.messages is not None or e.text is not None for e in examples)
        with contextlib.suppress(DataError):
            load_datasets(DataSettings(path=str(path), format=fmt, val_fraction=0.5))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
@SETTINGS
@given(data=st.data())
def test_loaders_raise_only_data_errors(suffix: str, data: st.DataObject) -> None:
    content = data.draw(file_bytes(suffix))
    fmt = data.draw(st.sampled_from(["auto", "auto", "chat", "alpaca", "text", "prompt_completion"]))
    _check_load(content, suffix, fmt)


@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", b""),
    ("blank.jsonl", b"\n  \n\t\n"),
    ("bom_only.json", b"\xef\xbb\xbf"),
    ("utf16.jsonl", json.dumps({"text": "héllo"}).encode("utf-16")),
    ("latin1.csv", "text\ncaf\xe9\n".encode("latin-1")),
    ("deep.json", b"[" * 100_000),
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"\n"),
    ("truncated.json", b'[{"instruction": "a", "output": "b"}, {"instr'),
    ("scalar.json", b"42"),
    ("nulls.jsonl", b"null\n[]\n\"x\"\n"),
    ("wrongtype.jsonl", b'{"instruction": 1, "output": ["x"]}\n'),
    ("missing.jsonl", b'{"instruction": "only"}\n'),
    ("badroles.jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}\n'),
    ("header_only.csv", b"instruction,output\n"),
    ("ragged.csv", b"instruction,output\na,b,c\n"),
    ("dup_header.csv", b"text,text\na,b\n"),
    ("nul.txt", b"\x00\x00\x00"),
    ("unknown.xyz", b"hello"),
])
def test_fixed_hostile_files(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    try:
        load_examples(str(path))
    except DataError as e:
        assert str(path) in e.message or any(str(path) in p for p in e.problems)


# ---- configs ----------------------------------------------------------------------------------------------------

KEYS = ["lr", "lora.r", "lora", "data.path", "data", "method", "batch_size", "eval.samples", "nope", "lora.nope",
        "generation.stop", "", ".", "a..b", "max_steps", "dtype", "lora.target_modules", "seed"]
yaml_values = st.one_of(
    st.sampled_from(["1e-4", "-1", "0", "true", "null", "~", "[1, 2", "{a: 1}", "[]", "!!python/object:os.system x",
                     "2024-01-01", "'quoted", "&a [*a]", "0x1F", ".inf", "nan", "lora", "full", "é", "\x00",
                     "a: b: c"]),
    st.text(max_size=20),
)


@SETTINGS
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), yaml_values), max_size=4),
       raw=st.lists(st.text(max_size=15), max_size=2))
def test_overrides_raise_only_config_errors(overrides: list[tuple[str, str]], raw: list[str]) -> None:
    texts = [f"{k}={v}" for k, v in overrides] + raw
    for text in texts:
        with contextlib.suppress(ConfigError):
            parse_override(text)
    try:
        cfg = load_config(None, texts)
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, RunConfig)


@SETTINGS
@given(doc=st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values | yaml_values, max_size=5).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
))
def test_yaml_recipes_raise_only_config_errors(doc: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(doc.encode("utf-8", errors="surrogatepass") if doc.isascii() else doc.encode("latin-1",
                                                                                                       "replace"))
        try:
            cfg = load_config(path)
        except ConfigError as e:
            assert str(e)
        else:
            assert isinstance(cfg, RunConfig)


# ---- the CLI: one line, exit code 2, no traceback ---------------------------------------------------------------

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmtailor", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\nlora:\n  rank: 8\n")
    bad = _cli("validate", str(recipe), cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lora.rank" in lines[0]
    assert "Traceback" not in bad.stderr

    data = tmp_path / "broken.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "x"}\n{"tru')
    out = _cli("train", f"data.path={data}", "base_model=/nonexistent", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: 2 bad record(s)") and "Traceback" not in out.stderr
    assert f"{data}:2: instruction: must be a string" in out.stderr and f"{data}:3: not valid JSON" in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("model"))


def test_cli_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmtailor.cli import main

    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe file not found") and err.count("\n") == 1


# ---- unsafe checkpoints -------------------------------------------------------------------------------------------

def test_pickle_only_checkpoint_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    from lmtailor.models import load_pretrained

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder / "config.json")
    torch.save(load_file(str(tiny_model / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_pretrained(str(folder))
    assert load_pretrained(str(folder), allow_pickle=True) is not None


def test_remote_code_is_off_by_default() -> None:
    from lmtailor.models import load_pretrained, load_tokenizer

    assert RunConfig().trust_remote_code is False
    for fn in (load_pretrained, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
