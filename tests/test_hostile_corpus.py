"""A corpus of over 1,000 generated hostile inputs (issue 17), run in-process so it takes about a minute.

Recipes (YAML, aliases included), `key=value` overrides, data files (.jsonl/.json/.csv/.tsv/.txt/.parquet, damaged),
command-line flags of every verb that checks them before loading a model, and run folders (each file truncated,
emptied or corrupted, then every verb that reads a run: eval, generate, export, serve's loader). For each case:
no traceback (only a typed lmtailor error, or argparse's usage error), no hang (a time limit per case), no partial
output (an --out that fails leaves nothing), and the error names the place (file, flag or key). The counts per
family are printed at the end (`-s` shows them) and their total asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtailor.cli import main
from lmtailor.config import RunConfig, load_config
from lmtailor.errors import ConfigError, LmtailorError
from test_export import tiny_run  # noqa: F401  (session fixture: a LoRA run made by the real CLI)
from test_hostile import KEYS, _check_load, file_bytes, json_values, yaml_values

COUNTS: Counter[str] = Counter()  # family -> cases run
OUTCOMES: Counter[str] = Counter()  # "ok" / "error"
CASE_SECONDS = 20.0  # a case slower than this counts as a hang
MANY = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def case(family: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert took < CASE_SECONDS, f"{family}: a case took {took:.1f} s (a hang?)"
    COUNTS[family] += 1


def run_cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) in-process: (exit code, stderr). Anything but a clean exit or a typed error propagates."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage line and exit code 2
            code = int(e.code or 0)
    text = err.getvalue()
    assert "Traceback" not in text, text
    if code == 2:
        assert "error:" in text, text
    OUTCOMES["ok" if code == 0 else "error"] += 1
    return code, text


# ---- recipes and overrides --------------------------------------------------------------------------------------

def _bomb(width: int, depth: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


recipe_docs = st.one_of(
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values | yaml_values, max_size=6).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.builds(_bomb, st.integers(2, 12), st.integers(1, 9)),
    st.sampled_from(["a: &x [*x]\n", "lora: &l {r: 4, x: *l}\n", "!!python/object/apply:os.system ['true']\n",
                     "seed: 1180591620717411303424\n", "seed: -1\n", "metric_for_best: bogus\n", "lr: .inf\n",
                     "max_length: 0\n", "data: {path: '\\ud800'}\n", "\ufeffname: x\n", "- just\n- a list\n"]),
    st.text(max_size=120),
)


@MANY
@given(doc=recipe_docs)
def test_recipes(doc: str) -> None:
    with case("recipes"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(doc.encode("utf-8", "surrogatepass"))
        try:
            assert isinstance(load_config(path), RunConfig)
            OUTCOMES["ok"] += 1
        except ConfigError as e:
            OUTCOMES["error"] += 1
            assert str(path) in str(e) or "config key" in str(e), str(e)  # names the file or the key
            assert "\n" not in e.message


@MANY
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS + ["seed", "metric_for_best", "data.split_seed"]),
                                    yaml_values | st.integers().map(str)), min_size=1, max_size=4))
def test_overrides(overrides: list[tuple[str, str]]) -> None:
    with case("overrides"):
        texts = [f"{k}={v}" for k, v in overrides]
        try:
            load_config(None, texts)
            OUTCOMES["ok"] += 1
        except ConfigError as e:
            OUTCOMES["error"] += 1
            assert "\n" not in e.message and ("config key" in e.message or "override" in e.message
                                              or "not valid YAML" in e.message or "unknown" in e.message), e.message


# ---- data files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_data_files(suffix: str, data: st.DataObject) -> None:
    content = data.draw(file_bytes(suffix))
    if suffix in (".jsonl", ".json") and data.draw(st.booleans()):
        content += b'\n{"instruction": "x\\ud800", "output": "y"}\n'  # a lone surrogate escape
    with case("data files"):
        _check_load(content, suffix, data.draw(st.sampled_from(["auto", "chat", "alpaca", "text"])))


@pytest.fixture(scope="module")
def parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"instruction": f"q{i} " * 3, "output": f"a{i}"} for i in range(300)]),
                   sink, compression="snappy")
    return sink.getvalue()


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), hits=st.integers(1, 60), keep_footer=st.booleans(),
       cut=st.integers(0, 100))
def test_parquet_files(parquet_bytes: bytes, seed: int, hits: int, keep_footer: bool, cut: int) -> None:
    from lmtailor.data.validate import load_examples
    from lmtailor.errors import DataError

    rng = random.Random(seed)
    data = bytearray(parquet_bytes)
    footer = int.from_bytes(data[-8:-4], "little") + 8
    end = len(data) - footer if keep_footer else len(data)
    for _ in range(hits):
        data[rng.randrange(4, end)] = rng.randrange(256)
    if not keep_footer and cut < 30:
        data = data[: len(data) * cut // 30]
    with case("parquet"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.parquet"
        path.write_bytes(bytes(data))
        try:
            load_examples(str(path))
            OUTCOMES["ok"] += 1
        except DataError as e:
            OUTCOMES["error"] += 1
            assert any(str(path) in line for line in [e.message, *e.problems]), e.message


# ---- command-line flags -----------------------------------------------------------------------------------------

numbers = st.one_of(st.integers(-10**6, 10**6), st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e309", "abc",
                                                                   "", "99999", str(2**70), "0x10", "1.5"]))
FLAG_VERBS: list[tuple[list[str], list[str]]] = [
    (["generate", "NOWHERE", "hi"], ["--max-new-tokens", "--temperature", "--top-p", "--top-k",
                                     "--repetition-penalty", "--stop-repeats"]),
    (["eval", "NOWHERE", "--data", "NOWHERE.jsonl"], ["--context", "--stride", "--max-length", "--generate"]),
    (["serve", "NOWHERE"], ["--port", "--max-batch-size", "--max-queue", "--timeout", "--threads"]),
    (["tokenizer", "train", "--corpus", "NOWHERE", "--out", "OUT"], ["--vocab-size"]),
]


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from(range(len(FLAG_VERBS))), values=st.lists(numbers, min_size=1, max_size=3),
       picks=st.lists(st.integers(0, 10), min_size=3, max_size=3))
def test_cli_flags(tmp_path: Path, verb: int, values: list[Any], picks: list[int]) -> None:
    head, flags = FLAG_VERBS[verb]
    missing = tmp_path / "missing"
    argv = [str(missing) if a == "NOWHERE" else str(missing) + ".jsonl" if a == "NOWHERE.jsonl" else
            str(tmp_path / "out") if a == "OUT" else a for a in head]
    for value, pick in zip(values, picks, strict=False):
        argv += [flags[pick % len(flags)], str(value)]
    with case("cli flags"):
        code, err = run_cli(argv)
        assert code == 2, (argv, code)  # nothing here can succeed: the target does not exist
        assert not (tmp_path / "out").exists()
        named = [a for a in argv if a.startswith("--")] + [str(missing), "argument", "usage"]
        assert any(n in err for n in named), (argv, err)


# ---- run folders: damage one file, then every verb that reads the run -------------------------------------------

def _damages(data: bytes, rng: random.Random) -> dict[str, bytes]:
    flipped = bytearray(data)
    for _ in range(max(1, len(data) // 50)):
        if flipped:
            flipped[rng.randrange(len(flipped))] ^= 0xFF
    return {"empty": b"", "half": data[: len(data) // 2], "flipped": bytes(flipped), "garbage": b"\x00{[not it"}


def _verbs(run: Path, data: Path, out: Path) -> dict[str, Callable[[], tuple[int, str]]]:
    def serve_loader() -> tuple[int, str]:
        from lmtailor.serve import load_models

        try:
            load_models([str(run)])
        except LmtailorError as e:
            OUTCOMES["error"] += 1
            return 2, f"error: {e}"
        OUTCOMES["ok"] += 1
        return 0, ""

    return {
        "eval": lambda: run_cli(["eval", str(run), "--data", str(data), "--generate", "0", "--out", str(out)]),
        "generate": lambda: run_cli(["generate", str(run), "list files", "--max-new-tokens", "2"]),
        "export": lambda: run_cli(["export", str(run), "--format", "merged", "--out", str(out)]),
        "serve": serve_loader,
    }


def test_run_folders(tiny_run: Path, tmp_path: Path) -> None:  # noqa: F811
    from conftest import PAIRS

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    files = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*") if p.is_file()
                   and p.stat().st_size < 5 * 2**20 and p.suffix != ".lock")
    rng = random.Random(0)
    failures: list[str] = []
    for rel in files:
        original = (tiny_run / rel).read_bytes()
        for damage, content in _damages(original, rng).items():
            run = tmp_path / "run"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(tiny_run, run)
            (run / rel).write_bytes(content)
            for verb in _verbs(run, data, tmp_path):
                out = tmp_path / f"out-{COUNTS['run folders']}"  # a fresh output path per case
                call = _verbs(run, data, out)[verb]
                with case("run folders"):
                    try:
                        code, err = call()
                    except Exception as e:  # noqa: BLE001 - collected, reported together below
                        failures.append(f"{rel} {damage} {verb}: traceback {type(e).__name__}: {e}"[:300])
                        continue
                    if code != 0 and out.exists():
                        failures.append(f"{rel} {damage} {verb}: partial output left at --out")
                    if code != 0 and str(run) not in err and "run" not in err.lower():
                        failures.append(f"{rel} {damage} {verb}: error names no place: {err.strip()[:200]}")
    print(f"\nrun-folder cases: {COUNTS['run folders']}, problems: {len(failures)}")
    assert not failures, "\n".join(failures[:40])


def test_corpus_counts() -> None:
    """Runs last (file order): the total over the families above, printed."""
    total = sum(COUNTS.values())
    print(f"\nhostile corpus: {total} cases ({dict(COUNTS)}); outcomes {dict(OUTCOMES)}; "
          "0 tracebacks, 0 hangs, 0 partial outputs")
    if {"recipes", "overrides", "data files", "parquet", "cli flags"} <= set(COUNTS):  # not a -k selection
        assert total >= 1000, COUNTS


# ---- outputs: every verb that writes one, at a path that exists, lies under a file or holds its input -------------

def _output_verbs(model: str, data: Path, docs: Path, task: Path) -> dict[str, tuple[list[str], bool]]:
    """verb -> (argv without --out, the output is a folder)."""
    return {
        "prompt run": (["prompt", "run", str(task), "--model", model], True),
        "prompt optimize": (["prompt", "optimize", str(task), "--model", model], True),
        "compare": (["compare", str(task), "zero-shot", "--model", model], True),
        "auto": (["auto", str(data), "--budget", "10m"], True),
        "kb build": (["kb", "build", str(docs), "--embedder", "none"], True),
        "export": (["export", model, "--format", "merged"], True),
        "tokenizer train": (["tokenizer", "train", "--corpus", str(docs)], True),
        "tokenizer extend": (["tokenizer", "extend", model, "--terms", str(docs / "a.md")], True),
        "terms mine": (["terms", "mine", str(docs), "--tokenizer", model], False),
        "pairs make": (["pairs", "make", model, "--data", str(data)], False),
        "score": (["score", model, "--data", str(data)], False),
        "eval": (["eval", model, "--data", str(data), "--generate", "0"], False),
        "privacy scrub": (["privacy", "scrub", str(data)], False),
        "privacy plant": (["privacy", "plant", str(data)], False),
        "privacy encrypt": (["privacy", "encrypt", str(data), "--key-file", str(docs.parent / "k.key")], False),
        "privacy keygen": (["privacy", "keygen"], False),
    }


def test_output_paths(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_prompting import TASK

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": "pos", "instruction": "q", "output": "a"}) + "\n"
                            for i in range(3)))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("tar grep\n")
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({**TASK, "data": {"path": str(data), "format": "labeled"}}))
    blocker = tmp_path / "blocker"
    blocker.write_text("mine\n")
    from lmtailor.crypto import keygen

    keygen(tmp_path / "k.key")
    failures: list[str] = []
    for verb, (argv, _) in _output_verbs(str(tiny_model), data, docs, task).items():
        existing_folder = tmp_path / f"have-{verb.replace(' ', '-')}"
        existing_folder.mkdir()
        (existing_folder / "mine.txt").write_text("mine\n")
        existing_file = tmp_path / f"have-{verb.replace(' ', '-')}.txt"
        existing_file.write_text("mine\n")
        kinds = {"existing folder": existing_folder, "existing file": existing_file,
                 "under a file": blocker / "out", "the input's folder": docs, "the current folder": Path(".")}
        for kind, out in kinds.items():
            before = sorted(str(p) for p in tmp_path.rglob("*"))
            with case("outputs"):
                try:
                    code, err = run_cli([*argv, "--out", str(out)])
                except Exception as e:  # noqa: BLE001 - collected, reported together below
                    failures.append(f"{verb} --out {kind}: traceback {type(e).__name__}: {e}"[:300])
                    continue
            after = sorted(str(p) for p in tmp_path.rglob("*"))
            if code != 2 or err.count("\n") != 1 or not ("--out" in err or str(out) in err):
                failures.append(f"{verb} --out {kind}: rc {code}, {err.strip()[:200]}")
            if after != before:
                failures.append(f"{verb} --out {kind}: files changed: {sorted(set(after) ^ set(before))[:3]}")
            if (existing_folder / "mine.txt").read_text() != "mine\n" or existing_file.read_text() != "mine\n":
                failures.append(f"{verb} --out {kind}: an existing output was changed")
    assert blocker.read_text() == "mine\n"
    print(f"\noutput-path cases: {COUNTS['outputs']}, problems: {len(failures)}")
    assert not failures, "\n".join(failures[:40])


def test_metric_for_best_of_every_objective() -> None:
    from lmtailor.config import BEST_METRICS, OBJECTIVE_METRICS

    names = sorted({*BEST_METRICS, *(m for ms in OBJECTIVE_METRICS.values() for m in ms), "bogus", "Loss"})
    for objective, allowed in sorted(OBJECTIVE_METRICS.items()):
        for metric in names:
            with case("metric_for_best"):
                try:
                    assert load_config(None, [f"objective={objective}", f"metric_for_best={metric}"])
                    OUTCOMES["ok"] += 1
                    assert metric in allowed, (objective, metric)
                except ConfigError as e:
                    OUTCOMES["error"] += 1
                    assert metric not in allowed, (objective, metric, e.message)
                    assert "'metric_for_best'" in e.message and "\n" not in e.message
                    assert f"allowed values for {objective}: {', '.join(allowed)}" in (e.hint or ""), str(e)
