"""Read raw records from files, folders and hub datasets, remembering the file and line of each.

Every reader yields `Record`s. A record that cannot be parsed (a JSONL line that is not JSON) is
yielded with `problem` set instead of raising, so the validator can report every bad line at once.
Problems with a whole file (missing, empty, not UTF-8) raise `DataError` when the reader reaches them.
JSON Lines, CSV/TSV and Parquet files are read record by record, so a file may be larger than memory;
a .json file is parsed whole and a text file is one record.

An encrypted file (`lmtailor privacy encrypt`, found by its magic bytes) is read the same way, decrypted on the
fly in memory with the key of `crypto.active_keys()`; its plaintext never touches the disk. Its format is that
of its inner name: `train.jsonl.enc` is JSON Lines. (An encrypted Parquet file is decrypted whole into memory,
because Parquet is read from the end.)
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmtailor import crypto
from lmtailor.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
SUPPORTED_SUFFIXES = JSONL_SUFFIXES | TEXT_SUFFIXES | {".json", ".csv", ".tsv", ".parquet"}
# Suffixes that mean "this was meant as a file", even though we cannot read them.
_FILE_LIKE_SUFFIXES = SUPPORTED_SUFFIXES | {".gz", ".zip", ".bz2", ".xz", ".zst", ".tar", ".xlsx", ".xls",
                                            ".xml", ".yaml", ".yml", ".arrow", ".html", ".pdf", crypto.SUFFIX}
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_BOM = b"\xef\xbb\xbf"
# The largest JSON Lines record read (characters of its line). Work on a record is bounded by max_length (see
# render.clip_text), so a record of this size costs about its own size in memory; past it, it is a problem record.
MAX_RECORD_CHARS = 32 * 2**20
# A JSON escape of a UTF-16 surrogate: a lone one ("\ud800") decodes to a str that is not Unicode text and
# fails much later (tokenizing, writing); pairs decode to one character and are fine.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_HINT_LOCAL = "point data.path at a local file (.jsonl, .json, .csv, .tsv, .parquet, .txt) or a folder of them"
_CONTAINER_KEYS = ("data", "train", "examples", "records", "rows", "items")
# A top-level object whose only list is one of these is a single chat record, not a container.
_RECORD_LIST_KEYS = {"messages", "conversations"}


@dataclass
class Record:
    """One raw record and where it came from.

    `problem` is set (and `data` empty) when the record could not be parsed at all.
    """

    data: dict[str, Any]
    file: str
    line: int
    problem: str | None = None

    @property
    def source(self) -> str:
        """`file:line`, the prefix of every message about this record."""
        return f"{self.file}:{self.line}"


def read_records(path: str, split: str = "train") -> Iterator[Record]:
    """Yield the records of a file, a folder of files, or a Hugging Face hub dataset.

    Args:
        path: a .jsonl/.json/.csv/.tsv/.parquet/.txt/.md/.rst file, a folder (read recursively,
            sorted, hidden files skipped), or a hub dataset id such as `tatsu-lab/alpaca`.
        split: the split to read from a hub dataset; ignored for local files.

    Yields:
        One `Record` per example, with the file and the (physical) line it starts on.

    Raises:
        DataError: the path is missing, a file is empty, not UTF-8, of an unknown type or not
            parseable as a whole, or the hub dataset cannot be reached.
    """
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        files = _folder_files(local)
        if not files:
            raise DataError(f"{path}: no data files in this folder",
                            hint="supported types: " + ", ".join(sorted(SUPPORTED_SUFFIXES)))
        for file in files:
            yield from _read_file(file)
    elif local.is_file():
        yield from _read_file(local)
    elif _looks_like_file(path):
        raise _not_found(path, local)
    else:
        yield from _read_hub(path, split)


def local_files(path: str) -> list[Path] | None:
    """The files `read_records(path)` reads, in order, or None when `path` names a hub dataset."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        return _folder_files(local)
    if local.is_file():
        return [local]
    if _looks_like_file(path):
        raise _not_found(path, local)
    return None


def _folder_files(root: Path) -> list[Path]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not p.is_file():
            continue
        if _suffix(p) in SUPPORTED_SUFFIXES:
            files.append(p)
    return sorted(files)


