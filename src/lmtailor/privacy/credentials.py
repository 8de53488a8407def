"""Credentials: API keys and tokens of known shapes, private keys, secrets announced by a word ("password is",
"Passwort lautet", `api_key=`), a cloud secret key written alone, and the credentials or tokens inside URLs."""

from __future__ import annotations

import re
from collections.abc import Iterator

from lmtailor.privacy.findings import (
    DEFAULT_OPTIONS,
    SECRET,
    URL_SECRET,
    Finding,
    ScanOptions,
    shannon_entropy,
)

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
