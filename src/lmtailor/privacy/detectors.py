"""PII detectors: regexes that find candidates, validators (checksums, ranges, context) that keep the real ones.

`scan(text)` runs every detector and resolves overlaps: when two findings overlap, the one of the more
specific type wins (a checksum-validated IBAN over the digits a phone pattern also sees), then the longer.
The regex layer is always on; `scan(text, ner=True)` adds person names and places from an optional NER
backend (`ner_findings`), which needs `presidio-analyzer` or `spacy` with an English model installed.

Types: EMAIL, PHONE, CREDIT_CARD, IBAN, IP_ADDRESS, URL_SECRET (the credentials or token inside a URL),
SECRET (API keys, tokens, passwords, private keys), DATE_OF_BIRTH (a date next to "born", "DOB", ...),
NATIONAL_ID (US SSN, UK NINO, French INSEE/NIR, Spanish DNI/NIE), and with NER: PERSON, LOCATION.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lmtailor.errors import ConfigError

EMAIL = "EMAIL"
PHONE = "PHONE"
CREDIT_CARD = "CREDIT_CARD"
IBAN = "IBAN"
IP_ADDRESS = "IP_ADDRESS"
URL_SECRET = "URL_SECRET"
SECRET = "SECRET"
DATE_OF_BIRTH = "DATE_OF_BIRTH"
NATIONAL_ID = "NATIONAL_ID"
PERSON = "PERSON"
LOCATION = "LOCATION"

REGEX_TYPES = (EMAIL, PHONE, CREDIT_CARD, IBAN, IP_ADDRESS, URL_SECRET, SECRET, DATE_OF_BIRTH, NATIONAL_ID)
NER_TYPES = (PERSON, LOCATION)
# Which finding wins an overlap: validated, specific types over loose ones.
PRIORITY = {SECRET: 100, URL_SECRET: 90, CREDIT_CARD: 80, IBAN: 80, NATIONAL_ID: 70, EMAIL: 60,
            DATE_OF_BIRTH: 55, IP_ADDRESS: 50, PHONE: 40, PERSON: 10, LOCATION: 10}


@dataclass(frozen=True)
class Finding:
    """One piece of PII: `text[start:end] == value`; `kind` names the sub-format (e.g. "us_ssn", "github")."""

    type: str
    start: int
    end: int
    value: str
    kind: str = ""


Detector = Callable[[str], Iterator[Finding]]

# ---- helpers --------------------------------------------------------------------------------------------------

# Words before a number that say it is a reference, not a person's number ("Order #555-123-4567").
_NOT_PII_BEFORE = re.compile(
    r"(?:\b(?:order|invoice|ticket|ref(?:erence)?|case|tracking|build|version|ver|release|sku|part|po|txn|"
    r"transaction|isbn|serial|batch|lot|job|pr|issue|bug|run|shipment|parcel|receipt|confirmation|item)"
    r"\s*(?:#|no\.?|num(?:ber)?|id)?\s*(?:is\s+|was\s+)?[:#.=]?\s*|#)$",
    re.IGNORECASE,
)
# "4371 0364 2859 2802": a match that starts inside a longer group of numbers is part of that number.
_INSIDE_NUMBER = re.compile(r"\b[A-Z0-9]*\d[A-Z0-9]*[ \-]$")


def _reference_before(text: str, start: int, window: int = 24) -> bool:
    before = text[max(0, start - window):start]
    return bool(_NOT_PII_BEFORE.search(before) or re.search(r"\d[ \-]$", before))


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def shannon_entropy(s: str) -> float:
    """Bits per character of `s` (0 for an empty string)."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def luhn_ok(number: str) -> bool:
    """Whether a digit string passes the Luhn checksum (credit cards, IMEIs)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ---- email ------------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+\-/:%])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}"
                    r"[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w\-]|\.[A-Za-z0-9])")
# `icon@2x.png` is a file name, not an address.
_FILE_TLDS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "js", "css", "py", "ts", "json", "txt", "md", "html",
              "pdf", "zip", "gz", "tar", "exe", "dll", "so", "jar", "yaml", "yml", "toml", "lock"}
# RFC 2606 reserved names never belong to a person (our own pseudonyms use them too).
_RESERVED_DOMAINS = re.compile(r"(?:^|\.)(?:example\.(?:com|org|net)|invalid|test|localhost)$", re.IGNORECASE)


def find_emails(text: str) -> Iterator[Finding]:
    for m in _EMAIL.finditer(text):
        value = m.group()
        local, domain = value.rsplit("@", 1)
        if ".." in local or local.endswith(".") or domain.rsplit(".", 1)[1].lower() in _FILE_TLDS:
            continue
        if re.match(r":[\w~]", text[m.end():m.end() + 2]):  # git@github.com:org/repo.git is an SSH remote
            continue
        if _RESERVED_DOMAINS.search(domain):
            continue
        yield Finding(EMAIL, m.start(), m.end(), value)


# ---- phone numbers --------------------------------------------------------------------------------------------

_PHONE_PATTERNS = [
    # +44 20 7946 0958, +1-415-555-0132, +49 30 1234567, +44 (0)20 7946 0958, +33 1 23 45 67 89, 0044 20 7946 0958
    ("international", re.compile(r"(?<![\w+])(?:\+|00(?=[1-9]\d{0,2}[ .\-]))[1-9]\d{0,2}(?:[ .\-]?\(?\d{1,4}\)?){2,6}"
                                 r"(?![\w\-]|\.\d)")),
    # (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199
    ("nanp", re.compile(r"(?<![\w+\-.])(?:1[ .\-])?(?:\(\d{3}\)[ ]?|\d{3}(?P<sep>[.\- ]))\d{3}[.\- ]\d{4}"
                        r"(?![\w\-]|\.\d)")),
    # national numbers with a trunk 0: 020 7946 0958, 07700 900123, 030 1234567, 01 23 45 67 89
    ("national", re.compile(r"(?<![\w+\-.:/])0[1-9]\d{0,3}(?:[ \-]\d{2,8}){1,4}(?![\w\-:/]|\.\d)")),
]


def find_phones(text: str) -> Iterator[Finding]:
    for kind, pattern in _PHONE_PATTERNS:
        for m in pattern.finditer(text):
            value = m.group()
            digits = _digits(value)
            if kind == "international" and not 8 <= len(digits) <= 15:
                continue
            if kind == "nanp":
                area = re.search(r"\d{3}", value[2:] if value.startswith("1") and not value[1].isdigit() else value)
                if area is None or area.group()[0] in "01":
                    continue
                seps = set(re.findall(r"[.\- ]", value.replace(") ", ")")))
                if m.group("sep") and len(seps) > 1:
                    continue
            if kind == "national" and not 9 <= len(digits) <= 12:
                continue
            if _reference_before(text, m.start()):
                continue
            yield Finding(PHONE, m.start(), m.end(), value, kind)


# ---- credit cards ---------------------------------------------------------------------------------------------

_CARD = re.compile(r"(?<![\w\-.])\d(?:[ \-]?\d){12,18}(?![\w\-]|\.\d)")
_CARD_PREFIXES = [
    ("visa", re.compile(r"4")),
    ("mastercard", re.compile(r"5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)")),
    ("amex", re.compile(r"3[47]")),
    ("discover", re.compile(r"6(?:011|5|4[4-9])")),
    ("jcb", re.compile(r"35(?:2[89]|[3-8]\d)")),
    ("diners", re.compile(r"3(?:0[0-5]|[689])")),
    ("unionpay", re.compile(r"62")),
    ("maestro", re.compile(r"(?:5[06-9]|6[37])")),
]


def find_cards(text: str) -> Iterator[Finding]:
    for m in _CARD.finditer(text):
        value = m.group()
        digits = _digits(value)
        if not 13 <= len(digits) <= 19 or len(set(re.findall(r"[ \-]", value))) > 1:
            continue
        sizes = [len(g) for g in re.split(r"[ \-]", value)]
        if len(sizes) > 1 and sizes not in ([4, 4, 4, 4], [4, 6, 5], [4, 6, 4], [4, 4, 4, 4, 3]):
            continue
        if len(sizes) > 1 and _INSIDE_NUMBER.search(text[max(0, m.start() - 8):m.start()]):
            continue
        kind = next((name for name, p in _CARD_PREFIXES if p.match(digits)), None)
        if kind is None or not luhn_ok(digits) or _reference_before(text, m.start()):
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


def find_ibans(text: str) -> Iterator[Finding]:
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


# ---- IP addresses ---------------------------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_VERSION_BEFORE = re.compile(r"\b(?:v|version|ver|release|build|firmware|oid|sdk|api|python|node|rev)\s*[:=]?\s*$",
                             re.IGNORECASE)


# Reserved ranges no person uses; scrub.py draws its pseudonyms from them.
_PSEUDO_V4 = ipaddress.IPv4Network("198.18.0.0/15")
_PSEUDO_V6 = ipaddress.IPv6Network("2001:db8::/32")


def find_ips(text: str) -> Iterator[Finding]:
    for m in _IPV4.finditer(text):
        try:
            ip = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        # Loopback, "any" and netmasks say nothing about a person.
        if ip.is_loopback or ip.is_unspecified or m.group().startswith("255.") or ip in _PSEUDO_V4 or \
                _VERSION_BEFORE.search(text[max(0, m.start() - 12):m.start()]):
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
        if ip6.is_loopback or ip6.is_unspecified or ip6 in _PSEUDO_V6:
            continue
        yield Finding(IP_ADDRESS, m.start(), m.end(), value, "ipv6")


# ---- URLs with credentials or tokens --------------------------------------------------------------------------

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]{1,15}://[^\s<>\"'`]+")
_URL_PARAM = re.compile(r"[?&#;]([A-Za-z0-9_.\-]+)=([^&#\s]+)")
_SECRET_PARAMS = {
    "token", "access_token", "refresh_token", "id_token", "auth", "auth_token", "authtoken", "api_key", "apikey",
    "api-key", "key", "secret", "client_secret", "password", "passwd", "pwd", "pass", "sig", "signature",
    "x-amz-signature", "x-amz-security-token", "x-amz-credential", "session", "sessionid", "session_id", "sid",
    "jwt", "private_token", "code", "otp", "access_key", "secret_key", "sas", "sv_token",
}


def find_url_secrets(text: str) -> Iterator[Finding]:
    for m in _URL.finditer(text):
        url = m.group().rstrip(".,;:!?)]}'\"")
        base = m.start()
        scheme_end = url.index("://") + 3
        # Userinfo is everything before an "@" that comes before the path; a raw "#" in a password is common.
        auth = re.match(r"([^/?\s]+)@", url[scheme_end:])
        if auth:
            userinfo = auth.group(1)
            user, _, password = userinfo.partition(":")
            if password or (len(user) >= 20 and shannon_entropy(user) >= 3.5):
                start = base + scheme_end
                yield Finding(URL_SECRET, start, start + len(userinfo), userinfo, "userinfo")
        for p in _URL_PARAM.finditer(url, scheme_end):
            name, value = p.group(1).lower(), p.group(2)
            if name in _SECRET_PARAMS and len(value) >= (8 if name in ("code", "sid", "key", "sig") else 6):
                yield Finding(URL_SECRET, base + p.start(2), base + p.end(2), value, name)


# ---- API keys and secrets -------------------------------------------------------------------------------------

_KEY_PATTERNS = [
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
                               r"-----END (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("aws_access_key", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA)[0-9A-Z]{16}"
                                  r"(?![A-Za-z0-9])")),
    ("github", re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{50,255})"
                          r"(?![A-Za-z0-9_])")),
    ("gitlab", re.compile(r"(?<![A-Za-z0-9_])glpat-[A-Za-z0-9_\-]{20,}(?![A-Za-z0-9_\-])")),
    ("slack", re.compile(r"(?<![A-Za-z0-9])xox[abposrce]-[A-Za-z0-9\-]{10,}(?![A-Za-z0-9\-])")),
    ("slack_webhook", re.compile(r"https://hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+")),
    ("stripe", re.compile(r"(?<![A-Za-z0-9_])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}(?![A-Za-z0-9])")),
    ("anthropic", re.compile(r"(?<![A-Za-z0-9_\-])sk-ant-[A-Za-z0-9_\-]{20,}(?![A-Za-z0-9_\-])")),
    ("openai", re.compile(r"(?<![A-Za-z0-9_\-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}(?![A-Za-z0-9_\-])")),
    ("google", re.compile(r"(?<![A-Za-z0-9_\-])AIza[0-9A-Za-z_\-]{35}(?![A-Za-z0-9_\-])")),
    ("huggingface", re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9_])")),
    ("twilio", re.compile(r"(?<![A-Za-z0-9])SK[0-9a-f]{32}(?![A-Za-z0-9])")),
    ("sendgrid", re.compile(r"(?<![A-Za-z0-9])SG\.[A-Za-z0-9_\-]{16,32}\.[A-Za-z0-9_\-]{16,64}(?![A-Za-z0-9_\-])")),
    ("npm", re.compile(r"(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])")),
    ("jwt", re.compile(r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")),
    ("bearer", re.compile(r"(?i:\b(?:bearer|basic|token)\s+)(?P<val>[A-Za-z0-9\-._~+/]{20,}=*)")),
]
# `api_key = "..."`, `password: hunter2`, `my password is Tr0ub4dor&3`, `AWS_SECRET_ACCESS_KEY=...`
_ASSIGNED = re.compile(
    r"(?i)(?P<kw>\b[\w.\-]*?(?P<word>api[_\-]?key|apikey|secret|token|passwd|password|passphrase|pwd|pin|"
    r"credentials?|private[_\-]?key|access[_\-]?key|auth[_\-]?key|key)[\w\-]*)[\"']?"
    r"(?:\s*(?:=>|:=|[:=])\s*|\s+(?:is|was|=)\s+(?:now\s+)?)"
    r"(?P<q>[\"']?)(?P<val>[^\s\"'`,;<>]{4,200})"
)
_PLACEHOLDER_VALUE = re.compile(r"^(?:\*+|x+|X+|\.+|<[^>]*>|\$\{?\w+\}?|%\w+%|\{\{.*\}\}|null|none|true|false|"
                                r"redacted|hidden|changeme|required|optional|string|example|\[.*\])$",
                                re.IGNORECASE)


def _looks_secret(word: str, value: str) -> bool:
    word = word.lower()
    if _PLACEHOLDER_VALUE.match(value) or value.startswith("<"):
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    if word in ("password", "passwd", "pwd", "passphrase"):
        # A password can be short and low in entropy, but a plain lowercase word ("reset", "expired") is prose.
        return len(value) >= 6 and classes >= 2 and not re.fullmatch(r"[A-Za-z]+[.!?]?", value)
    if word == "pin":
        return bool(re.fullmatch(r"\d{4,8}", value))
    return len(value) >= 16 and classes >= 2 and shannon_entropy(value) >= 3.0 and not value.replace(".", "").isdigit()


def find_secrets(text: str) -> Iterator[Finding]:
    for kind, pattern in _KEY_PATTERNS:
        for m in pattern.finditer(text):
            start, end = (m.start("val"), m.end("val")) if "val" in pattern.groupindex else (m.start(), m.end())
            yield Finding(SECRET, start, end, text[start:end], kind)
    for m in _ASSIGNED.finditer(text):
        value = m.group("val")
        if "://" in value or text[m.start() - 1:m.start()] in ("?", "&"):
            continue  # URLs and their query parameters are find_url_secrets' job
        value = value.rstrip(".)") if m.group("q") else value.rstrip(".,;:!?)]}")
        if _looks_secret(m.group("word"), value):
            yield Finding(SECRET, m.start("val"), m.start("val") + len(value), value, "assigned")


# ---- dates of birth -------------------------------------------------------------------------------------------

_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december"]
_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|" \
         r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_DATE = (r"(?P<date>\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./\-]\d{1,2}[./\-](?:\d{4}|\d{2})|"
         rf"\d{{1,2}}(?:st|nd|rd|th)?(?:\s+of)?\s+{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})")
_DOB = re.compile(
    r"(?i)(?:\bborn(?:\s+on)?|\bd\.?o\.?b\.?|\bdate\s+of\s+birth|\bbirth\s*date|\bbirthday|\bgeburtsdatum|"
    r"\bnée?\s+le|\bfecha\s+de\s+nacimiento)(?![a-z])\s*(?:[:=\-]\s*)?(?:(?:is|was|on|the|:)\s+){0,2}" + _DATE
)


def _plausible_date(text: str) -> bool:
    low = text.lower()
    nums = [int(n) for n in re.findall(r"\d+", low)]
    if re.fullmatch(r"\d{4}-\d{1,2}-\d{1,2}", low):
        year, month, day = nums
    elif re.search(r"[a-z]", low):
        month = next(i + 1 for i, name in enumerate(_MONTHS) if re.search(rf"\b{name[:3]}", low))
        day, year = nums[0], nums[-1]
    else:
        a, b, year = nums
        if year < 100:
            year += 1900
        # Day-first or month-first: accept when either reading is a date.
        day, month = (a, b) if b <= 12 else (b, a)
    return 1900 <= year <= 2030 and 1 <= month <= 12 and 1 <= day <= 31


def find_dobs(text: str) -> Iterator[Finding]:
    for m in _DOB.finditer(text):
        if _plausible_date(m.group("date")):
            yield Finding(DATE_OF_BIRTH, m.start("date"), m.end("date"), m.group("date"))


# ---- national IDs ---------------------------------------------------------------------------------------------

_SSN = re.compile(r"(?<![\w\-.])(\d{3})([\- ]?)(\d{2})\2(\d{4})(?![\w\-]|\.\d)")
_SSN_CONTEXT = re.compile(r"(?i)(?:ssn|social\s+security(?:\s+(?:number|no\.?|#))?|ss#|tin)\W{0,4}$")
_NINO = re.compile(r"(?<![A-Za-z0-9])([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])"
                   r"(?![A-Za-z0-9])")
_NINO_BAD_PREFIX = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}
_INSEE = re.compile(r"(?<![\w])([12]) ?(\d{2}) ?(0[1-9]|1[0-2]|[2-9]\d) ?(\d{2}|2[AB]) ?(\d{3}) ?(\d{3}) ?(\d{2})"
                    r"(?![\w])")
_DNI = re.compile(r"(?<![\w\-])([XYZ]\d{7}|\d{8})-?([A-Z])(?![\w])")
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def find_national_ids(text: str) -> Iterator[Finding]:
    for m in _SSN.finditer(text):
        area, group, serial = m.group(1), m.group(3), m.group(4)
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        # Nine bare digits are an SSN only when the text says so.
        if not m.group(2) and not _SSN_CONTEXT.search(text[max(0, m.start() - 30):m.start()]):
            continue
        if _reference_before(text, m.start()):
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


# ---- optional NER layer ---------------------------------------------------------------------------------------

NER_HINT = ("install an NER backend: `pip install presidio-analyzer` or `pip install spacy`, plus an English spaCy "
            "model package (en_core_web_sm; set LMTAILOR_SPACY_MODEL to use another)")


@functools.lru_cache(maxsize=1)
def _ner_backend() -> Callable[[str], list[tuple[str, int, int]]]:
    import os

    model = os.environ.get("LMTAILOR_SPACY_MODEL", "en_core_web_sm")
    try:
        from presidio_analyzer import AnalyzerEngine  # type: ignore[import-not-found]
    except ImportError:
        AnalyzerEngine = None  # noqa: N806
    if AnalyzerEngine is not None:
        try:
            engine = AnalyzerEngine()
        except (OSError, ImportError, ValueError) as e:
            raise ConfigError(f"presidio-analyzer is installed but could not start: {e}", NER_HINT) from None

        def presidio(text: str) -> list[tuple[str, int, int]]:
            found = engine.analyze(text=text, entities=["PERSON", "LOCATION"], language="en")
            return [(r.entity_type, r.start, r.end) for r in found if r.score >= 0.5]

        return presidio
    try:
        import spacy  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("privacy NER was asked for but no NER backend is installed", NER_HINT) from None
    try:
        nlp = spacy.load(model, disable=["lemmatizer", "parser"])
    except OSError:
        raise ConfigError(f"spaCy is installed but its model '{model}' is not", NER_HINT) from None
    labels = {"PERSON": PERSON, "GPE": LOCATION, "LOC": LOCATION, "FAC": LOCATION}

    def spacy_ner(text: str) -> list[tuple[str, int, int]]:
        return [(labels[e.label_], e.start_char, e.end_char) for e in nlp(text).ents if e.label_ in labels]

    return spacy_ner


def ner_available() -> bool:
    """Whether an NER backend can be loaded (presidio-analyzer, or spaCy with its model)."""
    try:
        _ner_backend()
    except ConfigError:
        return False
    return True


def ner_findings(text: str) -> Iterator[Finding]:
    """PERSON and LOCATION findings from the NER backend.

    Raises:
        ConfigError: no backend is installed (the message says what to install).
    """
    for label, start, end in _ner_backend()(text):
        kind = label if label in NER_TYPES else LOCATION
        yield Finding(kind, start, end, text[start:end], "ner")


# ---- scan -----------------------------------------------------------------------------------------------------

DETECTORS: dict[str, Detector] = {
    EMAIL: find_emails, PHONE: find_phones, CREDIT_CARD: find_cards, IBAN: find_ibans, IP_ADDRESS: find_ips,
    URL_SECRET: find_url_secrets, SECRET: find_secrets, DATE_OF_BIRTH: find_dobs, NATIONAL_ID: find_national_ids,
}


def resolve_overlaps(findings: list[Finding]) -> list[Finding]:
    """Keep non-overlapping findings: higher-priority type first, then the longer span; sorted by start."""
    ranked = sorted(set(findings), key=lambda f: (-PRIORITY.get(f.type, 0), -(f.end - f.start), f.start))
    kept: list[Finding] = []
    for f in ranked:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def scan(text: str, types: tuple[str, ...] | None = None, ner: bool = False) -> list[Finding]:
    """Every piece of PII in `text`, overlaps resolved, in order.

    Args:
        text: any text.
        types: restrict to these regex types (default: all of REGEX_TYPES).
        ner: also run the NER backend for PERSON and LOCATION.

    Returns:
        Non-overlapping findings sorted by start offset.

    Raises:
        ConfigError: `ner` is set but no NER backend is installed.
    """
    found: list[Finding] = []
    for name in types or REGEX_TYPES:
        found.extend(DETECTORS[name](text))
    if ner:
        found.extend(ner_findings(text))
    return resolve_overlaps(found)