def _looks_like_file(path: str) -> bool:
    suffix = Path(path).suffix.lower()
    if path.startswith(("/", ".", "~")) or "\\" in path or not _HUB_ID.match(path):
        return True
    return suffix in _FILE_LIKE_SUFFIXES or (suffix != "" and "/" not in path)


def _not_found(path: str, local: Path) -> DataError:
    hint = "check the path; data.path takes a file, a folder, a hub dataset id or catalog:NAME"
    parent = local.parent if str(local.parent) else Path(".")
    if parent.is_dir():
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
        close = difflib.get_close_matches(local.name, names, n=1)
        if close:
            hint = f"did you mean {parent / close[0]}?"
    return DataError(f"{path}: file not found", hint=hint)


def _suffix(file: Path) -> str:
    """The suffix that names the format: that of the inner name for an encrypted `x.jsonl.enc`."""
    return Path(crypto.inner_name(file)).suffix.lower()


def _read_file(file: Path) -> Iterator[Record]:
    suffix = _suffix(file)
    if suffix == ".parquet":
        yield from _read_parquet(file)
        return
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{file}: unsupported file type '{suffix or '(none)'}'",
                        hint="supported types: " + ", ".join(sorted(SUPPORTED_SUFFIXES)))
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl_file(file)
        return
    if suffix in (".csv", ".tsv"):
        yield from _read_csv_file(file, "\t" if suffix == ".tsv" else ",")
        return
    text = _read_text(file)
    if suffix == ".json":
        yield from _read_json(file, text)
    else:
        yield Record({"text": text}, str(file), 1)


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line split on "\n" only, decoded one at a time (a leading BOM dropped).

    Raises:
        DataError: the file cannot be read, or a line is not UTF-8 (its byte offset counts the BOM).
    """
    try:
        f = crypto.open_bytes(file)  # closed by the with below; open errors need their own message
    except OSError as e:
        raise DataError(f"{file}: cannot be read ({e.strerror or e})") from None
    offset = 0
    with f:
        for number, raw in enumerate(f, start=1):
            skip = len(_BOM) if number == 1 and raw.startswith(_BOM) else 0
            try:
                line = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}: not UTF-8 text (byte offset {offset + skip + e.start}, line {number})",
                                hint="save the file as UTF-8") from None
            offset += len(raw)
            yield number, line.removesuffix("\n")


def _read_jsonl_file(file: Path) -> Iterator[Record]:
    """Records of a JSON Lines file, one line in memory at a time."""
    lines = _lines(file)
    seen = False
    for number, line in lines:
        if not line.strip():
            continue
        if not seen and line.lstrip().startswith("["):
            # A pretty-printed JSON list saved as .jsonl is common enough to accept (it is read whole).
            text = _read_text(file)
            try:
                if isinstance(json.loads(text), list):
                    yield from _read_json(file, text)
                    return
            except (ValueError, RecursionError):
                pass
        seen = True
        if len(line) > MAX_RECORD_CHARS:
            yield Record({}, str(file), number, f"the record is {len(line) / 2**20:.0f} Mi characters; the maximum "
                         f"record size is {MAX_RECORD_CHARS // 2**20} Mi characters (split it into several records)")
            continue
        yield from _jsonl_record(file, number, line)
    if not seen:
        raise DataError(f"{file}: file is empty", hint="add records or remove the file")


def _read_text(file: Path) -> str:
    """The file as text: UTF-8, a leading BOM dropped; DataError if empty or not UTF-8."""
    try:
        raw = crypto.read_bytes(file)
    except OSError as e:
        raise DataError(f"{file}: cannot be read ({e.strerror or e})") from None
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + skip
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{file}: not UTF-8 text (byte offset {offset}, line {line})",
                        hint="save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{file}: file is empty", hint="add records or remove the file")
    return text


def _json_problem(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at column {e.colno})"
    return f"not valid JSON ({e})"


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages: 'a string', 'a list', 'null'."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _read_jsonl(file: Path, text: str) -> Iterator[Record]:
    # Split on "\n" only: str.splitlines() also breaks on U+2028 etc., which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield from _jsonl_record(file, number, line)


def _jsonl_record(file: Path, number: int, line: str) -> Iterator[Record]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as e:
        problem = _json_problem(e) if isinstance(e, ValueError) else "not valid JSON (nested too deeply)"
        yield Record({}, str(file), number, problem)
        return
    if isinstance(value, dict):
        yield _checked(value, str(file), number, _SURROGATE_ESCAPE.search(line) is not None)
    else:
        yield Record({}, str(file), number, f"not a JSON object (got {json_kind(value)})")


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The dotted field path of the first string holding a lone surrogate in `value`, or None."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path or "(value)"
        elif isinstance(item, dict):
            for k, v in item.items():
                name = f"{path}.{k}" if path else str(k)
                if _SURROGATE.search(str(k)):
                    return name
                stack.append((v, name))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _checked(value: dict[str, Any], file: str, line: int, escapes: bool) -> Record:
    """A record, or a problem record when a string of it holds a lone surrogate (only looked for where the
    text holds a surrogate escape, so ordinary records cost nothing)."""
    field = _lone_surrogate(value) if escapes else None
    if field is None:
        return Record(value, file, line)
    return Record({}, file, line, f"{field}: holds a lone UTF-16 surrogate escape (like \\ud800), which is not "
                  "text; remove it or write the character whole")


def _read_json(file: Path, text: str) -> Iterator[Record]:
    start = _skip_ws(text, 0)
    items = None
    if text.startswith("[", start):
        # The usual case, a list of records: scanning item by item parses and validates in one pass.
        try:
            items, end = _array_items(text, start)
            if _skip_ws(text, end) != len(text):
                items = None  # more after the list; json.loads below names the problem
        except (ValueError, IndexError, RecursionError):
            items = None
    if items is None:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":
                # Several objects one after another: the file is really JSON Lines.
                yield from _read_jsonl(file, text)
                return
            raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            why = e if isinstance(e, ValueError) else "nested too deeply"
            raise DataError(f"{file}: not valid JSON ({why})") from None
        if isinstance(doc, dict):
            key = _container_key(doc, file)
            if key is None:
                yield _checked(doc, str(file), text.count("\n", 0, start) + 1,
                               _SURROGATE_ESCAPE.search(text) is not None)
                return
            start = _find_key_value(text, key)
        elif not isinstance(doc, list):
            raise DataError(f"{file}: expected a list of objects, or an object holding one "
                            f"(like {{\"data\": [...]}}); got {json_kind(doc)}")
        items, _ = _array_items(text, start)
    if not items:
        raise DataError(f"{file}: file is empty (the list holds no records)", hint="add records or remove the file")
    line, last = 1, 0
    escapes = _SURROGATE_ESCAPE.search(text) is not None
    for index, (offset, value) in enumerate(items):
        line += text.count("\n", last, offset)  # offsets only grow: count the newlines since the last item
        last = offset
        if isinstance(value, dict):
            yield _checked(value, str(file), line, escapes)
        else:
            yield Record({}, str(file), line, f"item {index + 1} is not a JSON object (got {json_kind(value)})")


def _container_key(doc: dict[str, Any], file: Path) -> str | None:
    """The key of the list of records in a top-level JSON object, or None if the object is one record."""
    lists = [k for k, v in doc.items() if isinstance(v, list)]
    for key in _CONTAINER_KEYS:
        if key in lists:
            return key
    if len(lists) == 1 and lists[0] not in _RECORD_LIST_KEYS:
        return lists[0]
    if len(lists) > 1 and not set(lists) & _RECORD_LIST_KEYS:
        raise DataError(f"{file}: cannot tell which list holds the records: {', '.join(lists)}",
                        hint="keep one list of records, or save them as JSON Lines")
    return None


def _skip_ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _array_items(text: str, pos: int) -> tuple[list[tuple[int, Any]], int]:
    """(offset, value) of each item of the JSON array at text[pos], and the offset just past it.

    Raises:
        ValueError, IndexError: the array is not valid JSON.
    """
    decoder = json.JSONDecoder()
    items: list[tuple[int, Any]] = []
    pos = _skip_ws(text, pos + 1)  # past "["
    if text[pos] == "]":
        return items, pos + 1
    while True:
        value, end = decoder.raw_decode(text, pos)
        items.append((pos, value))
        pos = _skip_ws(text, end)
        if text[pos] == "]":
            return items, pos + 1
        if text[pos] != ",":
            raise ValueError(f"expected ',' or ']' at offset {pos}")
        pos = _skip_ws(text, pos + 1)


def _find_key_value(text: str, key: str) -> int:
    """Offset of the value of top-level `key` in a valid JSON object (the first occurrence)."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, _skip_ws(text, 0) + 1)  # past "{"
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ":"
        if name == key:
            return pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    raise AssertionError(f"key {key!r} not found in a JSON object that holds it")


def _read_csv_file(file: Path, delimiter: str) -> Iterator[Record]:
    """Records of a CSV/TSV file, read row by row."""
    try:
        f = crypto.open_text(file, encoding="utf-8-sig", newline="")  # closed by the with below
    except OSError as e:
        raise DataError(f"{file}: cannot be read ({e.strerror or e})") from None
    with f:
        try:
            yield from _read_csv(file, f, delimiter)
        except UnicodeDecodeError:
            for _ in _lines(file):  # raises the DataError that names the byte offset and line
                pass
            raise


def _read_csv(file: Path, text: str | Iterable[str], delimiter: str) -> Iterator[Record]:
    lines = io.StringIO(text, newline="") if isinstance(text, str) else text
    reader = csv.reader(lines, delimiter=delimiter)
    name = "TSV" if delimiter == "\t" else "CSV"
    header: list[str] | None = None
    last_line = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{file}:{reader.line_num}: not valid {name} ({e})") from None
        start, last_line = last_line + 1, reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            blank = [i + 1 for i, h in enumerate(header) if not h]
            if blank:
                raise DataError(f"{file}:{start}: header column {blank[0]} has no name",
                                hint=f"the first row of a {name} file names the fields")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"{file}:{start}: header names a column twice: {', '.join(dupes)}")
            continue
        if len(row) != len(header):
            yield Record({}, str(file), start, f"has {len(row)} fields, the header has {len(header)}")
            continue
        yield Record(dict(zip(header, row, strict=True)), str(file), start)
    if header is None:
        raise DataError(f"{file}: file is empty", hint="add records or remove the file")


