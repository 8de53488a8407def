"""Privacy: PII detectors (table-driven), scrubbing modes and audits, the labeled evaluation set, canaries."""

from __future__ import annotations

import importlib.util
import json
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

POSITIVES = [
    (det.EMAIL, "write to jane.doe+tickets@acme-corp.co.uk today", "jane.doe+tickets@acme-corp.co.uk"),
    (det.EMAIL, "Author: Kemi Okafor <KEMI@GLOBEX.COM>", "KEMI@GLOBEX.COM"),
    (det.PHONE, "call +44 20 7946 0958 now", "+44 20 7946 0958"),
    (det.PHONE, "office (555) 234-4567.", "(555) 234-4567"),
    (det.PHONE, "Berlin: +49 30 1234567", "+49 30 1234567"),
    (det.PHONE, "mobile 07700 900123", "07700 900123"),
    (det.PHONE, "tel +33 1 23 45 67 89", "+33 1 23 45 67 89"),
    (det.PHONE, "US 415.555.0132 x12", "415.555.0132"),
    (det.CREDIT_CARD, "card 4111 1111 1111 1111 expired", "4111 1111 1111 1111"),
    (det.CREDIT_CARD, "amex 3782-822463-10005", "3782-822463-10005"),
    (det.CREDIT_CARD, "paid with 5555555555554444.", "5555555555554444"),
    (det.IBAN, "IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
    (det.IBAN, "to GB82WEST12345698765432", "GB82WEST12345698765432"),
    (det.IP_ADDRESS, "from 203.0.113.9:443", "203.0.113.9"),
    (det.IP_ADDRESS, "peer 2a02:6b8:85a3::8a2e:370:7334 closed", "2a02:6b8:85a3::8a2e:370:7334"),
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
    (det.SECRET, "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", None),
    (det.DATE_OF_BIRTH, "she was born on 12 March 1985 in Lyon", "12 March 1985"),
    (det.DATE_OF_BIRTH, "DOB: 03/12/1985", "03/12/1985"),
    (det.DATE_OF_BIRTH, "D.O.B. March 12, 1985", "March 12, 1985"),
    (det.NATIONAL_ID, "SSN 536-22-1234", "536-22-1234"),
    (det.NATIONAL_ID, "ssn: 536221234", "536221234"),
    (det.NATIONAL_ID, "NINO AB 12 34 56 C", "AB 12 34 56 C"),
    (det.NATIONAL_ID, "NIR 1 85 05 78 006 084 91", "1 85 05 78 006 084 91"),
    (det.NATIONAL_ID, "DNI 12345678Z", "12345678Z"),
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
    "contact support@example.com for the demo",  # RFC 2606 reserved domain
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
    if det.ner_available():
        pytest.skip("an NER backend is installed here")
    with pytest.raises(ConfigError, match="pip install"):
        scan("Anna Smith lives in Paris", ner=True)


def test_eval_set_meets_targets() -> None:
    """The labeled set: >= 300 snippets, every regex type planted, recall >= 0.95 and precision >= 0.90."""
    spec = importlib.util.spec_from_file_location("pii_eval", ROOT / "benchmarks" / "pii_eval.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 300
    assert {s["type"] for r in rows for s in r["spans"]} == set(det.REGEX_TYPES)
    for r in rows:  # the labels point at what they say
        for s in r["spans"]:
            assert r["text"][s["start"]:s["end"]] == s["value"]
    result = mod.evaluate(rows)
    for t, s in result["per_type"].items():
        assert s["recall"] >= 0.95 and s["precision"] >= 0.90, (t, s, result["misses"], result["false_alarms"])


def test_eval_set_is_reproducible(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_pii_eval", ROOT / "benchmarks" / "make_pii_eval.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.build()
    assert [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines()] == rows


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
    a, audit = scrub_examples(ex, "pseudonym", salt="s3cret")
    b, _ = scrub_examples(ex, "pseudonym", salt="s3cret")
    c, _ = scrub_examples(ex, "pseudonym", salt="other")
    assert a == b and a != c
    fake = next(f.value for f in scan(a[0].messages[0]["content"].replace("example.com", "mail.io"))
                if f.type == det.EMAIL)
    assert fake.startswith("user_")
    # Same input, same pseudonym: across fields and across records.
    email_fake = a[1].text.split(": ")[1]
    assert email_fake in a[0].messages[0]["content"] and a[0].messages[1]["content"] == f"ok {email_fake}"
    for e in a:  # fakes use reserved ranges or fail their checksums; only phone- and date-shaped ones remain
        for text in ([m["content"] for m in e.messages] if e.messages else [e.text]):
            assert {f.type for f in scan(text)} <= {det.PHONE, det.DATE_OF_BIRTH}, scan(text)
            for original in ("+44 20 7946 0958", "1985-03-12"):
                assert original not in text
    # The audit never holds an original value or the salt.
    dumped = json.dumps(audit)
    for original in ("jane.doe@acme.io", "4111 1111 1111 1111", "536-22-1234", "s3cret", "AKIAIOSFODNN7EXAMPLE"):
        assert original not in dumped
    assert audit["by_field"]["messages.user"]["EMAIL"] == 1 and audit["by_field"]["text"]["EMAIL"] == 1


def test_mask() -> None:
    assert mask("john.doe@example.com", det.EMAIL) == "j***@e***.com"
    assert mask("4111 1111 1111 1234", det.CREDIT_CARD) == "4*** **** **** **34"
    assert mask("ghp_abcdefghijklmnop", det.SECRET) == "ghp_********"


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
    monkeypatch.setenv("MY_SALT", "pepper")
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
    monkeypatch.setenv("LMTAILOR_PRIVACY_SALT", "k")
    t, v, audit = scrub_for_run(train, val, "pseudonym", run_dir=tmp_path)
    assert t[0].text.split()[-1] == v[0].text.split()[-1] != "jane.doe@acme.io"
    assert json.loads((tmp_path / "privacy_audit.json").read_text())["counts"] == {"EMAIL": 2}
    assert "j***@a***.io" in audit_html(audit)
