"""Every verb that writes an output (issue 17): an existing one is a one-line error unless --force, --force keeps
it as NAME.bak-<time>, nothing is deleted or moved that the verb did not create, and a folder appears whole or not
at all. Run through the real CLI (main, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtailor.cli import main
from lmtailor.io import atomic_dir
from lmtailor.outputs import staged_folder
from test_prompting import toy_task  # noqa: F401  (fixture: a task file with its data)


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path) -> None:
    """argv fails with one line naming --out, and `out` (holding a sentinel) is untouched."""
    sentinel = out / "mine.txt" if out.is_dir() else out
    before = sentinel.read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "already exists" in err and "--force" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sentinel.read_bytes() == before
    assert not [p for p in out.parent.iterdir() if ".bak-" in p.name or p.name.endswith(".tmp")]


def _backed_up(out: Path) -> Path:
    """The one backup of `out`, holding the sentinel; no staging folder left beside it."""
    (backup,) = [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".bak-")]
    assert (backup / "mine.txt" if backup.is_dir() else backup).read_text() == "mine\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    return backup


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "mine.txt").write_text("mine\n")
    return path


def _file(path: Path) -> Path:
    path.write_text("mine\n")
    return path


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# Archives\n\nExtract a tarball with tar -xzf archive.tar.gz in the folder.\n\n"
                                 "# Search\n\nFind text with grep -r pattern across every file; grep grep grep.\n")
    return folder


def test_every_output_verb_refuses_an_existing_output(tmp_path: Path, tiny_model: Path, toy_task: Path,  # noqa: F811
                                                      pairs_file: Path, docs: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = str(tiny_model)
    folder_verbs = {
        "prompt run": ["prompt", "run", str(toy_task), "--model", model],
        "prompt optimize": ["prompt", "optimize", str(toy_task), "--model", model],
        "compare": ["compare", str(toy_task), "zero-shot", "--model", model],
        "auto": ["auto", str(pairs_file), "--budget", "10m"],
        "kb build": ["kb", "build", str(docs), "--embedder", "none"],
        "export merged": ["export", model, "--format", "merged"],
        "tokenizer train": ["tokenizer", "train", "--corpus", str(docs)],
    }
    file_verbs = {
        "terms mine": ["terms", "mine", str(docs), "--tokenizer", model],
        "pairs make": ["pairs", "make", model, "--data", str(pairs_file)],
        "score": ["score", model, "--data", str(pairs_file)],
        "eval": ["eval", model, "--data", str(pairs_file), "--generate", "0"],
        "privacy scrub": ["privacy", "scrub", str(pairs_file)],
        "privacy plant": ["privacy", "plant", str(pairs_file)],
    }
    for name, argv in folder_verbs.items():
        out = _folder(tmp_path / f"out-{name.replace(' ', '-')}")
        _refused(capsys, [*argv, "--out", str(out)], out)
    for name, argv in file_verbs.items():
        out = _file(tmp_path / f"out-{name.replace(' ', '-')}.jsonl")
        _refused(capsys, [*argv, "--out", str(out)], out)


def test_default_output_folders_are_refused_too(tmp_path: Path, tiny_model: Path, toy_task: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for argv, default in ((["prompt", "optimize", str(toy_task), "--model", str(tiny_model)], "toy-prompt-search"),
                          (["compare", str(toy_task), "zero-shot", "--model", str(tiny_model)], "toy-compare")):
        out = _folder(tmp_path / "runs" / default)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--out runs/{default} already exists" in err, err
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_force_keeps_a_backup_and_writes_whole_folders(tmp_path: Path, tiny_model: Path, toy_task: Path,  # noqa: F811
                                                       pairs_file: Path, docs: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = str(tiny_model)

    out = _folder(tmp_path / "pr")
    assert main(["prompt", "run", str(toy_task), "--model", model, "--limit", "4", "--out", str(out),
                 "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl"]
    assert json.loads((out / "metrics.json").read_text())["examples"] == 4
    _backed_up(out)

    out = _folder(tmp_path / "cmp")
    assert main(["compare", str(toy_task), "zero-shot", "--model", model, "--limit", "4", "--out", str(out),
                 "--force"]) == 0
    assert (out / "compare.json").is_file() and not (out / "mine.txt").exists()
    _backed_up(out)

    out = _folder(tmp_path / "kb")
    assert main(["kb", "build", str(docs), "--embedder", "none", "--out", str(out), "--force"]) == 0
    assert (out / "manifest.json").is_file()
    _backed_up(out)
    assert main(["kb", "add", str(out), str(pairs_file)]) == 0  # an update in place is not a new output
    assert (out / "manifest.json").is_file() and len([p for p in tmp_path.iterdir() if ".bak-" in p.name]) == 3

    out = _file(tmp_path / "terms.txt")
    assert main(["terms", "mine", str(docs), "--tokenizer", model, "--min-count", "1", "--out", str(out),
                 "--force"]) == 0
    assert out.read_text() != "mine\n"
    _backed_up(out)

    out = _file(tmp_path / "made.jsonl")
    assert main(["pairs", "make", model, "--data", str(pairs_file), "--max-new-tokens", "2", "--limit", "3",
                 "--out", str(out), "--force", "--no-progress"]) == 0
    _backed_up(out)


def test_auto_force_moves_nothing_when_it_fails_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    out = _folder(tmp_path / "auto-out")
    assert main(["auto", str(few), "--budget", "10m", "--out", str(out), "--force"]) == 2
    assert "too few" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if ".bak-" in p.name]


def test_outputs_under_a_file_or_in_the_input_are_one_line_errors(tmp_path: Path, tiny_model: Path, docs: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _file(tmp_path / "blocker")
    for argv in (["kb", "build", str(docs), "--embedder", "none", "--out", str(blocker / "kb")],
                 ["terms", "mine", str(docs), "--tokenizer", str(tiny_model), "--out", str(blocker / "t.txt")],
                 ["privacy", "keygen", "--out", str(blocker / "k.key")],
                 ["kb", "build", str(docs), "--embedder", "none", "--out", str(docs), "--force"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert blocker.read_text() == "mine\n" and (docs / "a.md").is_file()


def test_staged_folder_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(out) as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    old = _folder(tmp_path / "old")
    with pytest.raises(RuntimeError), staged_folder(old, force=True) as tmp:
        raise RuntimeError("no")
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "mine.txt").is_file()


def test_atomic_dir_removes_no_file_of_the_user(tmp_path: Path) -> None:
    """It used to delete a `.NAME.old` it found beside the folder."""
    hidden = _folder(tmp_path / ".kb.old")
    with atomic_dir(tmp_path / "kb") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "kb") as tmp:
        (tmp / "a").write_text("2")
    assert (hidden / "mine.txt").read_text() == "mine\n" and (tmp_path / "kb/a").read_text() == "2"