def _read_parquet(file: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading Parquet files needs pyarrow", hint="pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(io.BytesIO(crypto.read_bytes(file)) if crypto.is_encrypted(file) else file)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{file}: not a valid Parquet file ({e})") from None
    if pf.metadata.num_rows == 0:
        raise DataError(f"{file}: file is empty", hint="add records or remove the file")
    line = 0
    batches = pf.iter_batches()
    while True:
        try:  # a page is decoded only here: a valid footer says nothing about the pages
            batch = next(batches)
            rows = batch.to_pylist()
        except StopIteration:
            return
        except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ... for a damaged page
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{file}: damaged Parquet data after row {line} ({detail[:200]})",
                            hint="re-export the file; its footer is intact but a data page is not") from None
        for row in rows:
            line += 1
            yield Record(row, str(file), line)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connect within `timeout` (a thread bounds slow DNS too)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connect cannot; let the real request decide
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def _hub_offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unreachable(path: str, offline_mode: bool, detail: str = "") -> DataError:
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline_mode else \
        "the machine may be offline"
    hint = _HINT_LOCAL + ", e.g. data.path=train.jsonl"
    if not offline_mode:
        hint += "; to use a copy already in the cache, set HF_HUB_OFFLINE=1"
    return DataError(f"{path}: no local file or folder has this name, and the hub dataset could not be reached "
                     f"({why}){detail}", hint=hint)


def _read_hub(path: str, split: str) -> Iterator[Record]:
    """Rows of a hub dataset; fails fast with a clear DataError when the hub cannot be reached."""
    offline = _hub_offline_mode()
    if not offline and not _hub_reachable():
        raise _unreachable(path, offline)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading hub datasets needs the `datasets` package",
                        hint="pip install datasets, or " + _HINT_LOCAL) from None
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # datasets raises many types; every one means "could not load"
        text = str(e).split("\n")[0][:300]
        if "split" in text.lower() and "unknown" in text.lower():
            raise DataError(f"{path}: the dataset has no split '{split}' ({text})",
                            hint="set data.split to one of the dataset's splits") from None
        if type(e).__name__ == "DatasetNotFoundError" and not offline:
            raise DataError(f"{path}: dataset not found on the hub, and no local file has that name",
                            hint="check the id, or " + _HINT_LOCAL) from None
        raise _unreachable(path, offline, f": {text}") from None
    if len(ds) == 0:
        raise DataError(f"{path}[{split}]: the dataset split is empty")
    for index, row in enumerate(ds):
        yield Record(dict(row), f"{path}[{split}]", index + 1)
