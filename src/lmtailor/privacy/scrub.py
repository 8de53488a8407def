"""Scrub PII from records and examples: typed placeholders or keyed pseudonyms, with an audit.

Modes:
  placeholder  every finding becomes its type in angle brackets: `<EMAIL>`, `<PHONE>`, ...
  pseudonym    every finding becomes a fake value of the same shape, `HMAC-SHA256(salt, type + value)` deciding
               which: the same input gives the same fake value within a run (so "the customer with this email"
               stays one customer), and without the salt the mapping cannot be reversed or recomputed. Fakes
               keep at least 64 bits of the digest where the shape allows (e-mails, secrets, IPv6, IDs), so two
               customers do not merge into one (at 32 bits, two of a million addresses already collide more
               often than not). Fake values are chosen so that they never belong to a real person and scanning
               the output again finds nothing: reserved ranges (198.18.0.0/15, 2001:2::/48, SSN area 9xx, IBAN
               check digits 00), checksums made to fail, phone numbers phonenumbers calls invalid whose digits
               carry a residue mod 97 the scanner knows as ours (so "Tel. <fake>" stays clean too), dates that
               are not in the calendar (30 February), and e-mails of the one shape the scanner knows as ours.
               The salt must be at least 16 bytes: a short one can be found by trying them all against a
               known value, and then every pseudonym is reversible by lookup.

The audit (a JSON-able dict) holds counts per type and per field, a few sample redactions with the original
masked (`j***@a***.io`; a secret shows no character at all), the mode and the scrubber's version; never an
original value or the salt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lmtailor.data.example import Example
from lmtailor.errors import ConfigError, DataError
from lmtailor.privacy import detectors as det
from lmtailor.privacy.detectors import Finding, ScanOptions, scan

SCRUBBER_VERSION = "2.1.0"
MIN_SALT_BYTES = 16
PSEUDONYM_HEX = 16  # 64 bits of the digest in every fake that has room for them
MODES = ("placeholder", "pseudonym")
SALT_ENV = "LMTAILOR_PRIVACY_SALT"
SAMPLES_PER_TYPE = 3
Mode = Literal["placeholder", "pseudonym"]


# ---- masking (for the audit) ----------------------------------------------------------------------------------

def mask(value: str, type_: str = "") -> str:
    """A hint of `value` safe to show in an audit: `john.doe@acme.io` -> `j***@a***.io`, `4111 **** **** 1111`."""
    if type_ == det.EMAIL and "@" in value:
        local, domain = value.rsplit("@", 1)
        name, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{name[:1]}***.{tld}"
    if type_ in (det.SECRET, det.URL_SECRET):
        return "*" * 8  # even a prefix narrows a secret (a key's first four characters name its issuer and kind)
    alnum = [i for i, c in enumerate(value) if c.isalnum()]
    show = set(alnum[:1] + (alnum[-2:] if len(alnum) >= 8 else []))
    return "".join(c if (i in show or not c.isalnum()) else "*" for i, c in enumerate(value))


# ---- pseudonyms -----------------------------------------------------------------------------------------------

def _digits_from(digest: bytes) -> Iterator[str]:
    while True:
        for b in digest:
            yield str(b % 10)
        digest = hashlib.sha256(digest).digest()


def _reshape(value: str, digest: bytes, keep_prefix: int = 0) -> str:
    """`value` with every digit after the first `keep_prefix` characters replaced by digest-derived digits."""
    stream = _digits_from(digest)
    return value[:keep_prefix] + "".join(next(stream) if c.isdigit() else c for c in value[keep_prefix:])


# Day-month pairs that no calendar has: a fake date of birth is shaped like one and is nobody's birthday.
_IMPOSSIBLE_DAYS = [(30, 2), (31, 2), (31, 4), (31, 6), (31, 9), (31, 11)]
_MONTH_NAMES = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December"]


def _fake_date(value: str, digest: bytes) -> str:
    year = 1940 + digest[0] % 66
    day, month = _IMPOSSIBLE_DAYS[digest[1] % len(_IMPOSSIBLE_DAYS)]
    if re.fullmatch(r"\d{4}\D\d{1,2}\D\d{1,2}", value):
        sep = value[4]
        return f"{year}{sep}{month:02d}{sep}{day:02d}"
    if "年" in value:
        return f"{year}年{month}月{day}日"
    if re.search(r"[^\W\d_]", value):
        return f"{day} {_MONTH_NAMES[month - 1]} {year}"
    sep = (re.findall(r"[./\-]", value) or ["/"])[0]
    return f"{day:02d}{sep}{month:02d}{sep}{year}"  # either reading (day or month first) is impossible


def _fake_phone(value: str, digest: bytes, options: ScanOptions) -> str:
    """`value`'s layout with digest digits, redrawn until phonenumbers calls it invalid, its last two digits set so
    that its digits carry the residue detectors.is_pseudonym_phone knows (so a rescan skips it even next to "Tel.")."""
    keep = re.match(r"(?:\+|00)\d{1,3}", value)  # the country code stays: it says little, and keeps the shape
    for attempt in range(64):
        fake = _with_pseudonym_residue(
            _reshape(value, hashlib.sha256(digest + bytes([attempt])).digest(), len(keep.group()) if keep else 0))
        if not any(det.find_phones(f"Tel. {fake} ", options)):
            return fake
    return _with_pseudonym_residue(re.sub(r"\d", "0", value))  # all zeros is never a valid number


def _with_pseudonym_residue(fake: str) -> str:
    digits = re.sub(r"\D", "", fake)
    head = int(digits[:-2] or "0") * 100
    last = f"{(det.PSEUDONYM_PHONE_RESIDUE - head) % det.PSEUDONYM_PHONE_MOD:02d}"
    positions = [i for i, c in enumerate(fake) if c.isdigit()][-2:]
    chars = list(fake)
    for i, d in zip(positions, last, strict=True):
        chars[i] = d
    return "".join(chars)


def pseudonym(finding: Finding, key: bytes, options: ScanOptions | None = None) -> str:
    """The fake value for one finding: deterministic in (key, type, value), shaped like the original."""
    digest = hmac.new(key, f"{finding.type}\0{finding.value}".encode("utf-8", "surrogatepass"),
                      hashlib.sha256).digest()
    h = digest.hex()[:PSEUDONYM_HEX]
    value, t = finding.value, finding.type
    if t == det.EMAIL:
        return f"user_{h}@example.com"  # the one shape detectors.PSEUDONYM_EMAIL skips
    if t == det.PHONE:
        return _fake_phone(value, digest, options or det.DEFAULT_OPTIONS)
    if t == det.CREDIT_CARD:
        fake = _reshape(value, digest)
        digits = re.sub(r"\D", "", fake)
        if det.luhn_ok(digits):  # a fake card must never pass as a real one
            last = str((int(digits[-1]) + 1) % 10)
            fake = fake[:-1] + last
        return fake
    if t == det.IBAN:
        return value[:2] + "00" + _reshape(re.sub(r"[A-Z]", "0", value[4:]), digest)  # check digits 00 never valid
    if t == det.IP_ADDRESS:
        if ":" in value:  # 2001:2::/48, the IPv6 benchmarking range: 80 bits to draw from
            return "2001:2:0:" + ":".join(h[i:i + 4] for i in range(0, 16, 4)) + ":" + digest.hex()[16:20]
        return f"198.{18 + digest[0] % 2}.{digest[1]}.{digest[2]}"
    if t == det.DATE_OF_BIRTH:
        return _fake_date(value, digest)
    if t == det.NATIONAL_ID:
        # Same layout, made invalid on purpose: SSN area 9xx is never issued, NINO prefix ZZ is never used,
        # an INSEE key 00, a DNI letter or a codice fiscale check letter off by one never pass their checksums.
        fake = _reshape(value, digest)
        if finding.kind == "us_ssn":
            return "9" + fake[1:]
        if finding.kind == "uk_nino":
            return "ZZ" + fake[2:]
        if finding.kind == "fr_insee":
            return fake.replace("2A", "20").replace("2B", "20")[:-2] + "00"
        if finding.kind == "es_dni":
            letters = "TRWAGMYFPDXBNJZSQVHLCKE"
            number = re.sub(r"\D", "", fake)
            return fake[:-1] + letters[(int(number) + 1) % 23]
        if finding.kind == "it_codice_fiscale":  # its letters spell the name too: redraw them all
            stream = iter(digest)
            body = "".join(chr(65 + next(stream) % 26) if c.isalpha() else str(next(stream) % 10)
                           for c in value[:15])
            body = body[:8] + "ABCDEHLMPRST"[digest[20] % 12] + body[9:]
            return body + chr(65 + (ord(det.codice_fiscale_check(body)) - 64) % 26)  # the check letter plus one
        return f"ID-{h.upper()}"
    if t == det.URL_SECRET and finding.kind == "userinfo":
        return f"user_{h}:redacted"
    if t in (det.SECRET, det.URL_SECRET):
        return f"redacted_{h}"
    if t == det.PERSON:
        return f"Person_{h}"
    return f"{t.lower()}_{h}"


def placeholder(finding: Finding) -> str:
    return f"<{finding.type}>"


# ---- audit ----------------------------------------------------------------------------------------------------

@dataclass
class Audit:
    """What a scrub found and changed; `to_dict()` is the JSON written next to the output."""

    mode: str
    salt: str
    counts: Counter[str] = field(default_factory=Counter)
    by_field: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    samples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    records: int = 0
    records_with_pii: int = 0
    ner: bool = False
    options: ScanOptions = det.DEFAULT_OPTIONS

    def add(self, where: str, fieldname: str, findings: list[Finding], replacements: list[str] | None) -> None:
        for i, f in enumerate(findings):
            self.counts[f.type] += 1
            self.by_field[fieldname][f.type] += 1
            if len(self.samples[f.type]) < SAMPLES_PER_TYPE:
                sample = {"source": where, "field": fieldname, "original": mask(f.value, f.type)}
                if f.kind:
                    sample["kind"] = f.kind
                if replacements is not None:
                    sample["replacement"] = replacements[i]
                self.samples[f.type].append(sample)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scrubber": "lmtailor.privacy", "version": SCRUBBER_VERSION, "mode": self.mode, "salt": self.salt,
            "ner": self.ner, "detector_types": list(det.REGEX_TYPES) + (list(det.NER_TYPES) if self.ner else []),
            "phone_regions": list(self.options.phone_regions),
            "documentation_emails": self.options.documentation_emails,
            "records": self.records, "records_with_pii": self.records_with_pii,
            "total": sum(self.counts.values()), "counts": dict(sorted(self.counts.items())),
            "by_field": {k: dict(sorted(v.items())) for k, v in sorted(self.by_field.items())},
            "samples": {k: v for k, v in sorted(self.samples.items())},
        }


# ---- the scrubber ---------------------------------------------------------------------------------------------

class Scrubber:
    """Scans and rewrites strings; remembers what it did in `audit`.

    Args:
        mode: "scan" (find only), "placeholder" or "pseudonym".
        salt: the pseudonym key; None makes a random one that is never stored (consistent within this object
            only, so runs cannot be linked).
        ner: also find PERSON and LOCATION with the optional NER backend.
    """

    def __init__(self, mode: str = "placeholder", salt: bytes | str | None = None, ner: bool = False,
                 salt_source: str | None = None, options: ScanOptions | None = None) -> None:
        if mode not in (*MODES, "scan"):
            raise ConfigError(f"unknown scrub mode '{mode}'", "allowed: " + ", ".join(MODES))
        if isinstance(salt, str):
            salt = salt.encode("utf-8")
        if mode == "pseudonym" and salt and len(salt) < MIN_SALT_BYTES:
            raise ConfigError(f"the pseudonym salt{f' ({salt_source})' if salt_source else ''} is {len(salt)} "
                              f"byte(s); at least {MIN_SALT_BYTES} are needed",
                              "use a long random secret, e.g. from `openssl rand -hex 32`")
        if ner:
            from lmtailor.privacy.ner import ner_backend

            ner_backend()  # fail now, with the install hint, not on the first record
        self.mode = mode
        self.ner = ner
        self.options = options or det.DEFAULT_OPTIONS
        self.key = salt or secrets.token_bytes(32)
        described = salt_source or ("given" if salt else "random, not stored")
        self.audit = Audit(mode=mode, salt=described if mode == "pseudonym" else "unused", ner=ner,
                           options=self.options)

    def replacement(self, finding: Finding) -> str:
        return pseudonym(finding, self.key, self.options) if self.mode == "pseudonym" else placeholder(finding)

    def text(self, text: str, where: str = "", fieldname: str = "text") -> tuple[str, int]:
        """(`text` scrubbed, number of findings); in scan mode the text comes back unchanged."""
        findings = scan(text, ner=self.ner, options=self.options)
        if not findings:
            return text, 0
        if self.mode == "scan":
            self.audit.add(where, fieldname, findings, None)
            return text, len(findings)
        repl = [self.replacement(f) for f in findings]
        self.audit.add(where, fieldname, findings, repl)
        out, last = [], 0
        for f, r in zip(findings, repl, strict=True):
            out += [text[last:f.start], r]
            last = f.end
        out.append(text[last:])
        return "".join(out), len(findings)

    def value(self, value: Any, where: str, path: str) -> tuple[Any, int]:
        """Scrub every string inside a JSON-like value; `path` names the field (list indices collapsed: `a[].b`)."""
        if isinstance(value, str):
            return self.text(value, where, path or "(value)")
        if isinstance(value, dict):
            total, out = 0, {}
            for k, v in value.items():
                out[k], n = self.value(v, where, f"{path}.{k}" if path else str(k))
                total += n
            return out, total
        if isinstance(value, list):
            total, items = 0, []
            for v in value:
                new, n = self.value(v, where, f"{path}[]")
                items.append(new)
                total += n
            return items, total
        return value, 0

    def record(self, data: dict[str, Any], where: str) -> dict[str, Any]:
        self.audit.records += 1
        out, n = self.value(data, where, "")
        self.audit.records_with_pii += n > 0
        return out

    def example(self, ex: Example) -> Example:
        self.audit.records += 1
        total = 0
        messages = None
        if ex.messages is not None:
            messages = []
            for m in ex.messages:
                content, n = self.text(m["content"], ex.source, f"messages.{m['role']}")
                messages.append({**m, "content": content})
                total += n
        text = None
        if ex.text is not None:
            text, n = self.text(ex.text, ex.source, "text")
            total += n
        meta, n = self.value(ex.meta, ex.source, "meta")
        total += n
        self.audit.records_with_pii += total > 0
        return replace(ex, messages=messages, text=text, meta=meta)


def salt_from_env(name: str | None = SALT_ENV, required: bool = False) -> tuple[bytes | None, str]:
    """(salt bytes or None, a description for the audit) from the environment variable `name`."""
    value = os.environ.get(name) if name else None
    if value:
        return value.encode("utf-8"), f"from ${name}"
    if required:
        raise ConfigError(f"pseudonym mode needs a secret salt, but ${name} is not set",
                          f"export {name}=<a long random string kept secret>, e.g. from `openssl rand -hex 32`")
    return None, "random, not stored"


def scrub_examples(examples: list[Example], mode: Mode = "placeholder", salt: bytes | str | None = None,
                   ner: bool = False, options: ScanOptions | None = None) -> tuple[list[Example], dict[str, Any]]:
    """The pipeline stage: scrub every message, text and meta string of `examples`.

    Args:
        examples: loaded examples (not modified).
        mode: "placeholder" or "pseudonym".
        salt: pseudonym key (None: a random key for this call only).
        ner: also scrub PERSON and LOCATION (needs an NER backend).

    Returns:
        (scrubbed examples in the same order, audit dict).

    Raises:
        ConfigError: unknown mode, or `ner` without a backend.
    """
    s = Scrubber(mode, salt, ner, options=options)
    return [s.example(e) for e in examples], s.audit.to_dict()


# ---- files ----------------------------------------------------------------------------------------------------

def _records(path: str | Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, "file:line") of a data file; every unparseable record is reported before anything is yielded."""
    from lmtailor.data.sources import read_records

    records = list(read_records(str(path)))
    bad = [f"{r.source}: {r.problem}" for r in records if r.problem]
    if bad:
        raise DataError(f"{len(bad)} unreadable record(s) in {path}", hint="fix them first; nothing was written",
                        problems=bad[:20], count=len(bad))
    for r in records:
        yield r.data, r.source


