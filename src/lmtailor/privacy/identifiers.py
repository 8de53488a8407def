"""Numbers that identify a person or their money or machine: payment cards (Luhn), IBANs (mod 97), national
IDs (each country's check), IP addresses (not versions, not reserved ranges)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

from lmtailor.privacy.findings import (
    CREDIT_CARD,
    DEFAULT_OPTIONS,
    IBAN,
    INSIDE_NUMBER,
    IP_ADDRESS,
    NATIONAL_ID,
    Finding,
    ScanOptions,
    luhn_ok,
    only_digits,
    reference_before,
)

# ---- credit cards ---------------------------------------------------------------------------------------------

_CARD = re.compile(r"(?<![\w\-.])\d(?:[ \-]?\d){11,18}(?![\w\-]|\.\d)", re.ASCII)
_CARD_PREFIXES = [
    ("visa", re.compile(r"4")),
    ("mastercard", re.compile(r"5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)")),
    ("amex", re.compile(r"3[47]")),
    ("discover", re.compile(r"6(?:011|5|4[4-9])")),
    ("jcb", re.compile(r"35|2131|1800")),  # 2131 and 1800: JCB's older 15-digit ranges
    ("diners", re.compile(r"3(?:0[0-5]|[689])")),
    ("unionpay", re.compile(r"62")),
    ("maestro", re.compile(r"(?:5[06-9]|6[037]|0604)")),
]
# A 12-digit Maestro number looks like any order number; it counts only next to a word for "card".
_CARD_WORD_BEFORE = re.compile(r"(?i)(?:card|karte|carte|tarjeta|carta|cartão|kaart|カード)(?![a-z]).{0,30}$")


def find_cards(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _CARD.finditer(text):
        value = m.group()
        digits = only_digits(value)
        if not 12 <= len(digits) <= 19 or len(set(re.findall(r"[ \-]", value))) > 1:
            continue
        sizes = [len(g) for g in re.split(r"[ \-]", value)]
        if len(sizes) > 1 and sizes not in ([4, 4, 4, 4], [4, 6, 5], [4, 6, 4], [4, 4, 4, 4, 3]):
            continue
        if len(sizes) > 1 and INSIDE_NUMBER.search(text[max(0, m.start() - 8):m.start()]):
            continue
        kind = next((name for name, p in _CARD_PREFIXES if p.match(digits)), None)
        if kind is None or not luhn_ok(digits) or reference_before(text, m.start()):
            continue
        if len(digits) == 12 and (kind != "maestro" or not _CARD_WORD_BEFORE.search(text[max(0, m.start() - 40):
                                                                                       m.start()])):
            continue
        yield Finding(CREDIT_CARD, m.start(), m.end(), value, kind)


# ---- IBAN -----------------------------------------------------------------------------------------------------

IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21,
    "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18,
    "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23,
    "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26,
    "UA": 29, "VG": 24, "XK": 20,
}
_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2})(\d{2})((?: ?[A-Z0-9]){10,30})")


def iban_ok(compact: str) -> bool:
    """ISO 13616 check: known country length and mod-97 == 1 of the rearranged number."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not 2 <= int(compact[2:4]) <= 98:
        return False  # check digits 00, 01 and 99 are never issued
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _IBAN.finditer(text):
        length = IBAN_LENGTHS.get(m.group(1))
        if length is None:
            continue
        # The pattern may run into a following word; keep exactly the country's length of characters.
        need, end = length, m.start()
        while need and end < m.end():
            if text[end] != " ":
                need -= 1
            end += 1
        if need or (end < len(text) and text[end].isalnum()):
            continue
        value = text[m.start():end]
        if iban_ok(value.replace(" ", "")):
            yield Finding(IBAN, m.start(), end, value, m.group(1).lower())


# ---- national IDs ---------------------------------------------------------------------------------------------

_SSN = re.compile(r"(?<![\w\-.])(\d{3})([\- ]?)(\d{2})\2(\d{4})(?![\w\-]|\.\d)", re.ASCII)
_SSN_CONTEXT = re.compile(r"(?i)(?:ssn|social\s+security(?:\s+(?:number|no\.?|#))?|ss#|tin)\W{0,4}$")
_NINO = re.compile(r"(?<![A-Za-z0-9])([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])"
                   r"(?![A-Za-z0-9])")
_NINO_BAD_PREFIX = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}
_INSEE = re.compile(r"(?<![\w])([12]) ?(\d{2}) ?(0[1-9]|1[0-2]|[2-9]\d) ?(\d{2}|2[AB]) ?(\d{3}) ?(\d{3}) ?(\d{2})"
                    r"(?![\w])", re.ASCII)
