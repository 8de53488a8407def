"""Privacy: PII detectors (table-driven), scrubbing modes and audits, the labeled evaluation set, canaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmtailor.data.example import Example
from lmtailor.errors import ConfigError, DataError
from lmtailor.privacy import detectors as det
from lmtailor.privacy.detectors import luhn_ok, scan
from lmtailor.privacy.scrub import (
    SCRUBBER_VERSION,
    Scrubber,
    cli_scan,
    cli_scrub,
    mask,
    scan_file,
    scrub_examples,
    scrub_file,
)

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "tests" / "data" / "pii_eval.jsonl"
HANDWRITTEN = ROOT / "tests" / "data" / "pii_handwritten.jsonl"

POSITIVES = [
    (det.EMAIL, "write to jane.doe+tickets@acme-corp.co.uk today", "jane.doe+tickets@acme-corp.co.uk"),
    (det.EMAIL, "Author: Kemi Okafor <KEMI@GLOBEX.COM>", "KEMI@GLOBEX.COM"),
    (det.PHONE, "call +44 20 7946 0958 now", "+44 20 7946 0958"),
    (det.PHONE, "office (650) 253-0000.", "(650) 253-0000"),
    (det.PHONE, "Berlin: +49 30 1234567", "+49 30 1234567"),
    (det.PHONE, "tel +33 1 23 45 67 89", "+33 1 23 45 67 89"),
    (det.PHONE, "US 415.555.0132 x12", "415.555.0132 x12"),  # the extension is part of the number
    (det.CREDIT_CARD, "card 4111 1111 1111 1111 expired", "4111 1111 1111 1111"),
    (det.CREDIT_CARD, "amex 3782-822463-10005", "3782-822463-10005"),
    (det.CREDIT_CARD, "paid with 5555555555554444.", "5555555555554444"),
    (det.IBAN, "IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
    (det.IBAN, "to GB82WEST12345698765432", "GB82WEST12345698765432"),
    (det.IP_ADDRESS, "from 203.0.113.9:443", "203.0.113.9"),
    (det.IP_ADDRESS, "peer 2a02:6b8:85a3::8a2e:370:7334 closed", "2a02:6b8:85a3::8a2e:370:7334"),
    (det.IP_ADDRESS, "gateway 2001:db8::1 is down", "2001:db8::1"),  # compressed, and a documentation range
    (det.IP_ADDRESS, "link fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a"),
    (det.IP_ADDRESS, "dial [2a02:6b8::2:242]:443 now", "2a02:6b8::2:242"),
    (det.URL_SECRET, "db postgres://app:S3cret#1@db.internal/prod", "app:S3cret#1"),
    (det.URL_SECRET, "GET https://x.io/a?id=1&access_token=abcDEF123456xyz HTTP", "abcDEF123456xyz"),
    (det.SECRET, "aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    (det.SECRET, "token ghp_" + "a1B2" * 9 + " leaked", "ghp_" + "a1B2" * 9),
    (det.SECRET, "slack xoxb-123456789012-123456789012-abcdefABCDEF123456abcdef", None),
    (det.SECRET, "stripe sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", None),
    (det.SECRET, "openai sk-proj-" + "Ab1" * 16, None),
    (det.SECRET, "maps AIzaSyA-" + "b" * 31 + " ok", "AIzaSyA-" + "b" * 31),
    (det.SECRET, 'config: api_key = "9fK2mQ7xLp4Rt8Zw1Vb6"', "9fK2mQ7xLp4Rt8Zw1Vb6"),
    (det.SECRET, "my password is Tr0ub4dor&3 ok", "Tr0ub4dor&3"),
    (det.SECRET, "mein Passwort lautet Sonne!2024, bitte ändern", "Sonne!2024"),
    (det.SECRET, "mi contraseña es Gato#1234 y no funciona", "Gato#1234"),
    (det.SECRET, "mon mot de passe est Chat$9876 depuis hier", "Chat$9876"),
    (det.SECRET, "la password è Cane%5432 ma non entra", "Cane%5432"),
    (det.SECRET, "パスワードはAbc12345です", "Abc12345"),
    (det.SECRET, "keys: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    (det.URL_SECRET, "DSN=mysql://ana:$S0nB4nu1x@db.acme.io/app", "ana:$S0nB4nu1x"),
    (det.SECRET, "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", None),
    (det.DATE_OF_BIRTH, "she was born on 12 March 1985 in Lyon", "12 March 1985"),
    (det.DATE_OF_BIRTH, "DOB: 03/12/1985", "03/12/1985"),
    (det.DATE_OF_BIRTH, "D.O.B. March 12, 1985", "March 12, 1985"),
    (det.DATE_OF_BIRTH, "Claire, née le 3 février 1985 à Lyon", "3 février 1985"),
    (det.DATE_OF_BIRTH, "Jean, né le 21 août 1979", "21 août 1979"),
    (det.DATE_OF_BIRTH, "Herr Maier, geboren am 5. März 1985", "5. März 1985"),
    (det.DATE_OF_BIRTH, "Fecha de nacimiento: 5 de marzo de 1985", "5 de marzo de 1985"),
    (det.DATE_OF_BIRTH, "Luca, nato il 5 marzo 1985 a Roma", "5 marzo 1985"),
    (det.DATE_OF_BIRTH, "生年月日：1985年3月5日", "1985年3月5日"),
    (det.EMAIL, "write to jane.doe (at) acme (dot) com please", "jane.doe (at) acme (dot) com"),
    (det.EMAIL, "mail: jane [at] acme [dot] co [dot] uk", "jane [at] acme [dot] co [dot] uk"),
    (det.EMAIL, "reach me at jdoe at acme dot com", "jdoe at acme dot com"),
    (det.EMAIL, "contact support@example.com for the demo", "support@example.com"),  # documentation domains count
    (det.EMAIL, "連絡先はtaro@acme.co.jpです", "taro@acme.co.jp"),
    (det.NATIONAL_ID, "SSN 536-22-1234", "536-22-1234"),
    (det.NATIONAL_ID, "ssn: 536221234", "536221234"),
    (det.NATIONAL_ID, "NINO AB 12 34 56 C", "AB 12 34 56 C"),
    (det.NATIONAL_ID, "NIR 1 85 05 78 006 084 91", "1 85 05 78 006 084 91"),
    (det.NATIONAL_ID, "DNI 12345678Z", "12345678Z"),
    (det.NATIONAL_ID, "Codice fiscale: RSSMRA85T10A562S", "RSSMRA85T10A562S"),
]

NEGATIVES = [
    "Order #555-234-5678 shipped",  # a phone-shaped order number
    "released v2.14.3 and version 10.2.0.1",  # versions, one IPv4-shaped
    "commit 3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f",  # a git hash
    "2024-03-15T12:30:45.123Z worker started at 12:30:45",  # timestamps
    "session 550e8400-e29b-41d4-a716-446655440000",  # a UUID
    "eth0 00:1A:2B:3C:4D:5E up, netmask 255.255.255.0",  # a MAC address and a netmask
    "listening on 127.0.0.1:8080 and 0.0.0.0:22 and ::1",  # loopback and any
    "tracking 4111 1111 1111 1112",  # fails Luhn
    "account ref DE00 1234 5678 9012 3456 78",  # fails the IBAN checksum
    "SSN 000-12-3456 and 666-12-3456 are never issued",
    "password reset requested; token expired; api key is in the vault",
    "password: ********  api_key=<YOUR_API_KEY>  token=${API_TOKEN}",
    "see icon@2x.png and git@github.com:acme/app.git",
    "meeting on 12 March 2024 about invoice 2024-01-15",  # dates, not of birth
    "total $1,234.56 for 3 items, port 5432",
    "upgrade to 9.4.2.1 today, versión 9.4.2.1, versione 10.2.0.1, バージョン9.4.2.1, 9.4.2.1 update",
    "Rückruf am 02.10.2027 um 10 Uhr",  # a German date phonenumbers reads as a valid number
    "look at this dot matrix printer",  # "at" and "dot" without a domain
    "sha 3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f",
    "Codice fiscale RSSMRA85T10A562T",  # wrong check letter
    "born on 30 February 1985",  # not a date
]


@pytest.mark.parametrize(("type_", "text", "value"), POSITIVES, ids=[f"{t}-{i}" for i, (t, *_ ) in
                                                                      enumerate(POSITIVES)])
def test_detector_finds(type_: str, text: str, value: str | None) -> None:
    found = [f for f in scan(text) if f.type == type_]
    assert found, f"no {type_} in {text!r}: {scan(text)}"
    if value is not None:
        assert found[0].value == value
    assert text[found[0].start:found[0].end] == found[0].value


@pytest.mark.parametrize("text", NEGATIVES)
def test_hard_negatives_are_not_flagged(text: str) -> None:
    assert scan(text) == []


def test_overlaps_resolve_to_the_specific_type() -> None:
    text = "pay DE89 3704 0044 0532 0130 00, creds https://bob:pw12345@mail.acme.io/x"
    found = scan(text)
    assert [f.type for f in found] == [det.IBAN, det.URL_SECRET]  # not PHONE inside the IBAN, not EMAIL in the URL
    starts = [f.start for f in found]
    assert starts == sorted(starts)


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_ner_is_optional_and_says_what_to_install() -> None:
    from lmtailor.privacy.ner import ner_available

    if ner_available():
        pytest.skip("an NER backend is installed here")
    with pytest.raises(ConfigError, match="pip install"):
        scan("Anna Smith lives in Paris", ner=True)


def _bench(name: str):  # noqa: ANN202
    from conftest import load_benchmark

    return load_benchmark(name)


def test_faker_eval_set_meets_targets() -> None:
    """The held-out faker set (7 locales): every regex type planted, labels point at what they say; recall >= 0.95
    and precision >= 0.90 for every type, PHONE included (faker makes up numbers phonenumbers calls invalid, in
    unassigned area codes: those count next to a phone word); every valid number found."""
    rows = [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 600 and len({r["locale"] for r in rows}) >= 6
    assert {s["type"] for r in rows for s in r["spans"]} == set(det.REGEX_TYPES)
    for r in rows:
        for s in r["spans"]:
            assert r["text"][s["start"]:s["end"]] == s["value"]
    result = _bench("pii_eval").evaluate(rows)
    for t, s in result["per_type"].items():
        assert s["precision"] >= 0.90, (t, s, result["false_alarms"])
        assert s["recall"] >= 0.95, (t, s, result["misses"])
        if t == det.PHONE:
            assert s["recall_of_valid_numbers"] == 1.0, (s, result["misses"])


def test_handwritten_set_still_passes() -> None:
    mod = _bench("pii_eval")
    result = mod.evaluate(mod.load(HANDWRITTEN), region=mod.HANDWRITTEN_REGIONS)
    for t, s in result["per_type"].items():
        assert s["precision"] >= 0.90 and s["recall"] >= 0.95, (t, s, result["misses"])


def test_eval_set_is_reproducible(tmp_path: Path) -> None:
    import subprocess
    import sys

    faker = pytest.importorskip("faker")
    if EVAL_SET.with_suffix(".faker-version").read_text().strip() != faker.VERSION:
        pytest.skip(f"the set was written with another faker version than {faker.VERSION}")
    out = tmp_path / "pii_eval.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_pii_eval.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_text(encoding="utf-8") == EVAL_SET.read_text(encoding="utf-8")


# ---- options, linear time --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("region", "text", "value"), [
    ("GB", "mobile 07911 123456", "07911 123456"),
    ("FR", "appelle le 06 12 34 56 78 ce soir", "06 12 34 56 78"),
    ("FR", "tél. 01.23.45.67.89", "01.23.45.67.89"),
    ("ES", "llámame al 612 34 56 78", "612 34 56 78"),
    ("AU", "mobile 0412 345 678", "0412 345 678"),
    ("DE", "Tel. 030 12345678", "030 12345678"),
])
def test_phone_numbers_follow_the_region(region: str, text: str, value: str) -> None:
    found = [f for f in scan(text, options=det.ScanOptions.create(region)) if f.type == det.PHONE]
    assert [f.value for f in found] == [value] and not found[0].kind.endswith("_unverified")
    # Without a phone word, a number valid only in another region is not one; beside one it may be (the word's
    # language hints at its region, or the number has a length possible in the configured one).
    us = det.ScanOptions.create("US")
    assert value not in [f.value for f in scan(f"voir {value} ici", options=us)]
    assert all(f.value == value for f in scan(text, options=us))
    both = det.ScanOptions.create(f"US, {region.lower()}")
    assert [f.value for f in scan(text, options=both)] == [value]


@pytest.mark.parametrize("word", ["Tel.", "call me re", "contact:", "電話", "ruf an:"])
def test_a_phone_word_makes_possible_numbers_count_and_not_look_alikes(word: str) -> None:
    """Beside a phone word, a number of a possible length counts (unverified: its area code may be unassigned);
    versions, prices, grouped thousands, decimals, dates, ISBNs, hashes, ids and ports still do not."""
    us = det.ScanOptions.create("US")
    [f] = scan(f"{word} 460-444-3400", options=us)
    assert (f.value, f.kind) == ("460-444-3400", "national_unverified")
    assert scan("see 460-444-3400", options=us) == []  # not a valid US number, and nothing says it is a phone
    for look_alike in ["v2.14.1", "10.4.2.1 update", "$1,299.99", "1.234.567", "3.14159265", "2024-05-17",
                       "17.05.2024", "978-3-16-148410-0", "9783161484100", "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
                       "123e4567-e89b-12d3-a456-426614174000", "port 8080", "order 55512345"]:
        for region in ("US", "DE", "JP"):
            found = [f for f in scan(f"{word} {look_alike}", options=det.ScanOptions.create(region))
                     if f.type == det.PHONE]
            assert found == [], (region, look_alike, found)


def test_a_phone_word_hints_at_the_region_of_its_language() -> None:
    us = det.ScanOptions.create("US")
    for text, value in [("Telefon: 030 12345678", "030 12345678"), ("電話番号：090-1234-5678", "090-1234-5678"),
                        ("chiamami al 06 4567 8901", "06 4567 8901")]:
        [f] = scan(text, options=us)
        assert (f.value, f.kind) == (value, "national"), f  # valid in the hinted region, not merely possible
    assert scan("see 030 12345678", options=us) == []


def test_unknown_phone_region_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown phone region 'UK'"):
        det.ScanOptions.create("UK")


def test_documentation_domains_are_an_option() -> None:
    text = "write to ops@example.org, qa@foo.test or jane (at) demo (dot) example"
    assert len([f for f in scan(text) if f.type == det.EMAIL]) == 3
    assert scan(text, options=det.ScanOptions(documentation_emails=False)) == []


def _adversarial(n: int) -> dict[str, str]:
    import random

    rng = random.Random(0)

    def rep(unit: str) -> str:
        return (unit * (n // len(unit) + 1))[:n]

    digits = "".join(rng.choice("0123456789") + rng.choice(" -.") for _ in range(n // 2))[:n]
    return {"a.": rep("a."), "a-": rep("a-"), "1.": rep("1."), "digits": digits, "digit run": rep("7"),
            "key_": rep("key_"), "pem": rep("-----BEGIN RSA PRIVATE KEY-----\n"), "a@": rep("a@"), "0:": rep("0:"),
            "born": "born " + " " * n, "(1)": "".join(f"({rng.randrange(10)}) " for _ in range(n // 4))[:n],
            "obfuscated": rep("a (at) b (dot) "), "url": rep("http://a?b=c&"), "base64": rep("Ab1/"),
            "password": rep("password: "), "jwt": rep("eyJaaaaaaaa.")}


def test_every_detector_is_linear_on_adversarial_input() -> None:
    """200 KB of each hostile shape costs each detector a bounded multiple of 200 KB of prose, and four times the
    input about four times the time (the old secret pattern took 27 s on 20 KB of `a.a.a.`, 4x per doubling). CPU
    time of this process, not wall time, so a busy machine does not fail the test."""
    import gc
    import random
    import time

    def cpu(fn: det.Detector, text: str, runs: int = 1) -> float:
        best = float("inf")
        gc.disable()  # a collection of the whole test process's heap is not the detector's time
        try:
            for _ in range(runs):
                t0 = time.process_time()
                list(fn(text, det.DEFAULT_OPTIONS))
                best = min(best, time.process_time() - t0)
        finally:
            gc.enable()
        return max(best, 1e-3)

    rng = random.Random(1)
    words = ["the", "customer", "called", "about", "order", "42", "and", "asked", "for", "a", "refund", "of",
             "19.99", "before", "friday"]
    ordinary = " ".join(rng.choice(words) for _ in range(60_000))[:200_000]
    big, quarter = _adversarial(200_000), _adversarial(50_000)
    for name, fn in det.DETECTORS.items():
        base = cpu(fn, ordinary, runs=2)
        for shape, text in big.items():
            t = cpu(fn, text)
            if t / base >= 100:  # time it again before calling it slow: a first run pays for warming caches
                t = min(t, cpu(fn, text, runs=2))
            assert t / base < 100, (name, shape, t, base)
            if t > 0.05:  # large enough to time: 4x the input must cost about 4x, not 16x
                assert t / cpu(fn, quarter[shape], runs=2) < 8.0, (name, shape)


# ---- scrubbing --------------------------------------------------------------------------------------------------

TEXT = ("Hi, I'm reachable at jane.doe@acme.io or +44 20 7946 0958; card 4111 1111 1111 1111, "
        "IBAN GB82 WEST 1234 5698 7654 32, SSN 536-22-1234, DOB: 1985-03-12, server 203.0.113.9, "
        "key AKIAIOSFODNN7EXAMPLE.")


def test_placeholder_mode() -> None:
    [ex], audit = scrub_examples([Example(text=TEXT, source="f:1")], "placeholder")
    assert ex.text == ("Hi, I'm reachable at <EMAIL> or <PHONE>; card <CREDIT_CARD>, IBAN <IBAN>, "
                       "SSN <NATIONAL_ID>, DOB: <DATE_OF_BIRTH>, server <IP_ADDRESS>, key <SECRET>.")
    assert audit["total"] == 8 and audit["records_with_pii"] == 1 and audit["version"] == SCRUBBER_VERSION


def test_pseudonyms_are_consistent_keyed_and_clean() -> None:
    ex = [Example(messages=[{"role": "user", "content": TEXT}, {"role": "assistant", "content": "ok jane.doe@acme.io"}],
                  source="f:1"), Example(text="again: jane.doe@acme.io", source="f:2")]
    a, audit = scrub_examples(ex, "pseudonym", salt="s3cret-s3cret-s3cret")
    b, _ = scrub_examples(ex, "pseudonym", salt="s3cret-s3cret-s3cret")
    c, _ = scrub_examples(ex, "pseudonym", salt="other-other-other-other")
    assert a == b and a != c
    fake = next(f.value for f in scan(a[0].messages[0]["content"].replace("example.com", "mail.io"))
                if f.type == det.EMAIL)
    assert fake.startswith("user_")
    # Same input, same pseudonym: across fields and across records.
    email_fake = a[1].text.split(": ")[1]
    assert email_fake in a[0].messages[0]["content"] and a[0].messages[1]["content"] == f"ok {email_fake}"
    for e in a:  # fakes use reserved ranges, fail their checksums or are invalid: a rescan finds nothing
        for text in ([m["content"] for m in e.messages] if e.messages else [e.text]):
            assert scan(text) == [], scan(text)
            for original in ("+44 20 7946 0958", "1985-03-12"):
                assert original not in text
    # The audit never holds an original value or the salt.
    dumped = json.dumps(audit)
    for original in ("jane.doe@acme.io", "4111 1111 1111 1111", "536-22-1234", "s3cret", "AKIAIOSFODNN7EXAMPLE",
                     "AKIA"):
        assert original not in dumped
    assert audit["by_field"]["messages.user"]["EMAIL"] == 1 and audit["by_field"]["text"]["EMAIL"] == 1


def test_mask() -> None:
    assert mask("john.doe@example.com", det.EMAIL) == "j***@e***.com"
    assert mask("4111 1111 1111 1234", det.CREDIT_CARD) == "4*** **** **** **34"
    for secret in ("ghp_abcdefghijklmnop", "hunter2!", "AKIAIOSFODNN7EXAMPLE"):  # not one character of a secret
        assert mask(secret, det.SECRET) == mask(secret, det.URL_SECRET) == "********"


RESCAN_TEXT = (
    "From jane.doe@acme.io (also j.doe (at) acme (dot) io), tel +44 20 7946 0958 or (650) 253-0000; card "
    "4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, SSN 536-22-1234, NIR 1 85 05 78 006 084 91, DNI "
    "12345678Z, CF RSSMRA85T10A562S, NINO AB 12 34 56 C; DOB: 1985-03-12, née le 3 février 1985, geboren am "
    "05.03.1985, 生年月日：1985年3月5日; hosts 203.0.113.9 and 2001:db8::1; key AKIAIOSFODNN7EXAMPLE with "
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, my password is Tr0ub4dor&3, Passwort lautet Sonne!2024; "
    "db postgres://app:S3cret#1@db.internal/prod and https://x.io/a?access_token=abcDEF123456xyz; qa@example.com"
)


def test_rescanning_pseudonymized_output_finds_no_pii() -> None:
    """The module's promise: pseudonyms are shaped like PII and are none (every type, several formats each)."""
    found = scan(RESCAN_TEXT)
    assert {f.type for f in found} == set(det.REGEX_TYPES) and len(found) == 24, found
    [ex], audit = scrub_examples([Example(text=RESCAN_TEXT, source="f:1")], "pseudonym", salt="0123456789abcdef")
    assert audit["total"] == len(found)
    assert scan(ex.text) == [], scan(ex.text)


