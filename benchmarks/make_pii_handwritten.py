"""Write the hand-written PII regression set tests/data/pii_handwritten.jsonl (deterministic: same seed, same file).

Its templates and values were written by the same hands as the detectors, so its figures say the detectors still do
what they were built to do, not how well they generalize: benchmarks/make_pii_eval.py (faker, several locales) is
the held-out measure.

Every snippet is synthetic: support tickets, emails, log lines and chat turns written from templates, with PII of
every regex type planted at known offsets, plus hard negatives (order numbers, version strings, git hashes,
timestamps, UUIDs, MAC addresses, prices, placeholders, checksum-failing look-alikes) that must not be flagged.

Each line: {"id": "ticket-0007", "kind": "ticket", "text": "...", "spans": [{"type", "start", "end", "value"}]}.

    python benchmarks/make_pii_handwritten.py     # writes tests/data/pii_handwritten.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path

Piece = tuple[str, list[tuple[int, int, str]]]  # text, labeled sub-spans (start, end, type) within it

FIRST = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
LAST = ["Smith", "Garcia", "Müller", "Nakamura", "Okafor", "Rossi", "Dubois", "Kowalski", "Larsen", "Silva", "Chen",
        "Patel", "OBrien", "Novak", "Haddad", "Jensen", "Moreau", "Fischer", "Costa", "Ivanova"]
DOMAINS = ["acme.io", "globex.com", "initech.co.uk", "umbrella-corp.de", "mail.hooli.com", "gmail.com",
           "outlook.fr", "proton.me", "stark-industries.net", "wayne.enterprises", "yahoo.co.jp", "web.de"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


class Gen:
    """Random PII values and hard negatives, all from one seeded RNG."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def digits(self, n: int) -> str:
        return "".join(self.r.choice(string.digits) for _ in range(n))

    def alnum(self, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def name(self) -> tuple[str, str]:
        return self.r.choice(FIRST), self.r.choice(LAST)

    # ---- positives -----------------------------------------------------------------------------------------------

    def email(self) -> str:
        first, last = self.name()
        first, last = first.lower(), last.lower().replace("ü", "u")
        local = self.r.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}{self.digits(2)}",
                               f"{first}+support", f"{last}.{first[0]}", f"{first}{self.digits(4)}"])
        email = f"{local}@{self.r.choice(DOMAINS)}"
        return email.upper() if self.r.random() < 0.05 else email

    def phone(self) -> str:
        d = self.digits
        nxx = lambda: str(self.r.randint(2, 9)) + d(2)  # noqa: E731
        return self.r.choice([
            f"+44 20 7946 {d(4)}", f"+44 7700 900{d(3)}", f"+44 (0)161 496 {d(4)}", f"+1 ({nxx()}) 555-{d(4)}",
            f"+1-{nxx()}-555-{d(4)}", f"({nxx()}) {nxx()}-{d(4)}", f"{nxx()}-{nxx()}-{d(4)}", f"{nxx()}.{nxx()}.{d(4)}",
            f"+49 30 {d(7)}", f"+49 (0)89 {d(4)} {d(4)}", f"+49 151 {d(8)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
            f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}", f"07700 900{d(3)}", f"020 7946 {d(4)}", f"030 {d(7)}",
            f"+91 98{d(3)} {d(5)}", f"+61 2 {d(4)} {d(4)}", f"+81 3-{d(4)}-{d(4)}", f"+34 612 {d(3)} {d(3)}",
            f"+31 20 {d(3)} {d(4)}", f"01 {d(2)} {d(2)} {d(2)} {d(2)}", f"+353 1 {d(3)} {d(4)}",
        ])

    def card(self) -> str:
        prefix, length = self.r.choice([("4", 16), ("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("37", 15),
                                         ("34", 15), ("6011", 16), ("3530", 16)])
        body = prefix + self.digits(length - len(prefix) - 1)
        check = next(c for c in string.digits if _luhn_ok(body + c))
        num = body + check
        groups = [num[:4], num[4:10], num[10:]] if length == 15 else [num[i:i + 4] for i in range(0, 16, 4)]
        return self.r.choice([" ", "-", ""]).join(groups)

    def iban(self) -> str:
        country, spec = self.r.choice([("DE", "n18"), ("GB", "a4n14"), ("FR", "n23"), ("NL", "a4n10"),
                                       ("ES", "n20"), ("IT", "a1n22"), ("BE", "n12"), ("CH", "n17"),
                                       ("AT", "n16"), ("PL", "n24"), ("IE", "a4n14")])
        bban = ""
        for kind, count in ((spec[i], int(n)) for i, n in _spec_parts(spec)):
            bban += self.alnum(count, string.ascii_uppercase) if kind == "a" else self.digits(count)
        check = 98 - _mod97(bban + country + "00")
        compact = f"{country}{check:02d}{bban}"
        if self.r.random() < 0.6:
            return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
        return compact

    def ipv4(self) -> str:
        b, c, d = self.r.randint(0, 255), self.r.randint(0, 255), self.r.randint(1, 254)
        return self.r.choice([f"192.168.{c}.{d}", f"10.{b}.{c}.{d}", f"{self.r.randint(11, 223)}.{b}.{c}.{d}",
                              f"172.{self.r.randint(16, 31)}.{c}.{d}"])

    def ipv6(self) -> str:
        groups = [f"{self.r.randint(0, 0xffff):x}" for _ in range(8)]
        groups[0] = self.r.choice(["2001", "2a02", "fe80", "2607", "2001"])
        if self.r.random() < 0.5:
            return ":".join(groups)
        return f"{groups[0]}:{groups[1]}::{groups[6]}:{groups[7]}"

    def ip(self) -> str:
        return self.ipv6() if self.r.random() < 0.3 else self.ipv4()

    def password(self) -> str:
        return self.r.choice(["Tr0ub4dor&3", "hunter2!X", "S3cure#Pass", "Winter2024!", "P@ssw0rd99",
                              "correct-Horse-7", "qwerty!234", "Zx9$kLm2pQ"]) + self.digits(self.r.randint(0, 2))

    def token(self, n: int = 32) -> str:
        return self.alnum(n)

    def key(self) -> str:
        a = self.alnum
        return self.r.choice([
            "AKIA" + a(16, string.ascii_uppercase + string.digits),
            "ghp_" + a(36), "gho_" + a(36), "xoxb-" + self.digits(12) + "-" + self.digits(12) + "-" + a(24),
            "xoxp-" + self.digits(11) + "-" + a(24), "sk_live_" + a(24), "rk_live_" + a(24), "sk-proj-" + a(48),
            "sk-" + a(48), "AIza" + a(35, string.ascii_letters + string.digits + "_-"), "glpat-" + a(20),
            "hf_" + a(34), "npm_" + a(36),
        ])

    def dob(self) -> str:
        y, m, d = self.r.randint(1940, 2006), self.r.randint(1, 12), self.r.randint(1, 28)
        return self.r.choice([f"{d} {MONTHS[m - 1]} {y}", f"{MONTHS[m - 1]} {d}, {y}", f"{y}-{m:02d}-{d:02d}",
                              f"{d:02d}/{m:02d}/{y}", f"{m:02d}/{d:02d}/{y}", f"{d:02d}.{m:02d}.{y}",
                              f"{d}th of {MONTHS[m - 1]} {y}" if d not in (1, 2, 3, 21, 22, 23)
                              else f"{d} {MONTHS[m - 1][:3]} {y}"])

    def ssn(self) -> str:
        area = self.r.choice([n for n in range(1, 900) if n != 666])
        sep = self.r.choice(["-", "-", " "])
        return f"{area:03d}{sep}{self.r.randint(1, 99):02d}{sep}{self.r.randint(1, 9999):04d}"

    def nino(self) -> str:
        first = self.r.choice("ABCEGHJKLMNOPRSTWXYZ")
        second = self.r.choice("ABCEGHJKLMNPRSTWXYZ")
        while first + second in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}:
            second = self.r.choice("ABCEHJLMPRSW")
        d = self.digits(6)
        suffix = self.r.choice("ABCD")
        if self.r.random() < 0.5:
            return f"{first}{second} {d[:2]} {d[2:4]} {d[4:]} {suffix}"
        return f"{first}{second}{d}{suffix}"

    def insee(self) -> str:
        body = f"{self.r.choice('12')}{self.r.randint(40, 99):02d}{self.r.randint(1, 12):02d}" \
               f"{self.r.randint(1, 95):02d}{self.r.randint(1, 999):03d}{self.r.randint(1, 999):03d}"
        key = 97 - int(body) % 97
        if self.r.random() < 0.5:
            return f"{body[0]} {body[1:3]} {body[3:5]} {body[5:7]} {body[7:10]} {body[10:13]} {key:02d}"
        return f"{body}{key:02d}"

    def dni(self) -> str:
        n = self.r.randint(10_000_000, 99_999_999)
        return f"{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[n % 23]}"

    def national_id(self) -> tuple[str, str]:
        kind = self.r.choice(["ssn", "ssn", "nino", "insee", "dni"])
        return kind, getattr(self, kind)()

    # ---- hard negatives ------------------------------------------------------------------------------------------

    def hexs(self, n: int) -> str:
        return self.alnum(n, "0123456789abcdef")

    def timestamp(self) -> str:
        return f"2024-{self.r.randint(1, 12):02d}-{self.r.randint(1, 28):02d}T{self.r.randint(0, 23):02d}:" \
               f"{self.r.randint(0, 59):02d}:{self.r.randint(0, 59):02d}.{self.digits(3)}Z"

    def version(self) -> str:
        return self.r.choice([f"v{self.r.randint(0, 9)}.{self.r.randint(0, 30)}.{self.r.randint(0, 20)}",
                              f"{self.r.randint(1, 12)}.{self.r.randint(0, 9)}.{self.r.randint(0, 9)}",
                              f"version {self.r.randint(1, 20)}.{self.r.randint(0, 9)}.{self.r.randint(0, 99)}"
                              f".{self.r.randint(0, 255)}"])

    def uuid(self) -> str:
        h = self.hexs(32)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def mac(self) -> str:
        return ":".join(self.hexs(2).upper() for _ in range(6))

    def bad_luhn(self) -> str:
        while True:
            num = self.r.choice("4536") + self.digits(15)
            if not _luhn_ok(num):
                return " ".join(num[i:i + 4] for i in range(0, 16, 4))

    def bad_iban(self) -> str:
        compact = "DE" + "00" + self.digits(18)
        return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))

    def order_no(self) -> str:
        return self.r.choice([f"#{self.digits(3)}-{self.digits(3)}-{self.digits(4)}", f"INV-2024-{self.digits(5)}",
                              f"{self.digits(10)}", f"SO-{self.digits(8)}", f"#{self.digits(6)}"])


