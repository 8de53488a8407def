"""Documents -> chunks: split by structure (Markdown / reStructuredText headings, then paragraphs), packed up to a
token limit, long paragraphs cut into overlapping token windows; every chunk keeps its source, heading and lines.

Tokens are those of the knowledge base's embedder (so a chunk fits the embedder's window), or whitespace-separated
words for a BM25-only base. Identical chunks (whitespace and case aside) are kept once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmtailor.errors import ConfigError

# (start, end) character offsets of the tokens of a text
Offsets = Callable[[str], list[tuple[int, int]]]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".markdown")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")


@dataclass(frozen=True)
class Document:
    """One text to chunk, and where it came from (a path, or `file:line` of a data record)."""

    text: str
    source: str
    first_line: int = 1  # line number of the text's first line in its source


@dataclass(frozen=True)
class Chunk:
    """A passage of the knowledge base. `start_line`..`end_line` (1-based, inclusive) locate it in `source`."""

    id: str
    text: str
    source: str
    heading: str
    start_line: int
    end_line: int
    n_tokens: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lines(self) -> str:
        return f"{self.start_line}-{self.end_line}" if self.end_line != self.start_line else str(self.start_line)


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words as tokens (the chunking unit of a BM25-only knowledge base)."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def chunk_key(text: str) -> str:
    """Identity of a chunk's content: whitespace and case do not make two chunks different."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()[:16]


def read_documents(path: str) -> Iterator[Document]:
    """The documents of a text file, a folder (text files read whole, data files record by record) or any data path
    (`catalog:NAME`, .jsonl, ...: each record's text, or its conversation's turns joined, is one document).

    Raises:
        ConfigError: the path names nothing readable.
    """
    from lmtailor import crypto

    local = Path(path).expanduser()
    files = (sorted(p for p in local.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(local).parts)) if local.is_dir() else [local]
        if local.is_file() else [])
    if local.exists() and not files:
        raise ConfigError(f"{path}: no files in this folder", "give text files (.md, .rst, .txt) or data files")
    text_files = [f for f in files if _stem_suffix(f) in TEXT_SUFFIXES]
    for f in text_files:
        yield Document(crypto.read_bytes(f).decode("utf-8", errors="replace"), str(f))
    others = [f for f in files if f not in text_files] if files else None
    for data_path in ([str(f) for f in others] if others is not None else [path]):
        yield from _record_documents(data_path)


def _stem_suffix(f: Path) -> str:
    name = f.name[:-len(".enc")] if f.name.endswith(".enc") else f.name
    return Path(name).suffix.lower()


def _record_documents(path: str) -> Iterator[Document]:
    from lmtailor.data.sources import SUPPORTED_SUFFIXES
    from lmtailor.data.validate import load_examples

    if Path(path).is_file() and _stem_suffix(Path(path)) not in SUPPORTED_SUFFIXES:
        return  # images, archives and the like beside the documents
    for ex in load_examples(path):
        text = ex.text if ex.text is not None else "\n\n".join(m["content"] for m in ex.messages or [])
        source = str(ex.meta.get("file") or ex.source)
        if text.strip():
            yield Document(text, source)


@dataclass
class _Block:
    """A paragraph (or heading-less run of lines) with its heading path and line span."""

    text: str
    heading: str
    start: int
    end: int


