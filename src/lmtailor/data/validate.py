"""Load, validate, clean and split examples: the data stage from `data.path` to train/val lists.

`load_examples` reads every record and reports every bad one, by file, line and field, in one
`DataError`; `clean_examples` strips, drops empties and duplicates; `split_examples` holds out a
validation set that depends only on each example's content and the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from lmtailor.config import DataSettings
from lmtailor.data.example import Example
from lmtailor.data.formats import FieldError, convert_record, detect_format, get_format
from lmtailor.data.sources import read_records
from lmtailor.errors import DataError

CATALOG_PREFIX = "catalog:"


def _resolve(path: str) -> str:
    """A local path for `path`: `catalog:NAME` is fetched (lazily imported), anything else is kept."""
    if not path.startswith(CATALOG_PREFIX):
        return path
    from lmtailor.data.catalog import fetch

    return str(fetch(path[len(CATALOG_PREFIX):]))


class ExampleReader:
    """The examples of a data path, converted record by record, so the data never has to fit in memory.

    Each iteration reads the source again, in the same order. Bad records do not stop it: they are counted, and
    the iteration ends with one `DataError` listing them (as `load_examples` does), after the good examples.

    Args: as `load_examples`.
    """

    def __init__(self, path: str, fmt: str = "auto", split: str = "train", system_prompt: str | None = None,
                 max_problems_shown: int = 20) -> None:
        self.path, self.split, self.system_prompt = path, split, system_prompt
        self.max_problems_shown = max_problems_shown
        self.format: str | None = None if fmt == "auto" else get_format(fmt).name
        self.requested = fmt
        self._local: str | None = None

    @property
    def local(self) -> str:
        """The path records are read from (`catalog:NAME` fetched into the cache on first use)."""
        if self._local is None:
            self._local = _resolve(self.path)
        return self._local

    def __iter__(self) -> Iterator[Example]:
        problems: list[str] = []
        count = found = 0

        def bad(text: str) -> None:
            nonlocal count
            count += 1
            if len(problems) < self.max_problems_shown:
                problems.append(text)

        for record in read_records(self.local, self.split):
            if record.problem:
                bad(f"{record.source}: {record.problem}")
                continue
            if self.format is None:
                try:
                    self.format = detect_format(record.data)
                except DataError as e:
                    bad(f"{record.source}: {e.message}")
                    continue
            try:
                missing = sorted(get_format(self.format).fields - set(record.data))
                if missing:
                    raise FieldError(missing[0], "is missing" + _looks_like(record.data, self.format))
                example = convert_record(record.data, self.format, record.source, self.system_prompt)
            except FieldError as e:
                bad(f"{record.source}: {e.field}: {e.reason}")
                continue
            except DataError as e:  # a custom converter may raise the general error
                bad(f"{record.source}: {e.message}")
                continue
            found += 1
            yield example
        if count:
            raise DataError(f"{count} bad record(s) in {self.path}", hint="fix or remove them; first problems listed",
                            problems=problems, count=count)
        if not found:
            raise DataError(f"{self.path}: no records found")


def load_examples_with_format(path: str, fmt: str = "auto", split: str = "train", system_prompt: str | None = None,
                              max_problems_shown: int = 20) -> tuple[list[Example], str]:
    """Like `load_examples`, and also return the format name used (the detected one for "auto")."""
    reader = ExampleReader(path, fmt, split, system_prompt, max_problems_shown)
    examples = list(reader)
    return examples, reader.format or fmt


def _looks_like(record: dict[str, Any], fmt: str) -> str:
    try:
        other = detect_format(record)
    except DataError:
        return f" (records here are in the {fmt} format)"
    return f" (records here are in the {fmt} format; this one looks like {other})"


def load_examples(path: str, fmt: str = "auto", split: str = "train", system_prompt: str | None = None,
                  max_problems_shown: int = 20) -> list[Example]:
    """Read and convert every record of `path`, reporting all bad ones together.

    Args:
        path: a file, a folder, a hub dataset id, or `catalog:NAME`.
        fmt: a registered format name, or "auto" to detect it from the first good record;
            every record must then be in that format.
        split: split of a hub dataset.
        system_prompt: system message added to conversations that have none.
        max_problems_shown: how many problem lines the error keeps (its `count` has them all).

    Returns:
        The examples, in file order.

    Raises:
        DataError: a file cannot be read, or some records are bad: then `problems` holds
            "file:line: field: message" lines and `count` the number of bad records.
    """
    return load_examples_with_format(path, fmt, split, system_prompt, max_problems_shown)[0]


def content_key(example: Example) -> str:
    """A canonical string of an example's content (messages or text), ignoring source and meta."""
    if example.messages is not None:
        turns: list[list[Any]] = [[m["role"], m["content"], m.get("tool_calls", "")] for m in example.messages]
        turns.append(example.tools or [])
        # preference records: two pairs with one prompt and chosen answer but other rejected ones are different
        if "rejected" in example.meta:
            turns.append(["rejected", [[m["role"], m["content"]] for m in example.meta["rejected"]]])
        if "desirable" in example.meta:
            turns.append(["desirable", bool(example.meta["desirable"])])
        return json.dumps(turns, ensure_ascii=False)
    return json.dumps(example.text, ensure_ascii=False)


def strip_example(example: Example) -> Example | None:
    """The example with surrounding whitespace stripped, or None when it is empty (what `clean_examples` drops)."""
    example = _strip(example)
    return None if _is_empty(example) else example