def _luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _mod97(s: str) -> int:
    return int("".join(str(int(c, 36)) for c in s)) % 97


def _spec_parts(spec: str) -> list[tuple[int, str]]:
    """'a4n14' -> [(0, '4'), (2, '14')]: index of the kind letter and its count."""
    out, i = [], 0
    while i < len(spec):
        j = i + 1
        while j < len(spec) and spec[j].isdigit():
            j += 1
        out.append((i, spec[i + 1:j]))
        i = j
    return out


# ---- templates ------------------------------------------------------------------------------------------------
# A template is a list of literal strings and slot callables; a slot returns a Piece.

Slot = Callable[[Gen], Piece]


def pii(type_: str, make: Callable[[Gen], str]) -> Slot:
    def slot(g: Gen) -> Piece:
        value = make(g)
        return value, [(0, len(value), type_)]
    return slot


def neg(make: Callable[[Gen], str]) -> Slot:
    return lambda g: (make(g), [])


def url_userinfo(g: Gen) -> Piece:
    user = g.r.choice(["admin", "deploy", "app", "svc_backup", g.name()[0].lower()])
    pw = g.password()
    host = g.r.choice(["db.internal", g.ipv4(), "git.acme.io", "ftp.globex.com", "redis-prod"])
    scheme = g.r.choice(["https", "postgres", "mysql", "ftp", "redis", "amqp"])
    head = f"{scheme}://"
    spans = [(len(head), len(head) + len(user) + 1 + len(pw), "URL_SECRET")]
    if host[0].isdigit():  # an IP host is an IP address too
        at = len(head) + len(user) + 1 + len(pw) + 1
        spans.append((at, at + len(host), "IP_ADDRESS"))
    return f"{head}{user}:{pw}@{host}/{g.r.choice(['prod', 'repo.git', 'backups', '0', 'vhost'])}", spans


