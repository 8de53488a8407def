"""Datasets from the Python documentation in Debian's python3.11-doc: `python-docs` (text), `python-docs-sections`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lmtailor.data.catalog import download
from lmtailor.data.catalog.archives import deb_files
from lmtailor.data.catalog.registry import Record, register_dataset
from lmtailor.errors import DataError

PYTHON_DOC_PACKAGE = "python3.11-doc"
_SOURCES = r"/html/_sources/(.+\.rst)\.txt$"
MIN_SECTION_PAGES = 5  # smaller sections (install, installing, distributing, includes) are too few to learn from


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
    for match, content in deb_files(deb, _SOURCES):
        text = content.decode("utf-8", errors="replace")
        if text.strip():
            records.append({"text": text, "file": match.group(1)})
    if not records:
        raise DataError(f"{deb.name}: no html/_sources/*.rst.txt files", "is this a pythonX.Y-doc package?")
    return records


def parse_python_doc_sections(deb: Path, min_pages: int = MIN_SECTION_PAGES) -> list[Record]:
    """Documentation pages labeled by the section of the docs they belong to (`library/json.rst` -> "library").

    The section is the page's top folder under `_sources/`. Pages at the top level (about, glossary, license,
    ...) belong to no section and are left out, and so are sections with fewer than `min_pages` pages.

    Args:
        deb: the pythonX.Y-doc Debian package file.
        min_pages: the fewest pages a section needs to be kept.

    Returns:
        Records {"text", "label", "file"}, in path order.

    Raises:
        DataError: the package cannot be read or holds no `_sources/` files.
    """
    pages = [{**r, "label": r["file"].split("/", 1)[0]} for r in parse_python_docs(deb) if "/" in r["file"]]
    sizes = Counter(r["label"] for r in pages)
    return [{"text": r["text"], "label": r["label"], "file": r["file"]} for r in pages
            if sizes[r["label"]] >= min_pages]


@register_dataset(
    "python-docs",
    description="the Python 3.11 documentation, one reStructuredText page per record (~11 MB of text)",
    format="text", license="PSF-2.0 (Python documentation)",
    source=f"Debian package {PYTHON_DOC_PACKAGE}, usr/share/doc/python3.11/html/_sources/**/*.rst.txt")
def _python_docs(workdir: Path) -> list[Record]:
    return parse_python_docs(download.apt_download(PYTHON_DOC_PACKAGE, workdir))


@register_dataset(
    "python-docs-sections",
    description="487 pages of the Python 3.11 documentation labeled by section (library, c-api, whatsnew, howto, "
                "...); classification: long documents (median ~10k characters), 10 labels, skewed (library 65%)",
    format="labeled", license="PSF-2.0 (Python documentation)",
    source=f"Debian package {PYTHON_DOC_PACKAGE}, usr/share/doc/python3.11/html/_sources/SECTION/**/*.rst.txt")
def _python_docs_sections(workdir: Path) -> list[Record]:
    return parse_python_doc_sections(download.apt_download(PYTHON_DOC_PACKAGE, workdir))
