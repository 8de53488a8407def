"""Write the held-out PII evaluation set tests/data/pii_eval.jsonl from `faker` (same seed and faker version,
same file).

The detectors were not written against this set: its values come from faker's locale providers (e-mails, phone
numbers, IBANs, card numbers, national IDs, passwords, dates) in seven locales, and its sentences are templates
written for this file only, in the languages of those locales, before the detectors were measured on them. Every
row also carries non-PII look-alikes (version strings, prices, order numbers, ISO dates, git SHAs, UUIDs, ports,
ISBNs, meeting dates) that must not be flagged.

Labels: a span is the PII value itself (the password, not "password is"; the date, not "born on"; the
credentials or token inside a URL, not the URL). Documentation
domains (example.com, ...) are labeled EMAIL, because the scanner counts them by default. Each row records the
region of its locale: a user scrubbing German data sets `privacy.phone_region=DE`, and the evaluation does the same.

Each line: {"id", "locale", "region", "kind", "text", "spans": [{"type", "start", "end", "value"}]}.

    python benchmarks/make_pii_eval.py            # writes tests/data/pii_eval.jsonl (runs with PYTHONHASHSEED=0)
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import random
import string
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCALES = {"en_US": ("en", "US"), "en_AU": ("en", "AU"), "de_DE": ("de", "DE"), "fr_FR": ("fr", "FR"),
           "es_ES": ("es", "ES"), "it_IT": ("it", "IT"), "ja_JP": ("ja", "JP")}

MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober", "November",
           "Dezember"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
    "it": ["gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto", "settembre", "ottobre",
           "novembre", "dicembre"],
}

# Sentence templates, per language. `{x}` slots are filled by FILLERS; the PII slots are labeled, the others are
# look-alikes or plain words. Written for this set, not copied from the detector tests.
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("crm", "Spoke with {name} today; best reached at {phone}, or by mail at {email}. Follow-up on {isodate}."),
        ("crm", "{name} asked us to update their card on file to {card} before the {isodate} renewal ({price})."),
        ("ticket", "Hello, my account was locked after the {version} update. My password is {password} if you need "
                   "to check. Order {order} is still pending."),
        ("ticket", "Refund to IBAN {iban} please, it was order {order} for {price}. Thanks, {name}"),
        ("form", "Full name: {name}\nDate of birth: {dob}\nPhone: {phone}\nEmail: {email}"),
        ("form", "Applicant {name}, born {dob}, SSN {national_id}, contact {phone}."),
        ("log", "{isodate} WARN auth failed for {email} from {ip}; build {sha} on port {port}"),
        ("log", "request {uuid} from {ipv6} took 412 ms (api {version}), user {username}"),
        ("chat", "hey can you ping me on {phone}? my other mail is {obf_email} btw"),
        ("chat", "just paste this into the deploy job: {aws_id} / {aws_secret} and it should work"),
        ("config", "DATABASE_URL={url_userinfo}\nWORKERS=4\nVERSION={version}"),
        ("email", "Dear support,\nthe reset link {url_token} expired. Release {version} is what I run.\n"
                  "Regards, {name}"),
        ("email", "Hi {first},\nour new GitHub bot uses {gh_token}; please don't share it. The ISBN is {isbn}."),
        ("note", "Her DOB is {dob}. She paid {price} with card {card} on {meeting}."),
        ("note", "Call {name} at {phone} about invoice {order} (due {isodate})."),
        ("secret", "Slack bot token for the alerts channel: {slack} (rotated {isodate})"),
        ("secret", "export STRIPE_KEY={stripe}  # live key, commit {sha}"),
    ],
    "de": [
        ("crm", "Kunde {name} ist unter {phone} erreichbar, E-Mail {email}. Rückruf am {meeting}."),
        ("ticket", "Hallo, mein Passwort lautet {password}, trotzdem komme ich nicht rein. Version {version}, "
                   "Bestellung {order}."),
        ("ticket", "Bitte überweisen Sie die Erstattung ({price}) auf mein Konto {iban}. Viele Grüße, {name}"),
        ("form", "Name: {name}\nGeburtsdatum: {dob}\nTelefon: {phone}\nE-Mail: {email}"),
        ("form", "{name}, geboren am {dob}, wohnhaft in {city}, Tel. {phone}"),
        ("log", "{isodate} Anmeldung fehlgeschlagen für {email} von {ip}, Port {port}, Commit {sha}"),
        ("chat", "schreib mir an {obf_email} oder ruf an: {phone}"),
        ("note", "Kreditkarte {card} wurde am {isodate} belastet, Betrag {price}, Vorgang {uuid}."),
        ("config", "Der Zugang lautet {url_userinfo} (nur intern, Build {version})."),
    ],
    "fr": [
        ("crm", "Client {name}, joignable au {phone} ou par courriel à {email}. Rappel prévu le {meeting}."),
        ("ticket", "Bonjour, mon mot de passe est {password} mais la connexion échoue depuis la version {version}."),
        ("ticket", "Merci de rembourser {price} sur le compte {iban}. Commande {order}. Cordialement, {name}"),
        ("form", "Nom : {name}\nDate de naissance : {dob}\nTéléphone : {phone}\nCourriel : {email}"),
        ("form", "{name}, né le {dob} à {city}, numéro de sécurité sociale {national_id}."),
        ("log", "{isodate} échec de connexion pour {email} depuis {ip} (port {port}, build {sha})"),
        ("chat", "écris-moi à {obf_email} ou appelle le {phone}"),
        ("note", "Carte {card} débitée le {isodate} de {price}, référence {uuid}."),
    ],
    "es": [
        ("crm", "Cliente {name}, teléfono {phone}, correo {email}. Volver a llamar el {meeting}."),
        ("ticket", "Hola, mi contraseña es {password} y no puedo entrar desde la versión {version}."),
        ("ticket", "Por favor devuelvan {price} a la cuenta {iban}. Pedido {order}. Saludos, {name}"),
        ("form", "Nombre: {name}\nFecha de nacimiento: {dob}\nTeléfono: {phone}\nDNI: {national_id}"),
        ("form", "{name}, nacida el {dob} en {city}, contacto {email}"),
        ("log", "{isodate} fallo de acceso de {email} desde {ip}, puerto {port}, commit {sha}"),
        ("chat", "escríbeme a {obf_email} o llámame al {phone}"),
        ("note", "Tarjeta {card} cargada el {isodate} por {price}, operación {uuid}."),
    ],
    "it": [
        ("crm", "Cliente {name}, telefono {phone}, email {email}. Richiamare il {meeting}."),
        ("ticket", "Buongiorno, la mia password è {password} ma non riesco ad accedere dalla versione {version}."),
        ("ticket", "Vi prego di rimborsare {price} sul conto {iban}. Ordine {order}. Cordiali saluti, {name}"),
        ("form", "Nome: {name}\nData di nascita: {dob}\nTelefono: {phone}\nCodice fiscale: {national_id}"),
        ("form", "{name}, nato il {dob} a {city}, email {email}"),
        ("log", "{isodate} accesso negato per {email} da {ip}, porta {port}, commit {sha}"),
        ("chat", "scrivimi a {obf_email} oppure chiamami al {phone}"),
        ("note", "Carta {card} addebitata il {isodate} per {price}, pratica {uuid}."),
    ],
    "ja": [
        ("crm", "{name}様の連絡先は{phone}、メールは{email}です。次回の連絡は{isodate}。"),
        ("ticket", "パスワードは{password}です。バージョン{version}からログインできません。注文番号{order}"),
        ("form", "氏名：{name}\n生年月日：{dob}\n電話番号：{phone}\nメール：{email}"),
        ("log", "{isodate} ログイン失敗 {email} {ip} ポート{port} コミット{sha}"),
        ("note", "カード{card}で{price}を支払いました。受付番号{uuid}"),
        ("config", "接続先 {url_userinfo} を使用（ビルド{version}）"),
    ],
}

# Fixed date ranges (faker's defaults are relative to today, which would change the file from day to day).
FIRST_BIRTH, LAST_BIRTH = datetime.date(1935, 1, 1), datetime.date(2007, 12, 31)
FIRST_DAY, LAST_DAY = datetime.date(1995, 1, 1), datetime.date(2026, 12, 31)

PII_SLOTS = {"email": "EMAIL", "obf_email": "EMAIL", "phone": "PHONE", "card": "CREDIT_CARD", "iban": "IBAN",
             "ip": "IP_ADDRESS", "ipv6": "IP_ADDRESS", "url_userinfo": "URL_SECRET", "url_token": "URL_SECRET",
             "password": "SECRET", "aws_id": "SECRET", "aws_secret": "SECRET", "gh_token": "SECRET",
             "slack": "SECRET", "stripe": "SECRET", "dob": "DATE_OF_BIRTH", "national_id": "NATIONAL_ID"}


class Values:
    """Slot values for one locale: faker's providers where they exist, a seeded RNG for token shapes."""

    def __init__(self, locale: str, seed: int) -> None:
        from faker import Faker

        self.locale, (self.lang, self.region) = locale, LOCALES[locale]
        self.f = Faker(locale)
        self.f.seed_instance(seed)
        self.r = random.Random(seed)

    def token(self, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def fill(self, slot: str) -> str | None:
        """The value for `slot`; None where this locale has nothing of the kind (the row is then redrawn)."""
        f, r = self.f, self.r
        if slot == "email":
            return r.choice([f.email, f.free_email, f.company_email, f.safe_email])()
        if slot == "obf_email":
            local, domain = f.free_email().split("@")
            at, dot = r.choice([(" (at) ", " (dot) "), (" [at] ", " [dot] "), (" at ", " dot "), ("(at)", "(dot)")])
            return local + at + domain.replace(".", dot)
        if slot == "phone":
            return f.phone_number()
        if slot == "card":
            return f.credit_card_number()
        if slot == "iban":
            iban = f.iban()
            return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if r.random() < 0.4 else iban
        if slot == "ip":
            return r.choice([f.ipv4_public, f.ipv4_private])()
        if slot == "ipv6":
            groups = [format(r.getrandbits(16), "x") for _ in range(8)]
            start, run = r.randrange(1, 6), r.randrange(1, 4)  # zero groups in the middle: the compressed `::` form
            groups[start:start + run] = ["0"] * run
            return str(ipaddress.IPv6Address(":".join(groups)))
        if slot == "url_userinfo":
            scheme = r.choice(["postgres", "mysql", "https", "redis", "amqp"])
            return f"{scheme}://[{f.user_name()}:{f.password(length=12)}]@{f.domain_name()}/{f.word()}"
        if slot == "url_token":
            param = r.choice(["token", "access_token", "apikey", "auth", "signature"])
            return f"https://{f.domain_name()}/reset?{param}=[{self.token(r.randrange(24, 41))}]"
        if slot == "password":
            return f.password(length=r.randrange(8, 17))
        if slot == "aws_id":
            return "AKIA" + self.token(16, string.ascii_uppercase + string.digits)
        if slot == "aws_secret":
            return base64.b64encode(r.randbytes(30)).decode()
        if slot == "gh_token":
            return "ghp_" + self.token(36)
        if slot == "slack":
            return f"xoxb-{self.token(12, string.digits)}-{self.token(13, string.digits)}-{self.token(24)}"
        if slot == "stripe":
            return "sk_live_" + self.token(24)
        if slot == "dob":
            return self.date(f.date_between_dates(FIRST_BIRTH, LAST_BIRTH))
        if slot == "national_id":
            ids: dict[str, Callable[[], str]] = {"en_US": f.ssn, "fr_FR": f.ssn, "it_IT": f.ssn,
                                                  "es_ES": lambda: r.choice([f.nif, f.nie])()}
            return ids[self.locale]() if self.locale in ids else None
        # ---- look-alikes and plain words -----------------------------------------------------------------------
        if slot == "name":
            return f.name()
        if slot == "first":
            return f.first_name()
        if slot == "username":
            return f.user_name()
        if slot == "city":
            return f.city()
        if slot == "version":
            return ".".join(str(r.randrange(0, 20)) for _ in range(r.choice([2, 3, 4])))
        if slot == "price":
            return f.pricetag()
        if slot == "order":
            return r.choice(["#", "", "A-", "ORD-"]) + str(r.randrange(10 ** 5, 10 ** 10))
        if slot == "isodate":
            return f.date_between_dates(FIRST_DAY, LAST_DAY).isoformat()
        if slot == "meeting":
            return self.date(f.date_between_dates(FIRST_DAY, LAST_DAY))
        if slot == "sha":
            return f.sha1()[:r.choice([7, 12, 40])]
        if slot == "uuid":
            return f.uuid4()
        if slot == "port":
            return str(f.port_number())
        if slot == "isbn":
            return f.isbn13()
        raise KeyError(slot)

    def date(self, d: Any) -> str:
        """A date as people of this locale write it (several common styles each)."""
        r, m = self.r, MONTHS.get(self.lang, MONTHS["en"])
        if self.lang == "ja":
            return r.choice([f"{d.year}年{d.month}月{d.day}日", f"{d.year}/{d.month:02d}/{d.day:02d}"])
        if self.lang == "en":
            us = self.region == "US"
            return r.choice([f"{m[d.month - 1]} {d.day}, {d.year}" if us else f"{d.day} {m[d.month - 1]} {d.year}",
                             f"{d.month:02d}/{d.day:02d}/{d.year}" if us else f"{d.day:02d}/{d.month:02d}/{d.year}",
                             d.isoformat()])
        styles = {"de": [f"{d.day}. {m[d.month - 1]} {d.year}", f"{d.day:02d}.{d.month:02d}.{d.year}"],
                  "fr": [f"{d.day} {m[d.month - 1]} {d.year}", f"{d.day:02d}/{d.month:02d}/{d.year}"],
                  "es": [f"{d.day} de {m[d.month - 1]} de {d.year}", f"{d.day:02d}/{d.month:02d}/{d.year}"],
                  "it": [f"{d.day} {m[d.month - 1]} {d.year}", f"{d.day:02d}/{d.month:02d}/{d.year}"]}
        return r.choice(styles[self.lang])


def render(template: str, values: Values) -> tuple[str, list[dict[str, Any]]] | None:
    """Fill `template`; None when a slot has no value in this locale."""
    text, spans, rest = "", [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        slot, _, rest = after.partition("}")
        text += before
        value = values.fill(slot)
        if value is None:
            return None
        start, end = 0, len(value)
        if slot.startswith("url_"):  # the credentials or token inside the URL, marked [...] by `fill`
            start, end = value.index("["), value.index("]") - 1
            value = value.replace("[", "", 1).replace("]", "", 1)
        if slot in PII_SLOTS:
            spans.append({"type": PII_SLOTS[slot], "start": len(text) + start, "end": len(text) + end,
                          "value": value[start:end]})
        text += value
    return text + rest, spans


def build(per_locale: int = 90, seed: int = 16) -> list[dict[str, Any]]:
    """`per_locale` rows for each locale, templates drawn in turn so each is used about equally."""
    rows: list[dict[str, Any]] = []
    for i, locale in enumerate(LOCALES):
        values = Values(locale, seed * 100 + i)
        lang, region = LOCALES[locale]
        templates = TEMPLATES[lang]
        n = 0
        while n < per_locale:
            kind, template = templates[n % len(templates)]
            rendered = render(template, values)
            if rendered is None:
                templates = [t for t in templates if t[1] != template]
                continue
            text, spans = rendered
            rows.append({"id": f"{locale}-{n:03d}", "locale": locale, "region": region, "kind": kind, "text": text,
                         "spans": spans})
            n += 1
    return rows


def main() -> None:
    import faker

    if os.environ.get("PYTHONHASHSEED") != "0":
        # Some faker providers draw from sets (it_IT cities), whose order follows the string hash seed.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "pii_eval.jsonl"))
    ap.add_argument("-n", type=int, default=90, help="rows per locale")
    ap.add_argument("--seed", type=int, default=16)
    a = ap.parse_args()
    rows = build(a.n, a.seed)
    out = Path(a.out)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out.with_suffix(".faker-version")).write_text(faker.VERSION + "\n", encoding="utf-8")
    counts = Counter(s["type"] for r in rows for s in r["spans"])
    print(f"wrote {len(rows)} rows to {out} (faker {faker.VERSION}): " + ", ".join(f"{t} {n}" for t, n in
                                                                                   sorted(counts.items())))


if __name__ == "__main__":
    main()
