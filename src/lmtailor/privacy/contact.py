"""Contact details: e-mail addresses (plain and obfuscated) and phone numbers (through phonenumbers)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import phonenumbers

from lmtailor.privacy.findings import (
    DEFAULT_OPTIONS,
    EMAIL,
    PHONE,
    Finding,
    ScanOptions,
    only_digits,
    reference_before,
)

# ---- email ------------------------------------------------------------------------------------------------------

# At most 8 domain labels: an unbounded `(label\.)+` re-walks a long dotted run from every start.
_EMAIL = re.compile(r"(?<![\w.+\-/:%])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}"
                    r"[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w\-]|\.[A-Za-z0-9])", re.ASCII)
# `name (at) domain (dot) com`, `name [at] domain [dot] co [dot] uk`; written out without brackets
# (`name at domain dot com`) only when it ends in a common top-level domain, since "at" and "dot" are words.
_OBF_AT = r"(?:\s{0,2}[(\[{<]\s{0,2}(?:at|@)\s{0,2}[)\]}>]\s{0,2}|\s{1,2}(?:at|AT)\s{1,2})"
_OBF_DOT = r"(?:\s{0,2}[(\[{<]\s{0,2}(?:dot|\.)\s{0,2}[)\]}>]\s{0,2}|\s{1,2}(?:dot|DOT)\s{1,2})"
_OBF_EMAIL = re.compile(rf"(?<![\w.+\-])(?P<local>[A-Za-z0-9][A-Za-z0-9._%+\-]{{0,63}}){_OBF_AT}"
                        rf"(?P<domain>[A-Za-z0-9][A-Za-z0-9\-]{{0,62}}(?:{_OBF_DOT}[A-Za-z0-9\-]{{1,63}}){{1,4}})"
                        r"(?![\w\-])", re.ASCII)
_COMMON_TLDS = {"com", "org", "net", "edu", "gov", "io", "co", "uk", "de", "fr", "es", "it", "jp", "au", "nl", "be",
                "ch", "at", "ca", "us", "info", "me", "eu", "biz", "pl", "se", "no", "dk", "fi", "pt", "br", "in"}
# `icon@2x.png` is a file name, not an address.
_FILE_TLDS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "js", "css", "py", "ts", "json", "txt", "md", "html",
              "pdf", "zip", "gz", "tar", "exe", "dll", "so", "jar", "yaml", "yml", "toml", "lock"}
# RFC 2606 / 6761 names reserved for documentation and testing.
_DOCUMENTATION_DOMAINS = re.compile(r"(?:^|\.)(?:example\.(?:com|org|net)|example|invalid|test|localhost)$",
                                    re.IGNORECASE)
# scrub.py's own e-mail pseudonyms: never a person's, so a rescan of scrubbed text stays clean.
PSEUDONYM_EMAIL = re.compile(r"user_[0-9a-f]{16}@example\.com")


def find_emails(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _EMAIL.finditer(text):
        value = m.group()
        local, domain = value.rsplit("@", 1)
        if ".." in local or local.endswith(".") or domain.rsplit(".", 1)[1].lower() in _FILE_TLDS:
            continue
        if re.match(r":[\w~]", text[m.end():m.end() + 2]):  # git@github.com:org/repo.git is an SSH remote
            continue
        if PSEUDONYM_EMAIL.fullmatch(value) or (not options.documentation_emails
                                                and _DOCUMENTATION_DOMAINS.search(domain)):
            continue
        yield Finding(EMAIL, m.start(), m.end(), value)
    for m in _OBF_EMAIL.finditer(text):
        domain = m.group("domain")
        labels = re.split(_OBF_DOT, domain)
        written_out = not re.search(r"[(\[{<]", m.group())
        if written_out and labels[-1].lower() not in _COMMON_TLDS:
            continue
        if not re.fullmatch(r"[A-Za-z]{2,24}", labels[-1]) or labels[-1].lower() in _FILE_TLDS:
            continue
        if not options.documentation_emails and _DOCUMENTATION_DOMAINS.search(".".join(labels)):
            continue
        yield Finding(EMAIL, m.start(), m.end(), m.group(), "obfuscated")


# ---- phone numbers --------------------------------------------------------------------------------------------

# Candidates: a digit cluster of phone characters, optionally with an extension; phonenumbers decides which
# part of it (if any) is a valid number of a configured region or of the country code it is written with.
# The cluster is bounded (at most 26 characters before the extension) and starts only where a run begins.
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+.,\-/:@=#])(?:\+\s?|\(\+?)?\d[\d \u00a0()./\-]{5,24}\d"
    r"(?:\s{0,2}(?:x|ext\.?|#)\s{0,2}\d{1,6})?(?![\w@]|[.,/\-]\d)", re.ASCII
)
# Shapes phonenumbers may read as a valid number that are something else: an IPv4 address, a date.
_NOT_A_PHONE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}|\d{1,2}([./\-])\d{1,2}\1(?:\d{4}|\d{2})|"
                          r"\d{4}([./\-])\d{1,2}\2\d{1,2}")


# Words that say the number beside them is someone's phone, in the languages the scanner knows, with the regions
# each language hints at. Beside one, a number phonenumbers only calls *possible* (the right length, an area code
# it does not know as assigned) counts: people mistype, invent, or use ranges newer than the library's metadata,
# and a number next to "Tel." is a number to scrub whether or not it is in service. The hinted regions are tried
# after the configured ones, so German text scanned with the default region still has its national numbers read.
_PHONE_WORD_GROUPS: list[tuple[tuple[str, ...], str]] = [
    ((), r"phone|telephone|tel|mob|mobile|cell|cellphone|call|calls|called|ring|dial|fax|sms|whatsapp|signal|ping|"
         r"contact|reach|reached|reachable|hotline|my\s{1,3}number"),
    (("DE", "AT", "CH"), r"telefon|telefonnummer|rufnummer|handy|mobil|mobilnummer|anrufen|ruf|rufen|erreichbar|"
                         r"meine?\s{1,3}nummer"),
    (("FR", "BE", "CH"), r"téléphone|tél|portable|appel|appelle[rz]?|joindre|joignable|mon\s{1,3}numéro"),
    (("ES", "MX", "AR", "CO"), r"teléfono|tfno|móvil|llam[ae]r?|llámame|mi\s{1,3}número"),
    (("IT",), r"telefono|cellulare|chiamare|chiama|chiamami|recapito|il\s{1,3}mio\s{1,3}numero"),
    (("PT", "BR"), r"telemóvel|telefone|celular|contacto|ligar|liga|o\s{1,3}meu\s{1,3}número"),
]
_PHONE_WORDS = re.compile(
    "(?i)" + "|".join(rf"(?<![^\W\d_])(?P<g{i}>{words})(?![^\W\d_])" for i, (_, words) in
                      enumerate(_PHONE_WORD_GROUPS))
    + r"|(?P<ja>電話|携帯|連絡先)|(?P<sign>☎|📞|ＴＥＬ)"
)
_GROUP_REGIONS = {f"g{i}": regions for i, (regions, _) in enumerate(_PHONE_WORD_GROUPS)} | {"ja": ("JP",),
                                                                                            "sign": ()}
# scrub.py's fake numbers: invalid, and with digits whose value is PSEUDONYM_PHONE_RESIDUE modulo 97, so a rescan
# of pseudonymized text next to "Tel." finds none (one real invalid number in 97 shares the residue and is missed).
PSEUDONYM_PHONE_MOD, PSEUDONYM_PHONE_RESIDUE = 97, 53


def is_pseudonym_phone(value: str) -> bool:
    digits = only_digits(value)
    return bool(digits) and int(digits) % PSEUDONYM_PHONE_MOD == PSEUDONYM_PHONE_RESIDUE


# Numbers a phone word may stand next to that are no phone: grouped thousands (1.234.567), a decimal fraction
# (3.14159265); and an ISBN-13 (_isbn13_ok).
_NOT_A_LOOSE_PHONE = re.compile(r"\d{1,3}(?:([.,])\d{3})(?:\1\d{3})+|\d{1,3}\.\d{5,}")


def _isbn13_ok(value: str) -> bool:
    d = only_digits(value)
    weighted = sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(d))
    return len(d) == 13 and d[:3] in ("978", "979") and weighted % 10 == 0


def _phone_context(text: str, start: int, end: int) -> tuple[str, ...] | None:
    """The regions hinted by phone words shortly before the number (no other digit between) or right after it
    ("unter … erreichbar"); None when there is no phone word."""
    before = text[max(0, start - 40):start]
    before = before[max((m.end() for m in re.finditer(r"\d", before)), default=0):]
    after = text[end:end + 24]
    after = after[:next((m.start() for m in re.finditer(r"\d", after)), len(after))]
    words = [*_PHONE_WORDS.finditer(before), *_PHONE_WORDS.finditer(after)]
    if not words:
        return None
    return tuple(dict.fromkeys(r for m in words for r in _GROUP_REGIONS[m.lastgroup or "sign"]))


def _phone_spans(cand: str, regions: tuple[str, ...], leniency: int) -> list[tuple[int, int]]:
    """Where phonenumbers finds numbers in `cand` for the first region that finds any; "00" is also read as "+"."""
    # "00" is the international prefix almost everywhere (not in North America): read it as "+".
    texts = [(cand, 0)] + ([("+" + cand[2:], 1)] if cand.startswith("00") else [])
    for region in regions:
        for t, shift in texts:
            found = [(m.start + shift if m.start else 0, m.end + shift)
                     for m in phonenumbers.PhoneNumberMatcher(t, region, leniency=leniency)]
            if found:
                return found
    return []


def find_phones(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    """Numbers phonenumbers calls valid in a configured region (or for the country code they are written with);
    next to a phone word, also those it only calls possible."""
    for c in _PHONE_CANDIDATE.finditer(text):
        cand = c.group()
        digits = len(only_digits(re.split(r"[x#]|ext", cand)[0]))
        # Numbers have 7 to 15 digits (E.164); checking that here keeps phonenumbers off most digit clusters.
        if not 7 <= digits <= 17 or _NOT_A_PHONE.fullmatch(cand) or reference_before(text, c.start()):
            continue
        found = _phone_spans(cand, options.phone_regions, phonenumbers.Leniency.VALID)
        hints = None if found else _phone_context(text, c.start(), c.end())
        loose = False
        if hints is not None and not _NOT_A_LOOSE_PHONE.fullmatch(cand) and not _isbn13_ok(cand):
            # Valid in a region the phone word hints at; else possible in any region tried. Never one of
            # scrub.py's fakes (invalid in the configured regions, but possibly valid in a hinted one).
            extra = tuple(r for r in hints if r not in options.phone_regions)
            found = _phone_spans(cand, extra, phonenumbers.Leniency.VALID) if extra else []
            if not found:
                loose = True
                found = _phone_spans(cand, options.phone_regions + extra, phonenumbers.Leniency.POSSIBLE)
            found = [(s, e) for s, e in found if len(only_digits(cand[s:e])) >= 7
                     and not is_pseudonym_phone(cand[s:e])]
        for start, end in sorted(set(found), key=lambda se: (se[0], -se[1])):
            if any(s <= start < e for s, e in found if (s, e) != (start, end) and e - s > end - start):
                continue  # inside a longer number
            value = text[c.start() + start:c.start() + end]
            kind = "international" if value.startswith(("+", "00", "(+")) else "national"
            yield Finding(PHONE, c.start() + start, c.start() + end, value, kind + ("_unverified" if loose else ""))
