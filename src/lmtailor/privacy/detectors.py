"""PII detectors: regexes that find candidates, validators (checksums, ranges, context) that keep the real ones.

`scan(text)` runs every detector and resolves overlaps: when two findings overlap, the one of the more
specific type wins (a checksum-validated IBAN over the digits a phone pattern also sees), then the longer.
The regex layer is always on; `scan(text, ner=True)` adds person names and places from an optional NER
backend (`lmtailor.privacy.ner`), which needs `presidio-analyzer` or `spacy` with an English model installed.
`ScanOptions` carries the choices a user makes: the phone region(s) and whether documentation domains count.

Types: EMAIL, PHONE, CREDIT_CARD, IBAN, IP_ADDRESS, URL_SECRET (the credentials or token inside a URL),
SECRET (API keys, tokens, passwords, private keys), DATE_OF_BIRTH (a date next to "born", "DOB", ...),
NATIONAL_ID (US SSN, UK NINO, French INSEE/NIR, Spanish DNI/NIE, Italian codice fiscale), and with NER:
PERSON, LOCATION.

Every detector runs in time linear in its input: a text is scanned by thousands of patterns' worth of work
per record, and one hostile or merely odd record (`a.a.a.…`, a run of digits) must not stall a whole scrub.
So no pattern has an unbounded repeat that a failed match can re-walk from many start positions: repeats are
bounded, or start only where a lookbehind says a run begins, and pairings that need an unbounded gap (a private
key's BEGIN and END lines) search for the END once instead of a lazy any-character repeat. tests/test_privacy.py
times every detector on 200 KB adversarial lines against an ordinary one.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers

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


@dataclass(frozen=True)
class ScanOptions:
    """The scanner's choices.

    Attributes:
        phone_regions: ISO 3166 region codes whose national formats (no "+country") count as phone numbers;
            numbers written with their country code are found whatever the region.
        documentation_emails: count addresses at documentation domains (example.com/.org/.net, .example, .test,
            .invalid, .localhost) as PII. On by default: people paste their real address next to a made-up
            one, and a test fixture's address in training data is still an address a model learns to emit.
    """

    phone_regions: tuple[str, ...] = ("US",)
    documentation_emails: bool = True

    @classmethod
    def create(cls, phone_region: str = "US", documentation_emails: bool = True) -> ScanOptions:
        """Options from the user's settings; `phone_region` may list several regions: "DE,FR".

        Raises:
            ConfigError: a region phonenumbers does not know.
        """
        regions = tuple(r.strip().upper() for r in phone_region.split(",") if r.strip())
        for r in regions:
            if r not in phonenumbers.SUPPORTED_REGIONS:
                close = sorted(x for x in phonenumbers.SUPPORTED_REGIONS if x[0] == r[:1])[:8]
                raise ConfigError(f"unknown phone region '{r}'",
                                  "use an ISO 3166 alpha-2 code such as US, GB, DE, FR, ES, AU"
                                  + (f"; starting with {r[:1]}: {', '.join(close)}" if close else ""))
        return cls(regions or ("US",), documentation_emails)


DEFAULT_OPTIONS = ScanOptions()
Detector = Callable[[str, ScanOptions], Iterator[Finding]]

# ---- helpers --------------------------------------------------------------------------------------------------

# Words before a number that say it is a reference, not a person's number ("Order #555-123-4567").
_NOT_PII_BEFORE = re.compile(
    r"(?:\b(?:order|invoice|ticket|ref(?:erence)?|case|tracking|build|version|ver|release|sku|part|po|txn|"
    r"transaction|isbn|serial|batch|lot|job|pr|issue|bug|run|shipment|parcel|receipt|confirmation|item|"
    r"bestellung|rechnung|commande|facture|pedido|factura|ordine|fattura|pratica|vorgang|operación|référence)"
    r"\s*(?:#|no\.?|nr\.?|n[°º]|num(?:ber|éro|ero)?|id)?\s*(?:is\s+|was\s+)?[:#.=]?\s*|#)$",
    re.IGNORECASE,
)
# "4371 0364 2859 2802": a match that starts inside a longer group of numbers is part of that number.
_INSIDE_NUMBER = re.compile(r"\b[A-Z0-9]*\d[A-Z0-9]*[ \-]$")


def _reference_before(text: str, start: int, window: int = 30) -> bool:
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


def find_phones(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for c in _PHONE_CANDIDATE.finditer(text):
        cand = c.group()
        digits = len(_digits(re.split(r"[x#]|ext", cand)[0]))
        # Numbers have 7 to 15 digits (E.164); checking that here keeps phonenumbers off most digit clusters.
        if not 7 <= digits <= 17 or _NOT_A_PHONE.fullmatch(cand) or _reference_before(text, c.start()):
            continue
        # "00" is the international prefix almost everywhere (not in North America): read it as "+".
        texts = [(cand, 0)] + ([("+" + cand[2:], 1)] if cand.startswith("00") else [])
        found: list[tuple[int, int]] = []
        for region in options.phone_regions:
            for t, shift in texts:
                for m in phonenumbers.PhoneNumberMatcher(t, region, leniency=phonenumbers.Leniency.VALID):
                    found.append((m.start + shift if m.start else 0, m.end + shift))
                if found:
                    break
        for start, end in sorted(set(found), key=lambda se: (se[0], -se[1])):
            if any(s <= start < e for s, e in found if (s, e) != (start, end) and e - s > end - start):
                continue  # inside a longer number another region read
            value = text[c.start() + start:c.start() + end]
            kind = "international" if value.startswith(("+", "00", "(+")) else "national"
            yield Finding(PHONE, c.start() + start, c.start() + end, value, kind)


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
        digits = _digits(value)
        if not 12 <= len(digits) <= 19 or len(set(re.findall(r"[ \-]", value))) > 1:
            continue
        sizes = [len(g) for g in re.split(r"[ \-]", value)]
        if len(sizes) > 1 and sizes not in ([4, 4, 4, 4], [4, 6, 5], [4, 6, 4], [4, 4, 4, 4, 3]):
            continue
        if len(sizes) > 1 and _INSIDE_NUMBER.search(text[max(0, m.start() - 8):m.start()]):
            continue
        kind = next((name for name, p in _CARD_PREFIXES if p.match(digits)), None)
        if kind is None or not luhn_ok(digits) or _reference_before(text, m.start()):
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


# ---- URLs with credentials or tokens --------------------------------------------------------------------------

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]{1,15}://[^\s<>\"'`]+", re.ASCII)
_URL_PARAM = re.compile(r"[?&#;]([A-Za-z0-9_.\-]+)=([^&#\s]+)")
_SECRET_PARAMS = {
    "token", "access_token", "refresh_token", "id_token", "auth", "auth_token", "authtoken", "api_key", "apikey",
    "api-key", "key", "secret", "client_secret", "password", "passwd", "pwd", "pass", "sig", "signature",
    "x-amz-signature", "x-amz-security-token", "x-amz-credential", "session", "sessionid", "session_id", "sid",
    "jwt", "private_token", "code", "otp", "access_key", "secret_key", "sas", "sv_token",
}


def find_url_secrets(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    for m in _URL.finditer(text):
        url = m.group().rstrip(".,;:!?)]}'\"")
        base = m.start()
        scheme_end = url.index("://") + 3
        # Userinfo is everything before an "@" that comes before the path; a raw "#" in a password is common.
        auth = re.match(r"([^/?\s]+)@", url[scheme_end:])
        if auth:
            userinfo = auth.group(1)
            user, _, password = userinfo.partition(":")
            # A token as user name (`https://<token>@host`) counts; `user:redacted` (a placeholder) does not.
            if not _PLACEHOLDER_VALUE.match(password) if password else \
                    len(user) >= 20 and shannon_entropy(user) >= 3.5:
                start = base + scheme_end
                yield Finding(URL_SECRET, start, start + len(userinfo), userinfo, "userinfo")
        for p in _URL_PARAM.finditer(url, scheme_end):
            name, value = p.group(1).lower(), p.group(2)
            if name in _SECRET_PARAMS and len(value) >= (8 if name in ("code", "sid", "key", "sig") else 6) and \
                    not _PLACEHOLDER_VALUE.match(value):
                yield Finding(URL_SECRET, base + p.start(2), base + p.end(2), value, name)


# ---- API keys and secrets -------------------------------------------------------------------------------------

_KEY_PATTERNS = [
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
    ("bearer", re.compile(r"(?i:\b(?:bearer|basic|token)\s{1,8})(?P<val>[A-Za-z0-9\-._~+/]{20,}=*)")),
]
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z]{1,20} ){0,4}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z]{1,20} ){0,4}PRIVATE KEY(?: BLOCK)?-----")
# A cloud secret access key written alone: 40 characters of base64, mixed case and digits, random-looking.
# (Git SHAs are 40 characters too, but hex; base64 of 30 random bytes has about 4.9 bits per character.)
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")

# Words that announce a secret, in the languages the scanner knows; each maps to how its value is judged.
_PASSWORD_WORDS = ("password", "passwd", "pwd", "passphrase", "passwort", "kennwort", "contraseña", "contrasena",
                   "clave", "mot de passe", "mdp", "senha", "wachtwoord", "hasło", "lösenord", "パスワード", "暗証番号",
                   "密码", "비밀번호")
_KEY_WORDS = ("api[_\\-]?key", "apikey", "secret", "token", "credentials?", "private[_\\-]?key", "access[_\\-]?key",
              "auth[_\\-]?key", "key", "pin")
# `api_key = "..."`, `password: hunter2`, `my password is Tr0ub4dor&3`, `Passwort lautet …`, `パスワードは…`.
# The keyword is found where it stands (no unbounded identifier prefix before it, which re-walked every long
# `a_b_c…` run from each of its starts); the rest of the identifier is at most 40 characters.
_ASSIGNED = re.compile(
    r"(?i)(?P<word>" + "|".join(_PASSWORD_WORDS + _KEY_WORDS) + r")(?P<tail>[\w\-]{0,40})[\"']?"
    r"(?:\s{0,3}(?:=>|:=|[:=：])\s{0,3}|\s{1,3}(?:is|was|=|lautet|ist|war|es|era|est|était|è|é|:)\s{1,3}"
    r"(?:now\s{1,3}|jetzt\s{1,3}|ahora\s{1,3}|maintenant\s{1,3}|ora\s{1,3})?|は|:)"
    r"(?P<q>[\"']?)(?P<val>[!#-&(-+\--:=?-_a-~]{4,200})", re.ASCII
)
# `$API_TOKEN`, `${token}`: a reference to a variable, not its value (`$S0nB4nu` is a password that starts with $).
_PLACEHOLDER_VALUE = re.compile(r"^(?:\*+|x+|X+|\.+|<[^>]*>|(?-i:\$[A-Z_][A-Z0-9_]*)|\$\{\w+\}|%\w+%|\{\{.*\}\}|"
                                r"null|none|true|false|"
                                r"redacted(?:_[0-9a-f]{8,32})?|hidden|changeme|required|optional|string|example|"
                                r"\[.*\])$", re.IGNORECASE)


def _looks_secret(word: str, value: str) -> bool:
    word = word.lower()
    if _PLACEHOLDER_VALUE.match(value) or value.startswith("<"):
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    if word in _PASSWORD_WORDS:
        # A password can be short and low in entropy, but a plain lowercase word ("reset", "expired") is prose.
        return len(value) >= 6 and classes >= 2 and not re.fullmatch(r"[A-Za-z]+[.!?]?", value)
    if word == "pin":
        return bool(re.fullmatch(r"\d{4,8}", value))
    return len(value) >= 16 and classes >= 2 and shannon_entropy(value) >= 3.0 and not value.replace(".", "").isdigit()


def _private_keys(text: str) -> Iterator[Finding]:
    """PEM private key blocks; each END is looked for once, so many BEGIN lines without an END stay linear."""
    pos = 0
    while (begin := _PEM_BEGIN.search(text, pos)) is not None:
        end = _PEM_END.search(text, begin.end())
        if end is None:
            return
        yield Finding(SECRET, begin.start(), end.end(), text[begin.start():end.end()], "private_key")
        pos = end.end()


def _aws_secret_ok(value: str) -> bool:
    return (sum(c.isupper() for c in value) >= 3 and sum(c.islower() for c in value) >= 3
            and sum(c.isdigit() for c in value) >= 1 and value.count("/") + value.count("+") <= 4
            and shannon_entropy(value) >= 4.3)


def find_secrets(text: str, options: ScanOptions = DEFAULT_OPTIONS) -> Iterator[Finding]:
    yield from _private_keys(text)
    for kind, pattern in _KEY_PATTERNS:
        for m in pattern.finditer(text):
            start, end = (m.start("val"), m.end("val")) if "val" in pattern.groupindex else (m.start(), m.end())
            yield Finding(SECRET, start, end, text[start:end], kind)
    for m in _AWS_SECRET.finditer(text):
        if _aws_secret_ok(m.group()):
            yield Finding(SECRET, m.start(), m.end(), m.group(), "aws_secret_key")
    for m in _ASSIGNED.finditer(text):
        value = m.group("val")
        # The identifier the keyword sits in, up to 40 characters back: `?my_api_key=` is a URL parameter.
        before = re.search(r"[\w.\-]{0,40}$", text[max(0, m.start() - 40):m.start()])
        ident_start = m.start() - len(before.group()) if before else m.start()
        word = m.group("word").lower()
        if "://" in value or text[ident_start - 1:ident_start] in ("?", "&"):
            continue  # URLs and their query parameters are find_url_secrets' job
        value = value.rstrip(".)") if m.group("q") else value.rstrip(".,;:!?)]}")
        canonical = next((w for w in _PASSWORD_WORDS if w == word), None) or \
            ("pin" if word == "pin" else "key")
        if _looks_secret(canonical, value):
            yield Finding(SECRET, m.start("val"), m.start("val") + len(value), value, "assigned")


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
    for m in _CODICE_FISCALE.finditer(text):
        if codice_fiscale_ok(m.group()):
            yield Finding(NATIONAL_ID, m.start(), m.end(), m.group(), "it_codice_fiscale")


# ---- optional NER layer ---------------------------------------------------------------------------------------

def ner_findings(text: str) -> Iterator[Finding]:
    """PERSON and LOCATION findings from the NER backend (lmtailor.privacy.ner).

    Raises:
        ConfigError: no backend is installed (the message says what to install).
    """
    from lmtailor.privacy.ner import ner_backend

    for label, start, end in ner_backend()(text):
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


def scan(text: str, types: tuple[str, ...] | None = None, ner: bool = False,
         options: ScanOptions | None = None) -> list[Finding]:
    """Every piece of PII in `text`, overlaps resolved, in order.

    Args:
        text: any text.
        types: restrict to these regex types (default: all of REGEX_TYPES).
        ner: also run the NER backend for PERSON and LOCATION.
        options: phone regions and whether documentation-domain e-mails count (default: `ScanOptions()`).

    Returns:
        Non-overlapping findings sorted by start offset.

    Raises:
        ConfigError: `ner` is set but no NER backend is installed.
    """
    found: list[Finding] = []
    for name in types or REGEX_TYPES:
        found.extend(DETECTORS[name](text, options or DEFAULT_OPTIONS))
    if ner:
        found.extend(ner_findings(text))
    return resolve_overlaps(found)
