"""Dates of birth: a date (numeric or with a month name, in the languages the scanner knows) next to a word that
says it is a birth date, kept only when it is a real calendar date."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator

from lmtailor.privacy.findings import DATE_OF_BIRTH, DEFAULT_OPTIONS, Finding, ScanOptions

# ---- dates of birth -------------------------------------------------------------------------------------------

# Month names (and common abbreviations) in the languages the scanner knows, to their numbers.
_MONTH_NAMES: dict[str, int] = {}
for _names in (
    "january february march april may june july august september october november december",
    "januar februar märz april mai juni juli august september oktober november dezember",
    "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
    "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre",
    "janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro",
    "januari februari maart april mei juni juli augustus september oktober november december",
):
    for _i, _name in enumerate(_names.split()):
        _MONTH_NAMES.setdefault(_name, _i + 1)
        _MONTH_NAMES.setdefault(_name[:3], _i + 1)
_MONTH_NAMES.update({"sept": 9, "maerz": 3, "fevrier": 2, "aout": 8, "decembre": 12, "setiembre": 9})
_MONTH = "(?:" + "|".join(sorted(map(re.escape, _MONTH_NAMES), key=len, reverse=True)) + r")\.?"
_ORD = r"(?:st|nd|rd|th|er|\.|º|°)?"
_DATE = (r"(?P<date>\d{4}-\d{1,2}-\d{1,2}|\d{4}/\d{1,2}/\d{1,2}|\d{4}年\d{1,2}月\d{1,2}日|"
         r"\d{1,2}[./\-]\d{1,2}[./\-](?:\d{4}|\d{2})|"
         rf"\d{{1,2}}{_ORD}(?:\s{{1,3}}(?:of|de))?\s{{1,3}}{_MONTH}(?:\s{{1,3}}de)?,?\s{{1,3}}\d{{4}}|"
         rf"{_MONTH}\s{{1,3}}\d{{1,2}}{_ORD},?\s{{1,3}}\d{{4}})(?![\d])")
# The words that say a date is a birth date, in English, German, French, Spanish, Italian, Portuguese, Dutch
# and Japanese.
_DOB = re.compile(
    r"(?i)(?:\bborn(?:\s{1,3}on)?|\bd\.?o\.?b\.?|\bdate\s{1,3}of\s{1,3}birth|\bbirth\s{0,3}date|\bbirthday|"
    r"\bgeboren(?:\s{1,3}(?:am|den))?|\bgeb\.|\bgeburtsdatum|\bgeburtstag|"
    r"\bné(?:e|\(e\))?\s{1,3}le|\bdate\s{1,3}de\s{1,3}naissance|"
    r"\bnacid[oa]\s{1,3}el|\bfecha\s{1,3}de\s{1,3}nacimiento|\bf\.\s?nac\.|"
    r"\bnat[oa]\s{1,3}il|\bdata\s{1,3}di\s{1,3}nascita|"
    r"\bnascid[oa]\s{1,3}em|\bdata\s{1,3}de\s{1,3}nascimento|\bgeboortedatum|"
    r"生年月日|誕生日)"
    r"(?![a-z])\s{0,3}(?:[:=\-：]\s{0,3})?(?:(?:is|was|on|the|am|le|el|il|em|op)\s{1,3}){0,2}" + _DATE
)


def _plausible_date(text: str) -> bool:
    """Whether `text` is a real calendar date of a living person (either day/month order for numeric dates)."""
    low = text.lower()
    nums = [int(n) for n in re.findall(r"\d+", low)]
    readings: list[tuple[int, int, int]]
    if re.fullmatch(r"\d{4}\D\d{1,2}\D\d{1,2}\D?", low):
        readings = [(nums[0], nums[1], nums[2])]
    elif re.search(r"[^\W\d_]", low):
        name = re.search(r"[^\W\d_]{3,}", low)
        month = _MONTH_NAMES.get(name.group()) if name else None
        if month is None:
            return False
        readings = [(nums[-1], month, nums[0])]
    else:
        a, b, year = nums
        year += 1900 if year < 100 else 0
        readings = [(year, b, a), (year, a, b)]  # day-first or month-first: either reading may be meant
    for year, month, day in readings:
        try:
            born = datetime.date(year, month, day)
        except ValueError:
            continue
        if 1900 <= born.year <= 2030:
            return True
    return False


def find_dobs(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _DOB.finditer(text):
        if _plausible_date(m.group("date")):
            yield Finding(DATE_OF_BIRTH, m.start("date"), m.end("date"), m.group("date"))