def test_pseudonyms_keep_64_bits_and_do_not_merge() -> None:
    from lmtailor.privacy.scrub import pseudonym

    key = b"0123456789abcdef"
    emails = [det.Finding(det.EMAIL, 0, 0, f"customer{i}@acme.io") for i in range(20_000)]
    fakes = {pseudonym(f, key) for f in emails}
    assert len(fakes) == len(emails)
    assert all(re.fullmatch(r"user_[0-9a-f]{16}@example\.com", f) for f in fakes)
    assert re.fullmatch(r"redacted_[0-9a-f]{16}", pseudonym(det.Finding(det.SECRET, 0, 0, "hunter2!x"), key))


@pytest.mark.parametrize("salt", ["", "short", b"15-bytes-salt!!"])
def test_short_salt_is_refused(salt: str | bytes) -> None:
    if not salt:  # an empty salt means "random, not stored", which is long enough
        assert len(Scrubber("pseudonym", salt).key) == 32
        return
    with pytest.raises(ConfigError, match="at least 16"):
        Scrubber("pseudonym", salt)
    Scrubber("placeholder", salt)  # no pseudonyms, no key to guess


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="allowed: placeholder, pseudonym"):
        Scrubber("blackout")


def _records(tmp_path: Path) -> Path:
    path = tmp_path / "tickets.jsonl"
    rows = [{"messages": [{"role": "user", "content": "I am jane.doe@acme.io, call +1 (415) 555-0132"},
                          {"role": "assistant", "content": "Thanks, noted."}], "ticket": "T-1"},
            {"messages": [{"role": "user", "content": "order #555-234-5678 is late"},
                          {"role": "assistant", "content": "Sorry!"}]},
            {"instruction": "pay", "output": "IBAN DE89 3704 0044 0532 0130 00", "meta": {"ip": "203.0.113.9"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scan_file_counts_by_type_field_and_line(tmp_path: Path) -> None:
    path = _records(tmp_path)
    before = path.read_bytes()
    report = scan_file(path)
    assert path.read_bytes() == before
    assert report["counts"] == {"EMAIL": 1, "IBAN": 1, "IP_ADDRESS": 1, "PHONE": 1}
    assert report["by_field"]["messages[].content"] == {"EMAIL": 1, "PHONE": 1}
    assert report["by_field"]["meta.ip"] == {"IP_ADDRESS": 1}
    assert set(report["lines"]) == {f"{path}:1", f"{path}:3"}
    assert "EMAIL" in cli_scan(str(path)) and json.loads(cli_scan(str(path), as_json=True))["total"] == 4


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_scrub_file_writes_output_and_audit(tmp_path: Path, suffix: str) -> None:
    from lmtailor.data.sources import read_records

    path = _records(tmp_path)
    out = tmp_path / f"clean{suffix}"
    audit = scrub_file(path, out, "placeholder")
    assert audit["total"] == 4
    saved = json.loads((tmp_path / f"clean{suffix}.audit.json").read_text())
    assert saved["counts"] == audit["counts"] and saved["samples"]["EMAIL"][0]["original"] == "j***@a***.io"
    records = [r.data for r in read_records(str(out))]
    assert len(records) == 3
    text = out.read_text()
    assert "<EMAIL>" in text and "jane.doe@acme.io" not in text and "DE89" not in text
    assert scan_file(out)["total"] == 0


def test_scrub_file_refuses_broken_input_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "mail a@acme.io"}\n{"text": "cut off\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as e:
        scrub_file(path, out)
    assert e.value.problems and ":2:" in e.value.problems[0]
    assert list(tmp_path.iterdir()) == [path]


def test_cli_scrub_pseudonym_reads_salt_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _records(tmp_path)
    monkeypatch.setenv("MY_SALT", "pepper-pepper-pepper")
    msg = cli_scrub(str(path), str(tmp_path / "a.jsonl"), "pseudonym", "MY_SALT")
    assert "wrote" in msg
    cli_scrub(str(path), str(tmp_path / "b.jsonl"), "pseudonym", "MY_SALT")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert json.loads((tmp_path / "a.jsonl.audit.json").read_text())["salt"] == "from $MY_SALT"
    with pytest.raises(ConfigError, match="is the input"):
        scrub_file(path, path)


# ---- canaries ---------------------------------------------------------------------------------------------------

def test_plant_canaries_keeps_every_copy(pairs_file: Path, tmp_path: Path) -> None:
    from lmtailor.data.validate import clean_examples, load_examples
    from lmtailor.privacy.canary import load_canaries, make_canaries, plant_canaries

    canaries = make_canaries([0, 3, 12], pattern="ddd-dd", seed=1)
    assert all(len(c.secret) == 6 and c.secret[3] == "-" for c in canaries)
    listing = plant_canaries(pairs_file, tmp_path / "planted.jsonl", canaries)
    loaded, fmt = load_canaries(listing)
    assert loaded == canaries and fmt == "alpaca"
    examples, stats = clean_examples(load_examples(str(tmp_path / "planted.jsonl")))
    assert stats["duplicates"] == 0 and len(examples) == 10 + 15
    for c in canaries:
        assert sum(c.sentence == e.messages[-1]["content"] for e in examples) == c.repeats


def test_repeated_canary_is_exposed_and_control_is_not(tiny_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    from lmtailor.config import load_config
    from lmtailor.privacy.canary import canary_report, cli_canary, make_canaries, plant_canaries
    from lmtailor.train import train

    canaries = make_canaries([0, 40], pattern="dddd", seed=3)
    listing = plant_canaries(pairs_file, tmp_path / "planted.jsonl", canaries)
    run = tmp_path / "run"
    cfg = load_config(None, [f"base_model={tiny_model}", f"data.path={tmp_path / 'planted.jsonl'}", "method=full",
                             "max_steps=60", "batch_size=8", "micro_batch_size=8", "lr=3e-3", "warmup_ratio=0",
                             "eval.before_after=false", "eval.generate_examples=0", "data.val_size=1",
                             f"output_dir={run}"])
    train(cfg, progress=False)
    report = canary_report(run, listing, n_candidates=200)
    control, planted = report["canaries"]
    assert control["repeats"] == 0 and planted["repeats"] == 40
    assert planted["exposure"] > control["exposure"] + 2, report
    assert planted["exposure"] >= 5, report
    assert (run / "privacy_canaries.json").is_file()
    assert "canaries look memorized" in cli_canary(str(run), str(listing), n_candidates=50)


def test_scrub_for_run_needs_a_salt_for_pseudonyms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtailor.privacy.scrub import audit_html, scrub_for_run

    train = [Example(text="mail jane.doe@acme.io", source="a:1")]
    val = [Example(text="also jane.doe@acme.io", source="a:2")]
    monkeypatch.delenv("LMTAILOR_PRIVACY_SALT", raising=False)
    with pytest.raises(ConfigError, match="LMTAILOR_PRIVACY_SALT"):
        scrub_for_run(train, val, "pseudonym")
    monkeypatch.setenv("LMTAILOR_PRIVACY_SALT", "k" * 16)
    t, v, audit = scrub_for_run(train, val, "pseudonym", run_dir=tmp_path)
    assert t[0].text.split()[-1] == v[0].text.split()[-1] != "jane.doe@acme.io"
    assert json.loads((tmp_path / "privacy_audit.json").read_text())["counts"] == {"EMAIL": 2}
    assert "j***@a***.io" in audit_html(audit)


def test_scan_options_reach_the_cli_and_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmtailor.cli import main
    from lmtailor.config import load_config
    from lmtailor.privacy.scrub import scan_options

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "ring 07911 123456 or qa@example.com"}) + "\n")
    assert main(["privacy", "scan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"EMAIL": 1}
    assert main(["privacy", "scan", str(path), "--json", "--phone-region", "GB", "--no-documentation-emails"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"PHONE": 1} and report["phone_regions"] == ["GB"]
    cfg = load_config(None, ["privacy.phone_region=de,fr", "privacy.documentation_emails=false"])
    assert scan_options(cfg.privacy) == det.ScanOptions(("DE", "FR"), False)
    with pytest.raises(ConfigError, match="unknown phone region"):
        scan_options(load_config(None, ["privacy.phone_region=XX"]).privacy)