_DNI = re.compile(r"(?<![\w\-])([XYZ]\d{7}|\d{8})-?([A-Z])(?![\w])", re.ASCII)
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
# Italian codice fiscale: 6 letters of name, year, month letter, day (+40 for women), birthplace, check letter;
# digits may be swapped for letters (omocodia) when two people would share a code.
_CF_DIGIT = "[0-9LMNPQRSTUV]"
_CODICE_FISCALE = re.compile(rf"(?<![A-Za-z0-9])[A-Z]{{6}}{_CF_DIGIT}{{2}}[ABCDEHLMPRST]{_CF_DIGIT}{{2}}[A-Z]"
                             rf"{_CF_DIGIT}{{3}}[A-Z](?![A-Za-z0-9])")
_CF_ODD = dict(zip("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                   [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8,
                    12, 14, 16, 10, 22, 25, 24, 23], strict=True))


def codice_fiscale_check(body: str) -> str:
    """The check letter of the first 15 characters of an Italian codice fiscale (odd positions by a table, even
    ones by value, mod 26)."""
    total = 0
    for i, c in enumerate(body[:15]):
        total += _CF_ODD[c] if i % 2 == 0 else (int(c) if c.isdigit() else ord(c) - ord("A"))
    return chr(ord("A") + total % 26)


def codice_fiscale_ok(code: str) -> bool:
    return len(code) == 16 and codice_fiscale_check(code) == code[15]


def find_national_ids(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _SSN.finditer(text):
        area, group, serial = m.group(1), m.group(3), m.group(4)
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        # Nine bare digits are an SSN only when the text says so.
        if not m.group(2) and not _SSN_CONTEXT.search(text[max(0, m.start() - 30):m.start()]):
            continue
        if reference_before(text, m.start()):
            continue
        yield Finding(NATIONAL_ID, m.start(), m.end(), m.group(), "us_ssn")
    for m in _NINO.finditer(text):
        if m.group(1) not in _NINO_BAD_PREFIX:
            yield Finding(NATIONAL_ID, m.start(), m.end(), m.group(), "uk_nino")
    for m in _INSEE.finditer(text):
        body = "".join(m.groups()[:6]).replace("2A", "19").replace("2B", "18")
        if 97 - int(body) % 97 == int(m.group(7)):
            yield Finding(NATIONAL_ID, m.start(), m.end(), m.group(), "fr_insee")
    for m in _DNI.finditer(text):
        number = m.group(1)
        number = str("XYZ".index(number[0])) + number[1:] if number[0] in "XYZ" else number
        if _DNI_LETTERS[int(number) % 23] == m.group(2):
            yield Finding(NATIONAL_ID, m.start(), m.end(), m.group(), "es_dni")
    for m in _CODICE_FISCALE.finditer(text):
        if codice_fiscale_ok(m.group()):
            yield Finding(NATIONAL_ID, m.start(), m.end(), m.group(), "it_codice_fiscale")


# ---- IP addresses ---------------------------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])",
                   re.ASCII)
# A dotted number after "version" (in the languages the scanner knows) or before "update" is a version string.
_VERSION_BEFORE = re.compile(r"(?i)(?:\b(?:v|version|versión|versione|versão|ver|release|build|firmware|oid|sdk|"
                             r"api|python|node|rev|kernel|patch|update|upgrade|tag)|バージョン|ビルド|リリース)"
                             r"(?:\s{1,3}(?:to|auf|zu|à|vers|a))?\s{0,3}[:=]?\s{0,3}$")
_VERSION_AFTER = re.compile(r"(?i)^\s{0,3}(?:update|upgrade|release|build|patch|version|beta|alpha|rc\d*|lts)\b")


# Reserved ranges no person uses; scrub.py draws its pseudonyms from them (the benchmarking ranges, RFC 2544
# and RFC 5180; the documentation ranges 192.0.2.0/24, 2001:db8::/32 ... are pasted from examples, and count).
PSEUDO_V4 = ipaddress.IPv4Network("198.18.0.0/15")
PSEUDO_V6 = ipaddress.IPv6Network("2001:2::/48")


def find_ips(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _IPV4.finditer(text):
        try:
            ip = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        # Loopback, "any" and netmasks say nothing about a person.
        if ip.is_loopback or ip.is_unspecified or m.group().startswith("255.") or ip in PSEUDO_V4 or \
                _VERSION_BEFORE.search(text[max(0, m.start() - 24):m.start()]) or \
                _VERSION_AFTER.match(text[m.end():m.end() + 16]):
            continue
        yield Finding(IP_ADDRESS, m.start(), m.end(), m.group(), "ipv4")
    for m in _IPV6.finditer(text):
        value = m.group()
        if value.count(":") < 2 or not any(c.isdigit() for c in value):
            continue
        try:
            ip6 = ipaddress.IPv6Address(value)
        except ValueError:
            continue
        if ip6.is_loopback or ip6.is_unspecified or ip6 in PSEUDO_V6:
            continue
        yield Finding(IP_ADDRESS, m.start(), m.end(), value, "ipv6")