def _strip(example: Example) -> Example:
    if example.messages is not None:
        messages = [{**m, "content": m["content"].strip()} for m in example.messages]
        return replace(example, messages=messages, meta=dict(example.meta))
    return replace(example, text=(example.text or "").strip(), meta=dict(example.meta))


def _is_empty(example: Example) -> bool:
    if example.messages is not None:
        # Nothing to learn when every assistant turn is empty.
        return not any(m["content"] or m.get("tool_calls") for m in example.messages if m["role"] == "assistant")
    return not example.text


def clean_examples(examples: list[Example], dedup: bool = True) -> tuple[list[Example], dict[str, int]]:
    """Strip surrounding whitespace, drop empty examples and (optionally) exact duplicates.

    The inputs are not modified. An example is empty when its text, or every assistant turn,
    is empty after stripping. Duplicates have the same messages or text; the first is kept.

    Returns:
        The kept examples, in order, and stats {"read", "kept", "duplicates", "empty"}.
    """
    kept: list[Example] = []
    seen: set[str] = set()
    empty = duplicates = 0
    for example in examples:
        example = _strip(example)
        if _is_empty(example):
            empty += 1
            continue
        if dedup:
            key = content_key(example)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        kept.append(example)
    return kept, {"read": len(examples), "kept": len(kept), "duplicates": duplicates, "empty": empty}


def split_rank(example: Example, seed: int) -> bytes:
    """The hash that orders examples for the validation split (the smallest are held out); equal content, equal rank."""
    # sha256, not hash(): the same on every machine and process, whatever PYTHONHASHSEED says.
    return hashlib.sha256(f"{seed}\0{content_key(example)}".encode("utf-8", "surrogatepass")).digest()


def val_count(n: int, val_fraction: float = 0.1, val_size: int | None = None) -> int:
    """How many of `n` examples `split_examples` holds out.

    Raises:
        DataError: `val_size` would leave no training examples.
    """
    if val_size is not None:
        if val_size >= n > 0:
            raise DataError(f"data.val_size is {val_size} but there are only {n} examples",
                            hint="lower data.val_size or give data.val_path")
        return val_size
    if val_fraction > 0 and n >= 2:
        return min(max(1, round(n * val_fraction)), n - 1)
    return 0


def split_examples(examples: list[Example], val_fraction: float = 0.1, val_size: int | None = None,
                   seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Hold out a validation set chosen by a hash of each example's content and the seed.

    The examples with the smallest hashes go to validation, so the split is the same in every
    process, and adding or removing one example moves at most one other across the split.

    Args:
        examples: the examples (deduplicated first, or copies can land on both sides).
        val_fraction: share held out; rounded, but at least one when above 0 and there are two or more.
        val_size: exact number held out; overrides `val_fraction`.
        seed: changes which examples are held out.

    Returns:
        (train, val), each in the original order.

    Raises:
        DataError: `val_size` would leave no training examples.
    """
    n = len(examples)
    n_val = val_count(n, val_fraction, val_size)
    ranked = sorted(range(n), key=lambda i: (split_rank(examples[i], seed), i))
    held = set(ranked[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


def load_datasets(cfg: DataSettings) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Load, clean and split the data a run config names.

    With `cfg.val_path` the validation set is read from there (and any training example equal to a
    validation one is dropped); otherwise it is split off `cfg.path`. `cfg.max_examples` caps the
    training set after splitting, so the validation set does not change with it.

    Returns:
        (train, val, stats): stats has "format", "read", "kept", "duplicates", "empty", "train",
        "val", and "val_overlap" (training examples dropped for being in the validation set).

    Raises:
        DataError: no path is set, a file is bad, or no training examples are left.
    """
    if not cfg.path:
        raise DataError("no training data: data.path is not set",
                        hint="set data.path to a file, a folder, a hub dataset id or catalog:NAME")
    raw, fmt = load_examples_with_format(cfg.path, cfg.format, cfg.split, cfg.system_prompt)
    examples, stats = clean_examples(raw)
    overlap = 0
    if cfg.val_path:
        val_raw = load_examples(cfg.val_path, cfg.format, cfg.split, cfg.system_prompt)
        val, _ = clean_examples(val_raw)
        val_keys = {content_key(e) for e in val}
        train = [e for e in examples if content_key(e) not in val_keys]
        overlap = len(examples) - len(train)
    else:
        train, val = split_examples(examples, cfg.val_fraction, cfg.val_size, cfg.split_seed)
    test_overlap = 0
    if cfg.test_path:  # a training example equal to a test one would leak the answer into the report
        test_keys = {content_key(e) for e in load_test_examples(cfg)}
        kept = [e for e in train if content_key(e) not in test_keys]
        test_overlap, train = len(train) - len(kept), kept
    if cfg.max_examples is not None:
        train = train[:cfg.max_examples]
    if not train:
        raise no_training_left(cfg.path, stats, len(val))
    return train, val, {"format": fmt, **stats, "train": len(train), "val": len(val), "val_overlap": overlap,
                        **({"test_overlap": test_overlap} if cfg.test_path else {})}


def load_test_examples(cfg: DataSettings) -> list[Example]:
    """The cleaned test examples of `cfg.test_path` (empty without one), read in the training data's format."""
    if not cfg.test_path:
        return []
    test, _ = clean_examples(load_examples(cfg.test_path, cfg.format, cfg.split, cfg.system_prompt))
    return test


def no_training_left(path: str, stats: dict[str, Any], n_val: int) -> DataError:
    return DataError(f"{path}: no training examples left after cleaning and splitting",
                     hint=f"read {stats['read']}, empty {stats['empty']}, duplicates {stats['duplicates']}, "
                          f"in validation {n_val}")
