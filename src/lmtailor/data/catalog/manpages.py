"""`man-summaries`: a man page's first DESCRIPTION paragraph -> its NAME line's summary, from Debian's man pages.

The pages are roff source (man(7) macros); `roff_to_text` renders the few requests and escapes that carry text
and drops the rest (fonts, spacing, indentation), which is enough for running prose.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmtailor.data.catalog import download
from lmtailor.data.catalog.archives import deb_files
from lmtailor.data.catalog.registry import Record, register_dataset
from lmtailor.errors import DataError

MAN_PACKAGES = ("manpages", "manpages-dev")
MIN_SOURCE_CHARS = 40  # a shorter first paragraph ("The fields are:") says too little to summarise
_PAGE = r"/usr/share/man/man(\d)/([^/]+)\.\d\w*(?:\.gz)?$"
# Opening paragraphs that describe nothing: a notice ("Note: this page describes the raw system call ...") or a
# pointer ("For an overview of namespaces, see namespaces(7)."); the next paragraph is taken instead. So is a
# short lead-in to a table or a formula ("The fields are:").
_NOT_A_DESCRIPTION = re.compile(r"(?:note\b|for an overview\b|see\b)", re.IGNORECASE)
_LICENSE = re.compile(r"SPDX-License-Identifier:\s*(\S.*?)\s*$|%%%LICENSE_START\(([^)]*)\)", re.MULTILINE)

_NAMED = {"aq": "'", "dq": '"', "em": "\u2014", "en": "\u2013", "bu": "\u2022", "co": "\u00a9", "rs": "\\",
          "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "ga": "`", "ti": "~", "ha": "^",
          "mu": "\u00d7", "pl": "+", "mi": "-", "hy": "-", "**": "*", ">=": "\u2265", "<=": "\u2264",
          "ne": "\u2260", "->": "\u2192", "<-": "\u2190", "Tm": "\u2122", "rg": "\u00ae", "de": "\u00b0"}
_SIMPLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`", ".": "."}
# \(xx, \[name], \*(xx, \*[name], \*x, \f(xx, \f[name], \fX, \s+N, then any one-character escape.
_ESCAPE = re.compile(r"\\(?:\((..)|\[([^\]]*)\]|\*(?:\((..)|\[([^\]]*)\]|(.))|f(?:\(..|\[[^\]]*\]|.)|s[-+]?\d+|(.))")
_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_BREAKS = {"PP", "P", "LP", "TP", "IP", "HP", "SH", "SS", "sp", "TQ"}
_SKIPPED_BLOCKS = {"de": "..", "de1": "..", "am": "..", "ig": "..", "TS": ".TE"}  # macro bodies, tables: no prose
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}  # arguments set in alternating fonts, written without spaces


def _unescape(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        named = m.group(1) or m.group(2) or m.group(3) or m.group(4)
        if named is not None:
            return _NAMED.get(named, "")
        if m.group(5) is not None:  # \*x: a one-letter string such as \*R
            return ""
        return _SIMPLE.get(m.group(6), "") if m.group(6) is not None else ""  # fonts and sizes print nothing

    return _ESCAPE.sub(sub, text)


def roff_to_text(source: str) -> list[tuple[str, list[str]]]:
    """Sections of a man page as (TITLE, paragraphs of plain text), in page order.

    Text lines and the font requests (.B, .I, .BR, ...) give text; .PP, .TP, .IP, .SS and the like end a
    paragraph; comments, macro definitions, tables and all other requests are dropped.
    """
    source = re.sub(r"(?<!\\)\\\n", "", source)  # a backslash at the end of a line continues it
    sections: list[tuple[str, list[str]]] = []
    words: list[str] = []

    def end_paragraph() -> None:
        text = re.sub(r"\s+", " ", " ".join(words)).strip()
        if text and sections:
            sections[-1][1].append(text)
        words.clear()

    skip_until = ""
    for line in source.splitlines():
        if skip_until:  # inside a macro definition or a table
            skip_until = "" if line.strip() == skip_until else skip_until
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].strip().partition(" ")
            if request.startswith(('\\"', "\\#")) or request == "":
                continue
            if request in _SKIPPED_BLOCKS:
                skip_until = _SKIPPED_BLOCKS[request]
                continue
            args = [(q.replace('""', '"') if q is not None and b == "" else b) for q, b in _ARG.findall(rest)]
            if request in _BREAKS:
                end_paragraph()
                if request == "SH":
                    sections.append((_unescape(" ".join(args)).strip().upper(), []))
                elif request == "SS" and args:
                    words.append(_unescape(" ".join(args)) + ":")
                    end_paragraph()
            elif request in {"B", "I", "SB", "SM"}:
                words.append(_unescape(" ".join(args)))
            elif request in _ALTERNATING:
                words.append(_unescape("".join(args)))
        else:
            words.append(_unescape(line))
    end_paragraph()
    return sections


def parse_man_page(source: str) -> tuple[str, str, str] | None:
    """(names, summary, first DESCRIPTION paragraph) of one page, or None for a page that lacks one of them.

    The NAME section reads "open, openat, creat \\- open and possibly create a file": the names before the dash,
    the summary after it. Pages that only include another (`.so man3/foo.3`) have no sections and give None.
    """
    sections = dict(reversed(roff_to_text(source)))  # the first section of a title wins
    name = " ".join(sections.get("NAME", []))
    names, dash, summary = name.partition(" - ")
    description = next((p for p in sections.get("DESCRIPTION", []) if not _NOT_A_DESCRIPTION.match(p)
                        and (len(p) > 80 or not p.endswith(":"))), "")
    if not (dash and names.strip() and summary.strip() and len(description) >= MIN_SOURCE_CHARS):
        return None
    return names.strip(), summary.strip(), description


def parse_man_summaries(debs: list[Path]) -> list[Record]:
    """(first DESCRIPTION paragraph -> NAME summary) pairs from every man page in some Debian packages.

    Args:
        debs: Debian package files holding `usr/share/man/manN/*.N.gz` pages.

    Returns:
        Records {"source", "target", "page", "section", "license"}: page is e.g. "open.2", license the page's
        SPDX-License-Identifier (or its older `%%%LICENSE_START(...)` tag; "" where it states neither). Pages
        are in package, then path, order; a page whose source paragraph an earlier page already gave (the four
        "overview of Linux ... namespaces" pages) is dropped, so that no source has two targets.

    Raises:
        DataError: a package cannot be read or holds no man page with a NAME and a DESCRIPTION.
    """
    records: list[Record] = []
    seen: set[str] = set()
    for deb in debs:
        for match, content in deb_files(deb, _PAGE):
            text = content.decode("utf-8", errors="replace")
            parsed = parse_man_page(text)
            if parsed is None:
                continue
            _, summary, description = parsed
            if description in seen:
                continue
            seen.add(description)
            license = _LICENSE.search(text)
            records.append({"source": description, "target": summary,
                            "page": f"{match.group(2)}.{match.group(1)}", "section": match.group(1),
                            "license": (license.group(1) or license.group(2)) if license else ""})
    if not records:
        raise DataError(f"{', '.join(d.name for d in debs)}: no man page with a NAME and a DESCRIPTION",
                        "are these man page packages?")
    return records


@register_dataset(
    "man-summaries",
    description="1,081 Linux man pages (system calls, C library, files, overviews): first DESCRIPTION paragraph -> "
                "the NAME line's one-line summary; generation: a paragraph -> a short summary",
    format="paired",
    license="Linux man-pages licenses, per page (mostly Linux-man-pages-copyleft); each record's license field",
    source="Debian packages manpages and manpages-dev (6.03-2 in bookworm), usr/share/man/man*/*.gz")
def _man_summaries(workdir: Path) -> list[Record]:
    return parse_man_summaries([download.apt_download(pkg, workdir) for pkg in MAN_PACKAGES])
