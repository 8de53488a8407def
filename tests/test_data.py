"""The data-reading stage: sources, formats, validation, cleaning and splitting, on tiny files."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtailor.config import DataSettings
from lmtailor.data import sources
from lmtailor.data.example import Example
from lmtailor.data.formats import (
    FieldError,
    convert_record,
    detect_format,
    format_names,
    register_format,
    unregister_format,
)
from lmtailor.data.sources import read_records
from lmtailor.data.validate import clean_examples, load_datasets, load_examples, split_examples
from lmtailor.errors import DataError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def jl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# (file name, content, expected: list of (messages or text, line, meta subset))
ROUND_TRIPS = [
    ("t.jsonl", jl({"text": "hello"}, {"text": "world"}), [("hello", 1, {}), ("world", 2, {})]),
    ("blank.jsonl", '{"text": "a"}\n\n  \n{"text": "b"}\n', [("a", 1, {}), ("b", 4, {})]),
    ("c.jsonl", jl({"messages": [{"role": "system", "content": "be brief"}, user("hi"), bot("hey")]}),
     [([{"role": "system", "content": "be brief"}, user("hi"), bot("hey")], 1, {})]),
    ("s.jsonl", jl({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "id": 7}),
     [([user("q"), bot("a")], 1, {"id": 7})]),
    ("a.jsonl", jl({"instruction": "Sum", "input": "1 2", "output": "3", "system": "math"},
                   {"instruction": "Hi", "input": "", "output": "Hello"}),
     [([{"role": "system", "content": "math"}, user("Sum\n\n1 2"), bot("3")], 1, {}),
      ([user("Hi"), bot("Hello")], 2, {})]),
    ("p.json", json.dumps([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}], indent=2),
     [([user("p1"), bot("c1")], 2, {}), ([user("p2"), bot("c2")], 6, {})]),
    ("d.json", '{"data": [\n  {"text": "x"},\n\n  {"text": "y"}\n]}\n', [("x", 2, {}), ("y", 4, {})]),
    ("one.json", '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}',
     [([user("u"), bot("a")], 1, {})]),
    ("pc.csv", 'prompt,completion\nhi,"two\nlines"\nq,a\n', [([user("hi"), bot("two\nlines")], 2, {}),
                                                             ([user("q"), bot("a")], 4, {})]),
    ("l.tsv", "text\tlabel\ngood film\tpos\nbad film\tneg\n",
     [("good film", 2, {"label": "pos"}), ("bad film", 3, {"label": "neg"})]),
    ("m.csv", 'messages\n"[{""role"": ""user"", ""content"": ""u""}, {""role"": ""assistant"", ""content"": ""a""}]"\n',
     [([user("u"), bot("a")], 2, {})]),
    ("pair.jsonl", jl({"source": "Hallo", "target": "Hello"}),
     [([user("Hallo"), bot("Hello")], 1, {"source": "Hallo", "target": "Hello"})]),
    ("lab.jsonl", jl({"text": "t", "label": 1}), [("t", 1, {"label": 1})]),
    ("notes.txt", "line one\nline two\n", [("line one\nline two\n", 1, {})]),
    ("readme.md", "# Title\n\nBody", [("# Title\n\nBody", 1, {})]),
    ("listed.jsonl", '[\n {"text": "a"},\n {"text": "b"}\n]\n', [("a", 2, {}), ("b", 3, {})]),
    ("lines.json", jl({"text": "a"}, {"text": "b"}), [("a", 1, {}), ("b", 2, {})]),
]


@pytest.mark.parametrize("name,content,expected", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_file_round_trips(tmp_path: Path, name: str, content: str, expected: list) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    examples = load_examples(str(path))
    assert len(examples) == len(expected)
    for ex, (body, line, meta) in zip(examples, expected, strict=True):
        if isinstance(body, str):
            assert ex.text == body and ex.messages is None
        else:
            assert ex.messages == body and ex.text is None
        assert ex.source == f"{path}:{line}"
        assert meta.items() <= ex.meta.items()


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["i1", "i2"], "output": ["o1", "o2"]}), path)
    examples = load_examples(str(path))
    assert [e.messages for e in examples] == [[user("i1"), bot("o1")], [user("i2"), bot("o2")]]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2"]


def test_validator_reports_every_bad_record(tmp_path: Path) -> None:
    rows = [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(10)]
    rows[2] = {"messages": [user("q"), {"role": "bot", "content": "a"}]}
    rows[6] = {"messages": [user("q"), {"role": "assistant", "content": 5}]}
    path = tmp_path / "ten.jsonl"
    path.write_text(jl(*rows))
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    err = info.value
    assert err.count == 2 and len(err.problems) == 2
    assert err.problems[0] == f"{path}:3: messages[1].role: must be one of system, user, assistant, tool; got 'bot'"
    assert err.problems[1] == f"{path}:7: messages[1].content: must be a string; got a number"
    assert "2 bad record(s)" in err.message


BAD_RECORDS = [
    ({"messages": [user("q")]}, "messages", "at least one assistant turn"),
    ({"messages": "hi"}, "messages", "must be a list"),
    ({"messages": []}, "messages", "is empty"),
    ({"messages": [user("q"), "a"]}, "messages[1]", "must be an object"),
    ({"messages": [user("q"), {"content": "a"}]}, "messages[1].role", "is missing"),
    ({"messages": [user("q"), {"role": "system", "content": "s"}, bot("a")]}, "messages[1].role", "only come first"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     "conversations[1].from", "got 'robot'"),
    ({"instruction": "i", "output": None}, "output", "must be a string; got null"),
    ({"instruction": ["i"], "output": "o"}, "instruction", "must be a string; got a list"),
    ({"instruction": "i", "output": "o", "input": 3}, "input", "must be a string"),
    ({"prompt": "p", "completion": {"x": 1}}, "completion", "got an object"),
    ({"text": "t", "label": [1]}, "label", "must be a string or a number"),
    ({"text": 3}, "text", "must be a string"),
]


@pytest.mark.parametrize("record,field,fragment", BAD_RECORDS, ids=[str(b[1]) + "-" + b[2] for b in BAD_RECORDS])
def test_field_errors(tmp_path: Path, record: dict, field: str, fragment: str) -> None:
    with pytest.raises(FieldError) as info:
        convert_record(record, detect_format(record), "f:1")
    assert info.value.field == field and fragment in info.value.reason
    path = tmp_path / "bad.jsonl"
    path.write_text(jl(record))
    with pytest.raises(DataError) as data_info:
        load_examples(str(path))
    assert data_info.value.problems[0].startswith(f"{path}:1: {field}: ")


def test_bad_json_lines_and_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n[1, 2]\n{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    problems = info.value.problems
    assert info.value.count == 3
    assert problems[0].startswith(f"{path}:2: not valid JSON (")
    assert problems[1] == f"{path}:3: not a JSON object (got a list)"
    assert problems[2].startswith(f"{path}:4: text: is missing") and "looks like prompt_completion" in problems[2]


def test_problem_list_is_capped_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text(jl({"text": "ok"}, *[{"text": i} for i in range(30)]))
    with pytest.raises(DataError) as info:
        load_examples(str(path), max_problems_shown=5)
    assert info.value.count == 30 and len(info.value.problems) == 5


def test_bom_accepted(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + jl({"text": "hi"}).encode())
    (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\np,c\n")
    assert load_examples(str(tmp_path / "b.jsonl"))[0].text == "hi"
    assert load_examples(str(tmp_path / "b.csv"))[0].messages == [user("p"), bot("c")]


def test_non_utf8_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8 text \(byte offset 28, line 2\)"):
        load_examples(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # offsets count the BOM too
    with pytest.raises(DataError, match=r"byte offset 31, line 2"):
        load_examples(str(path))


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("e.json", "[]"),
                                          ("e.csv", ""), ("h.csv", "text\n"), ("e.txt", "")])
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="empty|no records"):
        load_examples(str(tmp_path / name))


@pytest.mark.parametrize("path", ["missing.jsonl", "sub/dir/data.csv", "./here", "~/nowhere/x.json", "data.v2"])
def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_examples(path)


def test_missing_file_suggests_close_name(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(jl({"text": "a"}))
    with pytest.raises(DataError) as info:
        load_examples(str(tmp_path / "trian.jsonl"))
    assert "train.jsonl" in (info.value.hint or "")


def test_unsupported_and_invalid_whole_files(tmp_path: Path) -> None:
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type '.xml'"):
        load_examples(str(tmp_path / "x.xml"))
    (tmp_path / "bad.json").write_text('{"data": [\n {"text": "a"},\n]}')
    with pytest.raises(DataError, match=r"bad\.json:3: not valid JSON"):
        load_examples(str(tmp_path / "bad.json"))
    (tmp_path / "n.json").write_text("42")
    with pytest.raises(DataError, match="expected a list of objects"):
        load_examples(str(tmp_path / "n.json"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a valid Parquet file"):
        load_examples(str(tmp_path / "bad.parquet"))


def test_folder_reading(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(jl({"text": "from b"}))
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.csv").write_text("text\nfrom c\n")
    (tmp_path / ".hidden.jsonl").write_text(jl({"text": "hidden"}))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.jsonl").write_text(jl({"text": "git"}))
    (tmp_path / "ignored.bin").write_bytes(b"\x00\xff")
    examples = load_examples(str(tmp_path))
    assert [e.text for e in examples] == ["from a", "from b", "from c"]
    assert examples[2].source == f"{tmp_path / 'sub' / 'c.csv'}:2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        list(read_records(str(tmp_path / "empty")))


def test_explicit_format_and_system_prompt(tmp_path: Path) -> None:
    path = tmp_path / "pc.jsonl"
    path.write_text(jl({"prompt": "p", "completion": "c"}, {"messages": [{"role": "system", "content": "own"},
                                                                         user("u"), bot("a")]}))
    with pytest.raises(DataError) as info:
        load_examples(str(path), fmt="prompt_completion")
    assert info.value.count == 1 and "looks like chat" in info.value.problems[0]
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        load_examples(str(path), fmt="nope")
    path.write_text(jl({"messages": [user("u"), bot("a")]}, {"messages": [{"role": "system", "content": "own"},
                                                                          user("u"), bot("a")]}))
    first, second = load_examples(str(path), system_prompt="be kind")
    assert first.messages[0] == {"role": "system", "content": "be kind"}
    assert second.messages[0]["content"] == "own"


def test_detect_format() -> None:
    assert detect_format({"messages": [], "text": "t"}) == "chat"
    assert detect_format({"instruction": "i", "output": "o", "text": "t"}) == "alpaca"
    assert detect_format({"text": "t", "label": "x"}) == "labeled"
    assert detect_format({"text": "t", "id": 1}) == "text"
    with pytest.raises(DataError) as info:
        detect_format({"question": "q", "answer": "a"})
    assert "answer, question" in info.value.message and "alpaca (instruction, output)" in (info.value.hint or "")


def test_register_format() -> None:
    def qa(record: dict, source: str) -> Example:
        return Example(messages=[user(record["question"]), bot(record["answer"])], source=source)

    register_format("qa_test", ["question", "answer"], qa)
    try:
        assert "qa_test" in format_names()
        assert detect_format({"question": "q", "answer": "a"}) == "qa_test"
        ex = convert_record({"question": "q", "answer": "a"}, "qa_test", "f:1", system_prompt="s")
        assert ex.messages == [{"role": "system", "content": "s"}, user("q"), bot("a")]
        with pytest.raises(ValueError, match="already registered"):
            register_format("qa_test", ["question"], qa)
        with pytest.raises(ValueError, match="already registered"):
            register_format("chat", ["messages"], qa)
    finally:
        unregister_format("qa_test")
    assert "qa_test" not in format_names()
    with pytest.raises(ValueError, match="callable"):
        register_format("x_test", ["a"], "not a function")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="field names"):
        register_format("x_test", "a", qa)
    with pytest.raises(ValueError, match="field names"):
        register_format("x_test", [], qa)


def test_clean_examples() -> None:
    examples = [
        Example(text="  hello \n"),
        Example(text="hello"),
        Example(text="   "),
        Example(messages=[user(" q "), bot(" a ")]),
        Example(messages=[user("q"), bot("a")]),
        Example(messages=[user("q"), bot("  ")]),
        Example(messages=[user("q"), bot("b")]),
    ]
    kept, stats = clean_examples(examples)
    assert stats == {"read": 7, "kept": 3, "duplicates": 2, "empty": 2}
    assert [e.text or e.messages for e in kept] == ["hello", [user("q"), bot("a")], [user("q"), bot("b")]]
    assert examples[0].text == "  hello \n"  # inputs untouched
    kept, stats = clean_examples(examples, dedup=False)
    assert stats["duplicates"] == 0 and stats["kept"] == 5


def _texts(n: int, start: int = 0) -> list[Example]:
    return [Example(text=f"example number {i}") for i in range(start, start + n)]


def test_split_is_deterministic_and_stable() -> None:
    examples = _texts(200)
    train, val = split_examples(examples, 0.1, None, seed=3)
    assert len(val) == 20 and len(train) == 180
    assert split_examples(examples, 0.1, None, seed=3) == (train, val)
    assert split_examples(list(reversed(examples)), 0.1, None, seed=3)[1] == list(reversed(val))
    assert split_examples(examples, 0.1, None, seed=4)[1] != val
    # Adding one example moves at most one other across the split.
    _, val2 = split_examples([*examples[:50], *_texts(1, start=1000), *examples[50:]], 0.1, None, seed=3)
    old = {e.text for e in val}
    assert len(old - {e.text for e in val2}) <= 1
    # The same in a fresh process with a different hash seed.
    code = ("from lmtailor.data.example import Example; from lmtailor.data.validate import split_examples; "
            "ex = [Example(text=f'example number {i}') for i in range(200)]; "
            "print([e.text for e in split_examples(ex, 0.1, None, seed=3)[1]])")
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr([e.text for e in val])


def test_split_sizes() -> None:
    assert [len(p) for p in split_examples(_texts(10), 0.5, 3, seed=0)] == [7, 3]
    assert [len(p) for p in split_examples(_texts(3), 0.1, None, seed=0)] == [2, 1]
    assert [len(p) for p in split_examples(_texts(1), 0.1, None, seed=0)] == [1, 0]
    assert [len(p) for p in split_examples(_texts(5), 0.0, None, seed=0)] == [5, 0]
    with pytest.raises(DataError, match="val_size"):
        split_examples(_texts(3), 0.1, 3, seed=0)


def test_load_datasets(tmp_path: Path) -> None:
    rows = [{"text": f"doc {i}"} for i in range(20)] + [{"text": "doc 0"}, {"text": " "}]
    (tmp_path / "train.jsonl").write_text(jl(*rows))
    cfg = DataSettings(path=str(tmp_path / "train.jsonl"), val_size=4, max_examples=10)
    train, val, stats = load_datasets(cfg)
    assert (len(train), len(val)) == (10, 4)
    assert stats == {"format": "text", "read": 22, "kept": 20, "duplicates": 1, "empty": 1, "train": 10, "val": 4,
                     "val_overlap": 0}
    (tmp_path / "val.jsonl").write_text(jl({"text": "doc 1"}, {"text": "held out"}))
    train, val, stats = load_datasets(DataSettings(path=str(tmp_path / "train.jsonl"),
                                                   val_path=str(tmp_path / "val.jsonl")))
    assert [e.text for e in val] == ["doc 1", "held out"]
    assert len(train) == 19 and stats["val_overlap"] == 1
    with pytest.raises(DataError, match="data.path is not set"):
        load_datasets(DataSettings())


def test_catalog_path_is_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "cat.jsonl"
    local.write_text(jl({"prompt": "p", "completion": "c"}))
    fake = types.ModuleType("lmtailor.data.catalog")
    fake.fetch = lambda name: local if name == "tiny" else pytest.fail(name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmtailor.data.catalog", fake)
    assert load_examples("catalog:tiny")[0].source == f"{local}:1"


def test_hub_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_hub_offline_mode", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError) as info:
        load_examples("someorg/some-dataset")
    assert "could not be reached" in info.value.message and "offline" in info.value.message
    assert "data.path" in (info.value.hint or "")


def test_hub_load_error_is_translated(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def boom(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someorg/x' on the Hub")

    monkeypatch.setattr(sources, "_hub_offline_mode", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="could not be reached .HF_HUB_OFFLINE is set"):
        load_examples("someorg/x")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200),
                      st.lists(st.sampled_from([b'{"text": "a"}', b'{"messages": []}', b"\n", b"{", b"}", b'"',
                                                b"\xef\xbb\xbf", b"\xff", b"[", b"]", b"1", b'{"prompt": 1}',
                                                b'"text"', b":", b","]), max_size=20).map(b"".join)))
def test_arbitrary_bytes_load_or_raise_data_error(tmp_path: Path, data: bytes) -> None:
    for name in ("fuzz.jsonl", "fuzz.json", "fuzz.csv"):
        path = tmp_path / name
        path.write_bytes(data)
        with contextlib.suppress(DataError):
            load_examples(str(path))