def scan_file(path: str | Path, ner: bool = False, options: ScanOptions | None = None) -> dict[str, Any]:
    """Count the PII in a data file by type and by field, changing nothing.

    Returns:
        The audit dict (mode "scan"), plus "lines": {"file:line": {type: count}} for the first 1000 records
        that hold PII.

    Raises:
        DataError: the file cannot be read or has unparseable records.
    """
    s = Scrubber("scan", ner=ner, options=options)
    lines: dict[str, dict[str, int]] = {}
    for data, where in _records(path):
        before = Counter(s.audit.counts)
        s.record(data, where)
        found = s.audit.counts - before
        if found and len(lines) < 1000:
            lines[where] = dict(found)
    return {**s.audit.to_dict(), "file": str(path), "lines": lines}


def _write_records(records: list[dict[str, Any]], out: Path) -> None:
    import csv
    import io

    from lmtailor.io import atomic_write_text

    suffix = out.suffix.lower()
    if suffix == ".json":
        atomic_write_text(out, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    elif suffix in (".csv", ".tsv"):
        header: list[str] = []
        for r in records:
            header += [k for k in r if k not in header]
        buf = io.StringIO()
        w = csv.DictWriter(buf, header, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow({k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in r.items()})
        atomic_write_text(out, buf.getvalue())
    elif suffix in (".txt", ".md", ".rst", ".text"):
        atomic_write_text(out, "\n\n".join(str(r.get("text", "")) for r in records) + "\n")
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def scrub_file(path: str | Path, out: str | Path, mode: Mode = "placeholder", salt: bytes | str | None = None,
               ner: bool = False, audit_path: str | Path | None = None,
               salt_source: str | None = None, options: ScanOptions | None = None) -> dict[str, Any]:
    """Write a scrubbed copy of a data file and its audit, both atomically (nothing is written on error).

    Args:
        path: input file or folder (any format `read_records` reads).
        out: output file; its suffix picks the format (.jsonl default, .json, .csv, .tsv, .txt).
        mode: "placeholder" or "pseudonym".
        salt: pseudonym key; None makes a random one that is not stored.
        ner: also scrub PERSON and LOCATION.
        audit_path: where the audit JSON goes (default `<out>.audit.json`).

    Returns:
        The audit dict.

    Raises:
        DataError: unreadable input (nothing written). ConfigError: bad mode, `out` equal to `path`.
    """
    from lmtailor.io import atomic_write_json

    out = Path(out)
    if out.resolve() == Path(path).resolve():
        raise ConfigError(f"--out {out} is the input file", "write the scrubbed copy to a new file")
    s = Scrubber(mode, salt, ner, salt_source, options)
    records = [s.record(data, where) for data, where in _records(path)]
    audit = {**s.audit.to_dict(), "input": str(path), "output": str(out)}
    _write_records(records, out)
    atomic_write_json(audit_path or out.with_name(out.name + ".audit.json"), audit)
    return audit


# ---- the CLI verbs call these -------------------------------------------------------------------------------

def format_counts(audit: dict[str, Any]) -> str:
    lines = [f"{audit['total']} finding(s) in {audit['records_with_pii']} of {audit['records']} record(s)"]
    for t, n in audit["counts"].items():
        lines.append(f"  {t:15} {n}")
    if audit["by_field"]:
        lines.append("by field:")
        for f, c in audit["by_field"].items():
            lines.append(f"  {f:30} " + ", ".join(f"{t} {n}" for t, n in c.items()))
    return "\n".join(lines)


def cli_scan(path: str, as_json: bool = False, ner: bool = False, phone_region: str = "US",
             documentation_emails: bool = True) -> str:
    """`lmtailor privacy scan FILE`: the text to print."""
    report = scan_file(path, ner=ner, options=ScanOptions.create(phone_region, documentation_emails))
    if as_json:
        return json.dumps(report, indent=2, ensure_ascii=False)
    where = "\n".join(f"  {src}: " + ", ".join(f"{t} {n}" for t, n in c.items())
                      for src, c in list(report["lines"].items())[:20])
    more = f"\n  ... and {len(report['lines']) - 20} more" if len(report["lines"]) > 20 else ""
    return format_counts(report) + (f"\nwhere:\n{where}{more}" if where else "")


def cli_scrub(path: str, out: str, mode: str = "placeholder", salt_env: str = SALT_ENV, ner: bool = False,
              audit: str | None = None, phone_region: str = "US", documentation_emails: bool = True,
              force: bool = False) -> str:
    """`lmtailor privacy scrub FILE --out OUT --mode M --salt-env VAR`: the text to print (`force`: replace
    existing outputs, keeping them as backups)."""
    import contextlib

    from lmtailor.outputs import check_output, replacing

    targets = [check_output(out, force, folder=False, inputs=(path,)),
               check_output(audit or f"{out}.audit.json", force, folder=False, flag="--audit", inputs=(path,))]
    salt, source = salt_from_env(salt_env) if mode == "pseudonym" else (None, "unused")
    options = ScanOptions.create(phone_region, documentation_emails)
    with contextlib.ExitStack() as stack:
        for target in targets:
            stack.enter_context(replacing(target, force))
        report = scrub_file(path, out, mode, salt, ner, audit, salt_source=source,  # type: ignore[arg-type]
                            options=options)
    audit_path = audit or f"{out}.audit.json"
    return format_counts(report) + f"\nwrote {out} ({mode}) and the audit {audit_path}"



# ---- the training pipeline stage ------------------------------------------------------------------------------

def scan_options(privacy: Any) -> ScanOptions:
    """The scanner's options from a run's `privacy` settings (`phone_region`, `documentation_emails`).

    Raises:
        ConfigError: an unknown phone region.
    """
    return ScanOptions.create(getattr(privacy, "phone_region", "US"), getattr(privacy, "documentation_emails", True))


def scrub_for_run(train: list[Example], val: list[Example], mode: Mode = "placeholder", salt_env: str = SALT_ENV,
                  ner: bool = False, run_dir: str | Path | None = None, options: ScanOptions | None = None
                  ) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Scrub a run's training and validation examples with one scrubber (one pseudonym mapping for both).

    Pseudonym mode needs the salt from `$salt_env`: every process of a distributed run must map a value to the
    same fake one, which a per-process random key would not. The audit goes to `<run_dir>/privacy_audit.json`.

    Raises:
        ConfigError: pseudonym mode without the salt variable set or with a salt under 16 bytes, an unknown phone
            region, or NER asked for but not installed.
    """
    from lmtailor.io import atomic_write_json

    salt, source = salt_from_env(salt_env, required=True) if mode == "pseudonym" else (None, "unused")
    s = Scrubber(mode, salt, ner, source, options)
    train = [s.example(e) for e in train]
    val = [s.example(e) for e in val]
    audit = s.audit.to_dict()
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / "privacy_audit.json", audit)
    return train, val, audit


def audit_html(audit: dict[str, Any]) -> str:
    """The audit as an HTML section for the run report (counts per type and field, masked samples)."""
    import html

    def cells(*values: Any) -> str:
        return "".join(f"<td>{html.escape(str(v))}</td>" for v in values)

    counts = "".join(f"<tr>{cells(t, n)}</tr>" for t, n in audit["counts"].items()) or "<tr><td>none</td></tr>"
    fields = "".join(f"<tr>{cells(f, ', '.join(f'{t} {n}' for t, n in c.items()))}</tr>"
                     for f, c in audit["by_field"].items())
    samples = "".join(f"<tr>{cells(t, s['source'], s['field'], s['original'], s.get('replacement', ''))}</tr>"
                      for t, rows in audit["samples"].items() for s in rows)
    return (f"<h2>Privacy</h2><p>scrubber {html.escape(audit['version'])}, mode {html.escape(audit['mode'])}: "
            f"{audit['total']} finding(s) in {audit['records_with_pii']} of {audit['records']} example(s)</p>"
            f"<table><tr><th>type</th><th>count</th></tr>{counts}</table>"
            f"<table><tr><th>field</th><th>found</th></tr>{fields}</table>"
            f"<table><tr><th>type</th><th>source</th><th>field</th><th>original (masked)</th><th>now</th></tr>"
            f"{samples}</table>")