def url_token(g: Gen) -> Piece:
    param = g.r.choice(["token", "access_token", "api_key", "apikey", "sig", "X-Amz-Signature", "key", "secret",
                        "session_id", "auth"])
    value = g.hexs(64) if param == "X-Amz-Signature" else g.token(g.r.randint(16, 40))
    base = g.r.choice(["https://api.globex.com/v2/export?format=csv&", "https://files.acme.io/d/report.pdf?",
                       "https://hooks.initech.co.uk/cb?id=42&", "http://internal-dash:8080/view?user=7&"])
    head = f"{base}{param}="
    return f"{head}{value}", [(len(head), len(head) + len(value), "URL_SECRET")]


def assigned_secret(g: Gen) -> Piece:
    kind = g.r.choice(["password", "api_key", "SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "client_secret", "pwd", "token"])
    if kind in ("password", "pwd"):
        value = g.password()
    elif kind == "AWS_SECRET_ACCESS_KEY":
        value = g.alnum(40, string.ascii_letters + string.digits + "/+")
    else:
        value = g.token(g.r.randint(20, 40))
    head = g.r.choice([f"{kind}: ", f"{kind}={'' if kind.isupper() else ''}", f"{kind} = \"", f'"{kind}": "'])
    tail = '"' if head.endswith('"') else ""
    return f"{head}{value}{tail}", [(len(head), len(head) + len(value), "SECRET")]


def said_password(g: Gen) -> Piece:
    head = g.r.choice(["my password is ", "the new password is ", "temp password: ", "Password: "])
    value = g.password()
    return head + value, [(len(head), len(head) + len(value), "SECRET")]


def dob_phrase(g: Gen) -> Piece:
    head = g.r.choice(["born on ", "DOB: ", "date of birth: ", "D.O.B. ", "Date of birth ", "born ", "dob=",
                       "birthdate: ", "Geburtsdatum: "])
    value = g.dob()
    return head + value, [(len(head), len(head) + len(value), "DATE_OF_BIRTH")]


def national_id_phrase(g: Gen) -> Piece:
    kind, value = g.national_id()
    head = {"ssn": g.r.choice(["SSN ", "SSN: ", "social security number ", "ss# "]),
            "nino": g.r.choice(["NI number ", "National Insurance: ", "NINO "]),
            "insee": g.r.choice(["numéro de sécu ", "INSEE ", "NIR: "]),
            "dni": g.r.choice(["DNI ", "DNI: ", "NIF "])}[kind]
    return head + value, [(len(head), len(head) + len(value), "NATIONAL_ID")]


EMAIL_S = pii("EMAIL", Gen.email)
PHONE_S = pii("PHONE", Gen.phone)
CARD_S = pii("CREDIT_CARD", Gen.card)
IBAN_S = pii("IBAN", Gen.iban)
IP_S = pii("IP_ADDRESS", Gen.ip)
KEY_S = pii("SECRET", Gen.key)
NAME_S = neg(lambda g: " ".join(g.name()))  # names are NER territory, not scored here
TS_S = neg(Gen.timestamp)
VER_S = neg(Gen.version)
HASH_S = neg(lambda g: g.hexs(40))
SHORTHASH_S = neg(lambda g: g.hexs(7))
UUID_S = neg(Gen.uuid)
MAC_S = neg(Gen.mac)
ORDER_S = neg(Gen.order_no)
BADCARD_S = neg(Gen.bad_luhn)
BADIBAN_S = neg(Gen.bad_iban)
PRICE_S = neg(lambda g: f"${g.r.randint(1, 9)},{g.digits(3)}.{g.digits(2)}")
PORT_S = neg(lambda g: str(g.r.choice([22, 443, 5432, 6379, 8080, 9200])))
DATE_S = neg(lambda g: f"{g.r.randint(1, 28)} {g.r.choice(MONTHS)} 20{g.r.randint(20, 26)}")

TEMPLATES: dict[str, list[list[str | Slot]]] = {
    "ticket": [
        ["Customer ", NAME_S, " (", EMAIL_S, ") reports that order ", ORDER_S, " never arrived. Callback on ",
         PHONE_S, "."],
        ["Refund request for order ", ORDER_S, ": card ", CARD_S, " was charged twice on ", DATE_S, " (", PRICE_S,
         ")."],
        ["Please update payout account to IBAN ", IBAN_S, " for ", NAME_S, ". Old reference ", BADIBAN_S,
         " is closed."],
        ["User cannot log in from ", IP_S, " since the upgrade to ", VER_S, ". Session id ", UUID_S, "."],
        ["Identity check: ", NAME_S, ", ", dob_phrase, ", ", national_id_phrase, ". Verified by phone ", PHONE_S,
         "."],
        ["Leaked credential in ticket attachment: ", KEY_S, " (rotated). Build ", ORDER_S, " unaffected."],
        ["Ticket ", ORDER_S, ": customer pasted ", said_password, " into the chat, please reset it."],
        ["Webhook misconfigured, the URL contains credentials: ", url_userinfo, " -- see commit ", HASH_S, "."],
        ["Tracking number ", BADCARD_S, " shows delivered; customer says no. Contact: ", EMAIL_S, ", ", PHONE_S,
         "."],
        ["Update billing: new card ", CARD_S, ", billing email ", EMAIL_S, ". Device MAC ", MAC_S, "."],
        ["Escalation: payroll file for ", NAME_S, " shows ", national_id_phrase, " and IBAN ", IBAN_S, "."],
        ["Please delete my data. Email: ", EMAIL_S, ". I was ", dob_phrase, ". Invoice ", ORDER_S, "."],
    ],
    "email": [
        ["Hi ", NAME_S, ",\n\nplease call me back on ", PHONE_S, " or write to ", EMAIL_S,
         ".\n\nBest,\n", NAME_S],
        ["Dear team,\nthe transfer to ", IBAN_S, " failed on ", DATE_S, ". Our reference is ", ORDER_S,
         ".\nRegards"],
        ["Hello,\nhere are the staging credentials you asked for:\n", assigned_secret, "\nDelete this mail after."],
        ["Hi,\nyour download link: ", url_token, "\nIt expires on ", DATE_S, ".\nThanks"],
        ["Good morning,\nfor HR records: ", NAME_S, ", ", dob_phrase, ", mobile ", PHONE_S, ", ",
         national_id_phrase, ".\n"],
        ["Hi ", NAME_S, ",\nI paid with ", CARD_S, " but the receipt says ", BADCARD_S, ". Can you check? My number ",
         "is ", PHONE_S, ".\nCheers"],
        ["Team,\nv2 of the API is live (", VER_S, "). Keys for the sandbox: ", KEY_S, ".\nPing ", EMAIL_S,
         " with questions."],
        ["Bonjour,\nmerci de mettre à jour mon RIB: ", IBAN_S, ". Tél. ", PHONE_S, ".\nCordialement, ", NAME_S],
        ["Hi,\nforwarding from ", EMAIL_S, ": \"my SSN changed?\" Their file says ", national_id_phrase,
         ". Ticket ", ORDER_S, ".\n"],
        ["Hallo,\nbitte überweisen Sie an ", IBAN_S, ". ", dob_phrase, ". Telefon: ", PHONE_S, ".\n"],
    ],
    "log": [
        [TS_S, " INFO  auth: login ok user=", EMAIL_S, " ip=", IP_S, " session=", UUID_S],
        [TS_S, " WARN  http: GET ", url_token, " 200 from ", IP_S],
        [TS_S, " ERROR db: connection refused ", url_userinfo, " after 3 retries (port ", PORT_S, ")"],
        ["commit ", HASH_S, "\nAuthor: ", NAME_S, " <", EMAIL_S, ">\nDate:   ", TS_S,
         "\n\n    bump to ", VER_S],
        [TS_S, " DEBUG config loaded: ", assigned_secret, " region=eu-west-1 build=", SHORTHASH_S],
        [TS_S, " INFO  dhcp: lease ", IP_S, " to ", MAC_S, " (", SHORTHASH_S, ")"],
        [TS_S, " WARN  payments: card ", CARD_S, " declined, order ", ORDER_S, ", amount ", PRICE_S],
        [TS_S, " INFO  listening on 0.0.0.0:", PORT_S, " and 127.0.0.1:", PORT_S, ", peer ", IP_S],
        [TS_S, " ERROR ci: token leaked in job log: ", KEY_S, " (job ", ORDER_S, ", sha ", HASH_S, ")"],
        [TS_S, " INFO  sepa: payout queued iban=", IBAN_S, " ref=", ORDER_S, " sha256=", neg(lambda g: g.hexs(64))],
        [TS_S, " INFO  sms: sent OTP to ", PHONE_S, " trace=", UUID_S],
    ],
    "chat": [
        ["user: hey, my email is ", EMAIL_S, " and my phone is ", PHONE_S, "\nassistant: Thanks, I have updated "
         "your profile."],
        ["user: can you check why ", CARD_S, " was declined?\nassistant: I cannot see card details, please "
         "contact your bank."],
        ["user: here is my api key ", KEY_S, " why does it fail?\nassistant: Please revoke it; keys should never "
         "be shared."],
        ["user: I was ", dob_phrase, ", do I qualify?\nassistant: Yes, you are eligible for the senior plan."],
        ["user: my ", national_id_phrase, " is on file, right?\nassistant: I cannot confirm identity numbers "
         "here."],
        ["user: the server at ", IP_S, " is down since ", VER_S, "\nassistant: Restart it and check the logs at ",
         TS_S, "."],
        ["user: use this link ", url_token, "\nassistant: That link contains a token; I will not open it."],
        ["user: set the db url to ", url_userinfo, "\nassistant: Done, but store credentials in a secret manager."],
        ["user: wire it to ", IBAN_S, " please\nassistant: The transfer is scheduled for ", DATE_S, "."],
        ["user: ", said_password, " -- is that strong enough?\nassistant: Do not share passwords with anyone."],
        ["user: my order ", ORDER_S, " and invoice ", ORDER_S, " are missing, commit ", SHORTHASH_S,
         " broke it?\nassistant: I will check with the warehouse."],
        ["user: reset instructions were sent to ", EMAIL_S, "?\nassistant: Yes, the password reset link expires "
         "in 24 hours. Your token expired at ", TS_S, "."],
    ],
}

# Extra hard negatives with no PII at all: prose that mentions the trigger words.
NEGATIVE_ONLY: list[list[str | Slot]] = [
    ["Password reset requested for account ", ORDER_S, "; the api key is stored in the vault, not here."],
    ["Release notes ", VER_S, ": fixed token refresh, secret rotation and key: value parsing. Commit ", HASH_S, "."],
    ["Build ", neg(lambda g: f"{g.r.randint(1, 9)}.{g.r.randint(0, 9)}.{g.r.randint(0, 9)}.{g.r.randint(0, 99)}"),
     " deployed at ", TS_S, " to cluster ", UUID_S, "."],
    ["Order ", neg(lambda g: f"#{g.digits(3)}-{g.digits(3)}-{g.digits(4)}"), " shipped; tracking ", BADCARD_S,
     ", total ", PRICE_S, "."],
    ["password: ********  api_key=<YOUR_API_KEY>  token=${API_TOKEN}  # placeholders in the sample config"],
    ["Interface eth0 ", MAC_S, " up; netmask 255.255.255.0; gateway unreachable at ", TS_S, "."],
    ["Meeting on ", DATE_S, " at 10:30; agenda item ", ORDER_S, "; see icon@2x.png and git@github.com:acme/app.git"],
    ["Invoice date ", DATE_S, ", due ", DATE_S, ", amount ", PRICE_S, ", account ref ", BADIBAN_S, "."],
]


def render(template: list[str | Slot], g: Gen) -> tuple[str, list[dict[str, object]]]:
    text, spans = "", []
    for part in template:
        if isinstance(part, str):
            text += part
            continue
        piece, labels = part(g)
        for start, end, type_ in labels:
            spans.append({"type": type_, "start": len(text) + start, "end": len(text) + end,
                          "value": piece[start:end]})
        text += piece
    return text, spans


def build(n: int = 360, seed: int = 7) -> list[dict[str, object]]:
    g = Gen(seed)
    rows: list[dict[str, object]] = []
    kinds = list(TEMPLATES)
    for i in range(n):
        if i % 9 == 8:
            kind, template = "negative", NEGATIVE_ONLY[(i // 9) % len(NEGATIVE_ONLY)]
        else:
            kind = kinds[i % len(kinds)]
            template = TEMPLATES[kind][(i // len(kinds)) % len(TEMPLATES[kind])]
        text, spans = render(template, g)
        rows.append({"id": f"{kind}-{i:04d}", "kind": kind, "text": text, "spans": spans})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"
                                         / "pii_handwritten.jsonl"))
    ap.add_argument("-n", type=int, default=360)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rows = build(a.n, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = Counter(s["type"] for r in rows for s in r["spans"])  # type: ignore[index, union-attr]
    print(f"wrote {len(rows)} snippets to {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