def _blocks(doc: Document) -> list[_Block]:
    """Paragraphs under their heading path. Headings: Markdown `#` lines in .md files, and reST titles elsewhere (a
    line underlined, optionally overlined, by a row of one punctuation character; levels in the order the styles
    first appear). A `#` line outside Markdown is text: a comment in a shell snippet, a cheat sheet or a config."""
    markdown = Path(re.sub(r":\d+$", "", doc.source)).suffix.lower() in (".md", ".markdown")  # path or file:line
    lines = doc.text.splitlines()
    path: list[str] = []
    rst_styles: list[str] = []
    blocks: list[_Block] = []
    para: list[str] = []
    para_start = 0

    def flush(end: int) -> None:
        nonlocal para
        if any(s.strip() for s in para):
            blocks.append(_Block("\n".join(para).strip("\n"), " > ".join(path), para_start, end))
        para = []

    def set_heading(level: int, title: str) -> None:
        del path[level:]  # a level deeper than the path so far just nests under what is there
        path.append(title.strip())

    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        number = doc.first_line + i
        if markdown and line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        md = _MD_HEADING.match(line) if markdown and not in_fence else None
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        over = _RST_ADORNMENT.match(line) and i + 2 < len(lines) and lines[i + 1].strip() \
            and _RST_ADORNMENT.match(lines[i + 2]) and lines[i + 2].strip()[0] == line.strip()[0]
        under = (not in_fence and line.strip() and not _RST_ADORNMENT.match(line) and _RST_ADORNMENT.match(nxt)
                 and len(nxt.strip()) >= len(line.strip()) and not line.startswith((" ", "\t")))
        if md:
            flush(number - 1)
            set_heading(len(md.group(1)) - 1, md.group(2))
            i += 1
            para_start = doc.first_line + i
        elif over or under:
            flush(number - 1)
            style = ("over" if over else "under") + (line.strip()[0] if over else nxt.strip()[0])
            if style not in rst_styles:
                rst_styles.append(style)
            set_heading(rst_styles.index(style), lines[i + 1] if over else line)
            i += 3 if over else 2
            para_start = doc.first_line + i
        elif not line.strip() and not in_fence:
            flush(number - 1)
            i += 1
            para_start = doc.first_line + i
        else:
            if not para:
                para_start = number
            para.append(line)
            i += 1
    flush(doc.first_line + len(lines) - 1)
    return blocks


def _line_of(text: str, pos: int, first: int) -> int:
    return first + text.count("\n", 0, pos)


def chunk_document(doc: Document, offsets: Offsets, max_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """Split one document into chunks of at most `max_tokens` tokens.

    Paragraphs under one heading are packed together while they fit; a chunk never spans two headings. A paragraph
    longer than `max_tokens` is cut into windows of `max_tokens` tokens that overlap by `overlap` tokens, and a
    chunk that starts a new window of packed paragraphs repeats the previous paragraph when that paragraph has at
    most `overlap` tokens, so a sentence at a boundary is found with its context.
    """
    if max_tokens < 8 or not 0 <= overlap < max_tokens:
        raise ConfigError(f"chunking: max_tokens {max_tokens}, overlap {overlap}",
                          "max_tokens must be at least 8 and overlap between 0 and max_tokens - 1")
    out: list[Chunk] = []
    pending: list[tuple[_Block, int]] = []

    def emit(parts: list[tuple[_Block, int]]) -> None:
        text = "\n\n".join(b.text for b, _ in parts)
        out.append(Chunk(chunk_key(text), text, doc.source, parts[0][0].heading, parts[0][0].start, parts[-1][0].end,
                         sum(n for _, n in parts)))

    for block in _blocks(doc):
        n = len(offsets(block.text))
        if pending and (pending[0][0].heading != block.heading or sum(m for _, m in pending) + n > max_tokens):
            emit(pending)
            last = pending[-1]
            pending = [last] if last[1] <= overlap and last[0].heading == block.heading \
                and last[1] + n <= max_tokens else []
        if n <= max_tokens:
            pending.append((block, n))
            continue
        if pending:
            emit(pending)
            pending = []
        spans = offsets(block.text)
        step = max_tokens - overlap
        for s in range(0, len(spans), step):
            window = spans[s:s + max_tokens]
            a, b = window[0][0], window[-1][1]
            text = block.text[a:b]
            out.append(Chunk(chunk_key(text), text, doc.source, block.heading,
                             _line_of(block.text, a, block.start), _line_of(block.text, b - 1, block.start),
                             len(window)))
            if s + max_tokens >= len(spans):
                break
    if pending:
        emit(pending)
    return out


def chunk_documents(docs: Iterable[Document], offsets: Offsets, max_tokens: int = 200, overlap: int = 40,
                    seen: set[str] | None = None) -> tuple[list[Chunk], int]:
    """Chunks of many documents, each content kept once (also against `seen`, the ids already in a base).

    Returns:
        (new chunks, duplicates dropped)
    """
    seen = set() if seen is None else seen
    chunks: list[Chunk] = []
    dropped = 0
    for doc in docs:
        for c in chunk_document(doc, offsets, max_tokens, overlap):
            if c.id in seen:
                dropped += 1
                continue
            seen.add(c.id)
            chunks.append(c)
    return chunks, dropped
