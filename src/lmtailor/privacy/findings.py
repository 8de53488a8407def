"""What every PII detector shares: the finding types, `Finding`, the user's `ScanOptions`, and the small checks
(reference words before a number, digits, entropy, Luhn) several detector families use.

The detectors live in one module per family (contact: e-mail and phone; identifiers: cards, IBANs, national IDs
and IP addresses; credentials: secrets and URL credentials; dates: dates of birth); `detectors` runs them all.
"""

from __future__ import annotations

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
INSIDE_NUMBER = re.compile(r"\b[A-Z0-9]*\d[A-Z0-9]*[ \-]$")


def reference_before(text: str, start: int, window: int = 30) -> bool:
    before = text[max(0, start - window):start]
    return bool(_NOT_PII_BEFORE.search(before) or re.search(r"\d[ \-]$", before))


def only_digits(s: str) -> str:
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
