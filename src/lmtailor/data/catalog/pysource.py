"""`python-docstrings`: a Python function's code (its docstring taken out) -> the docstring's first sentence, from
the standard library's sources in Debian's libpython3.11-stdlib.

The sources are parsed with `ast`, never imported or run.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

from lmtailor.data.catalog import download
from lmtailor.data.catalog.archives import deb_files
from lmtailor.data.catalog.registry import Record, register_dataset
from lmtailor.errors import DataError

STDLIB_PACKAGE = "libpython3.11-stdlib"
MAX_SOURCE_CHARS = 1200  # longer functions would be cut at the default max_length
SUMMARY_CHARS = (15, 150)  # a shorter first sentence says nothing ("Helper."), a longer one is a paragraph
_SOURCES = r"/usr/lib/python3\.\d+/(.+\.py)$"
# the test suites (their docstrings describe tests, not code), and anything installed by other packages
_SKIPPED = re.compile(r"(?:^|/)(?:test|tests|idle_test)/|^(?:site|dist)-packages/")
_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)")


def first_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line ("" for an empty docstring)."""
    paragraph = re.sub(r"\s+", " ", docstring.strip().split("\n\n", 1)[0]).strip()
    match = _SENTENCE.match(paragraph)
    return match.group(1) if match else paragraph


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included, in source order."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def code_and_summary(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, str] | None:
    """(the function's code without its docstring, dedented; the docstring's first sentence), or None when it has
    no docstring, nothing but its docstring (and `pass`/`...`) in its body, or a docstring on its `def` line."""
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:
        return None
    rest = node.body[1:]
    if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                       and s.value.value is Ellipsis) for s in rest):
        return None
    docnode = node.body[0]
    if docnode.lineno == node.lineno or docnode.end_lineno is None or node.end_lineno is None:
        return None
    lines = source.splitlines()
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    kept = lines[start - 1:docnode.lineno - 1] + lines[docnode.end_lineno:node.end_lineno]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    return code, first_sentence(doc)


def parse_python_docstrings(deb: Path, max_chars: int = MAX_SOURCE_CHARS) -> list[Record]:
    """(function code -> docstring's first sentence) pairs from every standard-library module in a .deb.

    Args:
        deb: a Debian package holding `usr/lib/python3.N/**/*.py` (libpython3.N-stdlib).
        max_chars: the longest code (without its docstring) kept.

    Returns:
        Records {"source", "target", "file", "function"}: file is the module's path under `python3.N/`, function
        its qualified name ("Class.method"). Test suites are left out; a function whose code an earlier one
        already gave is dropped, so that no source has two targets. Modules are in path order.

    Raises:
        DataError: the package holds no Python module with a documented function.
    """
    records: list[Record] = []
    seen: set[str] = set()
    for match, content in deb_files(deb, _SOURCES):
        path = match.group(1)
        if _SKIPPED.search(path):
            continue
        text = content.decode("utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):  # lib2to3's test data and other deliberately broken files
            continue
        for qualname, node in _functions(tree):
            pair = code_and_summary(text, node)
            if pair is None:
                continue
            code, summary = pair
            if len(code) > max_chars or not SUMMARY_CHARS[0] <= len(summary) <= SUMMARY_CHARS[1] or code in seen:
                continue
            seen.add(code)
            records.append({"source": code, "target": summary, "file": path, "function": qualname})
    if not records:
        raise DataError(f"{deb.name}: no Python module with a documented function under usr/lib/python3.N/",
                        f"is this a libpython3.N-stdlib package? ({STDLIB_PACKAGE} is)")
    return records


@register_dataset(
    "python-docstrings",
    description="2,499 functions of the Python 3.11 standard library: the code, its docstring taken out -> the "
                "docstring's first sentence; generation: code -> a one-line summary",
    format="paired", license="PSF-2.0 (Python standard library)",
    source=f"Debian package {STDLIB_PACKAGE} (3.11 in bookworm), usr/lib/python3.11/**/*.py without the tests")
def _python_docstrings(workdir: Path) -> list[Record]:
    return parse_python_docstrings(download.apt_download(STDLIB_PACKAGE, workdir))
