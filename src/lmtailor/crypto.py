"""Encryption at rest: files and folders sealed with AES-256-GCM in a chunked, versioned envelope.

Why chunks: a data file or a model may be larger than memory, so it is sealed and opened a chunk at a time, and
each chunk is authenticated on its own. Every chunk's nonce holds its index and a final-chunk flag (the STREAM
construction), so chunks cannot be reordered, dropped, repeated or cut off at a chunk boundary without the tag
check failing. Every chunk also authenticates the whole header, so no header byte can change either.

Envelope, version 1 (all integers big-endian)::

    offset size
         0    6  magic b"LMTENC"
         6    1  version (1)
         7    1  cipher (1: AES-256-GCM)
         8    1  key kind (0: a 32-byte key; 1: a passphrase through scrypt)
         9    3  scrypt log2(n), r, p (zeros for a key)
        12    4  plaintext bytes per chunk
        16   16  scrypt salt (zeros for a key)
        32   16  file salt: HKDF-SHA256(master, file salt) gives this file's AES key and key check
        48   16  key check: tells a wrong key from a damaged file before any chunk is opened
        64       chunks: ciphertext + 16-byte tag; nonce = chunk index (11 bytes) + final flag (1 byte)

The last chunk carries the final flag (an empty file is one empty final chunk). Each file has its own AES key
(derived from a random salt), so the counter nonces never repeat under one key.

Keys come from an environment variable (32 bytes as base64 or hex), a key file (the same text, or 32 raw bytes)
or a passphrase stretched with scrypt. Data readers find the key through `KeySource` (`use_keys` sets which one a
run uses): the key is a process-wide secret, like the environment variable it usually lives in.

This module sits at the bottom of the package (next to `io`): the data readers below `privacy` open encrypted
files through it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lmtailor.errors import EncryptionError
from lmtailor.io import atomic_dir, atomic_file, atomic_write_bytes
from lmtailor.outputs import check_output, replacing

MAGIC = b"LMTENC"
VERSION = 1
CIPHER_AES256GCM = 1
KIND_KEY, KIND_PASSPHRASE = 0, 1
HEADER = struct.Struct(">6sBBBBBBI16s16s16s")  # 64 bytes, the table in the module docstring
TAG = 16
CHUNK = 1 << 16  # 64 KiB: a tag per 64 KiB costs 0.02% in size
MIN_CHUNK, MAX_CHUNK = 1 << 10, 1 << 26  # what a reader accepts: a damaged size field cannot ask for GBs
# scrypt n=2^15, r=8: 32 MiB and about 0.1 s per key derivation (RFC 7914's interactive setting is n=2^14).
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 15, 8, 1
SUFFIX = ".enc"
DEFAULT_KEY_ENV = "LMTAILOR_DATA_KEY"
_HINT_KEY = (f"set {DEFAULT_KEY_ENV} to the key (`lmtailor privacy keygen` makes one), or name another source "
             "with privacy.key_env / privacy.key_file / privacy.passphrase_env")


# ---- keys --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Key:
    """A 32-byte key, or a passphrase that scrypt stretches into one per file. `repr` never shows the secret."""

    secret: bytes
    passphrase: bool = False
    origin: str = "a key"

    def __repr__(self) -> str:
        return f"Key({self.origin})"

    @property
    def kind(self) -> int:
        return KIND_PASSPHRASE if self.passphrase else KIND_KEY


def parse_key(text: bytes, origin: str, allow_raw: bool = False) -> Key:
    """32 bytes written as base64 or hex (surrounding whitespace ignored), or (a key file) the 32 raw bytes.

    Raw bytes that are all ASCII are refused: such a "key" is text (a 128-bit hex key, a password), and taking it
    as 32 key bytes would silently use far fewer than 256 bits.

    Raises:
        EncryptionError: anything else (the message names `origin`, never the value).
    """
    stripped = text.strip()
    for decode in (_from_hex, _from_base64):
        raw = decode(stripped)
        if raw is not None and len(raw) == 32:
            return Key(raw, origin=origin)
    if allow_raw and len(text) == 32 and not text.isascii():
        return Key(text, origin=origin)
    raise EncryptionError(f"{origin} is not a 32-byte key",
                          "write 32 bytes as base64 or hex (`lmtailor privacy keygen --out FILE` writes one), or use "
                          "a passphrase (--passphrase-env / privacy.passphrase_env)")


def _from_hex(text: bytes) -> bytes | None:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def _from_base64(text: bytes) -> bytes | None:
    for altchars in (None, b"-_"):  # standard, then URL-safe alphabet
        try:
            return base64.b64decode(text, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def new_key_text() -> str:
    """A fresh random key as base64 text (44 characters), for a key file or an environment variable."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def keygen(out: str | Path) -> str:
    """Write a fresh key file readable by its owner only (mode 0600); refuse to replace an existing file.

    Raises:
        EncryptionError: `out` exists (a key lost is data lost).
    """
    path = Path(out)
    if path.exists() or path.is_symlink():
        raise EncryptionError(f"{path} already exists", "pick another path: replacing a key makes what it "
                              "encrypted unreadable")
    check_output(path, folder=False)  # under a file, or in a folder that cannot be written: one line
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL + 0600 at creation: the key is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_text() + "\n")
    return f"wrote a new 256-bit key to {path} (mode 0600); keep a copy somewhere safe"


@dataclass(frozen=True)
class KeySource:
    """Where a key comes from: an environment variable holding a key, a key file, or one holding a passphrase.

    Only names are kept here, never the secret, so a KeySource can sit in a config or a log line.
    """

    key_env: str | None = DEFAULT_KEY_ENV
    key_file: str | None = None
    passphrase_env: str | None = None

    def describe(self) -> str:
        parts = [f"${self.key_env}" if self.key_env else "", f"key file {self.key_file}" if self.key_file else "",
                 f"passphrase ${self.passphrase_env}" if self.passphrase_env else ""]
        return " or ".join(p for p in parts if p) or "no key source"

    def load(self) -> Key:
        """The key: the key file if named, else the passphrase variable if set, else the key variable.

        Raises:
            EncryptionError: the file cannot be read, or no variable named here is set, or the key is malformed.
        """
        if self.key_file:
            try:
                raw = Path(os.path.expanduser(self.key_file)).read_bytes()
            except OSError as e:
                raise EncryptionError(f"key file {self.key_file} cannot be read ({e.strerror or e})",
                                      "check the path, or make one with `lmtailor privacy keygen --out FILE`") from None
            return parse_key(raw, f"key file {self.key_file}", allow_raw=True)
        if self.passphrase_env and os.environ.get(self.passphrase_env):
            return Key(os.environ[self.passphrase_env].encode("utf-8"), passphrase=True,
                       origin=f"the passphrase in ${self.passphrase_env}")
        if self.key_env and os.environ.get(self.key_env):
            return parse_key(os.environ[self.key_env].encode("utf-8"), f"${self.key_env}")
        raise EncryptionError(f"no key: {self.describe()} is not set", _HINT_KEY)


_active = KeySource()


def active_keys() -> KeySource:
    """The key source data readers use (default: the key in $LMTAILOR_DATA_KEY)."""
    return _active


@contextlib.contextmanager
def use_keys(source: KeySource) -> Iterator[None]:
    """Let every reader inside the block open encrypted files with keys from `source`."""
    global _active
    previous, _active = _active, source
    try:
        yield
    finally:
        _active = previous


def _resolve(key: Key | KeySource | None) -> Key:
    if isinstance(key, Key):
        return key
    return (key or _active).load()


# ---- the envelope ------------------------------------------------------------------------------------------------

def _master(key: Key, log_n: int, r: int, p: int, salt: bytes) -> bytes:
    if not key.passphrase:
        return key.secret
    return Scrypt(salt=salt, length=32, n=1 << log_n, r=r, p=p).derive(key.secret)


def _file_keys(master: bytes, file_salt: bytes) -> tuple[AESGCM, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=file_salt, info=b"lmtailor envelope v1").derive(master)
    return AESGCM(okm[:32]), okm[32:]


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class _Sealer(io.RawIOBase):
    """A write-only stream that encrypts what is written to it into `dst`, one chunk at a time.

    A full chunk is only sealed once more bytes arrive, because only then is it known not to be the last.
    """

    def __init__(self, dst: IO[bytes], key: Key, chunk: int = CHUNK, scrypt_log_n: int = SCRYPT_LOG_N) -> None:
        super().__init__()
        if not MIN_CHUNK <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk size {chunk} outside [{MIN_CHUNK}, {MAX_CHUNK}]: readers would refuse the file")
        salt = os.urandom(16) if key.passphrase else bytes(16)
        log_n, r, p = (scrypt_log_n, SCRYPT_R, SCRYPT_P) if key.passphrase else (0, 0, 0)
        file_salt = os.urandom(16)
        self._aead, check = _file_keys(_master(key, log_n, r, p, salt), file_salt)
        self._header = HEADER.pack(MAGIC, VERSION, CIPHER_AES256GCM, key.kind, log_n, r, p, chunk, salt,
                                   file_salt, check)
        self._dst, self._chunk, self._index = dst, chunk, 0
        self._buf = bytearray()
        dst.write(self._header)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buf += data
        while len(self._buf) > self._chunk:
            self._seal(bytes(self._buf[:self._chunk]), final=False)
            del self._buf[:self._chunk]
        return len(data)

    def _seal(self, plain: bytes, final: bool) -> None:
        self._dst.write(self._aead.encrypt(_nonce(self._index, final), plain, self._header))
        self._index += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._buf), final=True)
            self._buf.clear()
        super().close()


class _Opener(io.RawIOBase):
    """A read-only stream of the plaintext of an envelope, checked chunk by chunk as it is read.

    Bytes handed out are authentic (each chunk's tag is checked first); that nothing was cut off is known only
    when the final chunk is reached, so a reader must read to the end before trusting that it saw everything.
    """

    def __init__(self, src: IO[bytes], key: Key, name: str) -> None:
        super().__init__()
        self._src, self._name = src, name
        head = src.read(HEADER.size)
        magic, version, cipher, kind, log_n, r, p, chunk, salt, file_salt, check = _parse_header(head, name)
        if kind != key.kind:
            how = "a passphrase" if kind == KIND_PASSPHRASE else "a 32-byte key"
            raise EncryptionError(f"{name} was encrypted with {how}, but {key.origin} was given",
                                  "give " + ("--passphrase-env / privacy.passphrase_env" if kind == KIND_PASSPHRASE
                                             else "--key-env / --key-file (privacy.key_env / privacy.key_file)"))
        if kind == KIND_PASSPHRASE and not (10 <= log_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16):
            raise EncryptionError(f"{name}: damaged header (scrypt parameters out of range)")
        if not MIN_CHUNK <= chunk <= MAX_CHUNK:
            raise EncryptionError(f"{name}: damaged header (chunk size {chunk})")
        self._aead, expected = _file_keys(_master(key, log_n, r, p, salt), file_salt)
        if not hmac.compare_digest(expected, check):
            raise EncryptionError(f"{name}: wrong key ({key.origin} did not encrypt this file, or its header "
                                  "is damaged)", "give the key it was encrypted with")
        self._header, self._chunk, self._index = head, chunk, 0
        self._pending = src.read(chunk + TAG)
        self._plain = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._src.close()
        super().close()

    def _next(self) -> bool:
        """Decrypt the next chunk into the buffer; False at the end."""
        if self._done:
            return False
        block = self._pending
        # A chunk is the final one when nothing follows it; the tag check then confirms the writer said so too.
        self._pending = self._src.read(self._chunk + TAG) if len(block) == self._chunk + TAG else b""
        final = not self._pending
        if len(block) < TAG:
            raise EncryptionError(f"{self._name}: truncated (chunk {self._index} is missing)",
                                  "the file was cut short; restore it from the original")
        try:
            self._plain = self._aead.decrypt(_nonce(self._index, final), block, self._header)
        except InvalidTag:
            raise EncryptionError(f"{self._name}: damaged or tampered (chunk {self._index} fails its check)",
                                  "restore the file from its original") from None
        self._index += 1
        self._done = final
        return True

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._plain:
            if not self._next():
                return 0
        n = min(len(b), len(self._plain))
        b[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n


def _parse_header(head: bytes, name: str) -> tuple[bytes, int, int, int, int, int, int, int, bytes, bytes, bytes]:
    if len(head) < HEADER.size or not head.startswith(MAGIC):
        raise EncryptionError(f"{name}: not an lmtailor encrypted file",
                              "encrypt it with `lmtailor privacy encrypt`, or read it as plain data")
    fields = HEADER.unpack(head)
    if fields[1] != VERSION or fields[2] != CIPHER_AES256GCM:
        raise EncryptionError(f"{name}: envelope version {fields[1]}, cipher {fields[2]} is not one this lmtailor "
                              "reads", f"this lmtailor reads version {VERSION}, cipher {CIPHER_AES256GCM}")
    return fields  # type: ignore[no-any-return]


def is_encrypted(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the envelope's magic bytes (a folder or missing path: False)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def inner_name(path: str | Path) -> str:
    """The name of the plaintext: `train.jsonl.enc` -> `train.jsonl` (other names unchanged)."""
    name = Path(path).name
    return name[:-len(SUFFIX)] if name.lower().endswith(SUFFIX) and len(name) > len(SUFFIX) else name


# ---- reading ------------------------------------------------------------------------------------------------------

def open_bytes(path: str | Path, key: Key | KeySource | None = None) -> BinaryIO:
    """A binary stream of a file's content: decrypted on the fly if it is encrypted, the file itself if not.

    The plaintext of an encrypted file is never written anywhere; memory holds one chunk at a time. A damaged
    chunk raises EncryptionError from `read` when the stream reaches it.

    Raises:
        EncryptionError: no key, the wrong key, or a damaged header.
        OSError: the file cannot be opened.
    """
    f = open(path, "rb")  # noqa: SIM115 - handed to the caller, or closed below on failure
    try:
        if f.read(len(MAGIC)) != MAGIC:
            f.seek(0)
            return f
        f.seek(0)
        return io.BufferedReader(_Opener(f, _resolve(key), str(path)), buffer_size=CHUNK)  # type: ignore[return-value]
    except BaseException:
        f.close()
        raise


def read_bytes(path: str | Path, key: Key | KeySource | None = None) -> bytes:
    """The whole content of a file, decrypted in memory if it is encrypted (see `open_bytes`)."""
    with open_bytes(path, key) as f:
        return f.read()


def open_text(path: str | Path, key: Key | KeySource | None = None, encoding: str = "utf-8",
              newline: str | None = None) -> IO[str]:
    """A text stream of a file, decrypted on the fly if it is encrypted (see `open_bytes`)."""
    return io.TextIOWrapper(open_bytes(path, key), encoding=encoding, newline=newline)


# ---- files and folders --------------------------------------------------------------------------------------------

def encrypt_file(src: str | Path, out: str | Path, key: Key | KeySource | None = None, chunk: int = CHUNK,
                 scrypt_log_n: int = SCRYPT_LOG_N) -> Path:
    """Encrypt one file into `out`, streaming (constant memory); `out` appears whole or not at all.

    Raises:
        EncryptionError: no key; `src` is already encrypted (twice-sealed files are a mistake, not a feature).
    """
    src, out = Path(src), Path(out)
    if is_encrypted(src):
        raise EncryptionError(f"{src} is already encrypted", "decrypt it first, or use it as it is")
    secret = _resolve(key)
    with open(src, "rb") as fin, atomic_file(out) as tmp, open(tmp, "wb") as fout:
        sealer = _Sealer(fout, secret, chunk, scrypt_log_n)
        shutil.copyfileobj(fin, sealer, CHUNK)
        sealer.close()
    return out


def decrypt_file(src: str | Path, out: str | Path, key: Key | KeySource | None = None) -> Path:
    """Decrypt one file into `out`. A wrong key or any damaged byte raises and leaves `out` as it was.

    Raises:
        EncryptionError: no key, the wrong key, `src` not encrypted, damaged or tampered.
    """
    src, out = Path(src), Path(out)
    _require_envelope(src)
    with open_bytes(src, key) as fin, atomic_file(out) as tmp, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
    return out


def _require_envelope(src: Path) -> None:
    if not src.is_file():
        raise EncryptionError(f"{src}: no such file", "give the path of a file `lmtailor privacy encrypt` wrote")
    if not is_encrypted(src):
        raise EncryptionError(f"{src}: not an lmtailor encrypted file", "it is already plain; nothing to decrypt")


def seal_bytes(data: bytes, key: Key | KeySource | None = None) -> bytes:
    """The envelope of `data`, in memory (for small files written by a library into a buffer)."""
    buf = io.BytesIO()
    sealer = _Sealer(buf, _resolve(key))
    sealer.write(data)
    sealer.close()
    return buf.getvalue()


def write_bytes(path: str | Path, data: bytes, key: Key | KeySource | None = None) -> Path:
    """Encrypt `data` (already in memory) into `path`, atomically."""
    secret = _resolve(key)
    with atomic_file(path) as tmp, open(tmp, "wb") as fout:
        sealer = _Sealer(fout, secret)
        sealer.write(data)
        sealer.close()
    return Path(path)


def encrypt_tree(src: str | Path, out: str | Path, key: Key | KeySource | None = None, suffix: str = "") -> Path:
    """Encrypt every file of a folder into `out`, same layout (+ `suffix` on each name); `out` appears whole.

    A file per file, rather than one archive, so a run folder keeps its shape: `config.json` stays where a
    loader looks for it, and a checkpoint's files can be read one at a time.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EncryptionError(f"{src}: not a folder")
    secret = _resolve(key)
    with atomic_dir(out) as tmp:
        for path in sorted(src.rglob("*")):
            if path.is_file() and not path.is_symlink():
                target = tmp / (path.relative_to(src).as_posix() + suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "rb") as fin, open(target, "wb") as fout:
                    sealer = _Sealer(fout, secret)
                    shutil.copyfileobj(fin, sealer, CHUNK)
                    sealer.close()
    return out


def decrypt_tree(src: str | Path, out: str | Path, key: Key | KeySource | None = None) -> Path:
    """Decrypt every encrypted file of a folder into `out` (`.enc` dropped from names; plain files copied).

    Every file is checked before `out` appears: on a wrong key or a damaged byte `out` is left as it was.
    """
    src, out = Path(src), Path(out)
    secret = _resolve(key)
    with atomic_dir(out) as tmp:
        for path in sorted(src.rglob("*")):
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(src)
                target = tmp / rel.parent / inner_name(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open_bytes(path, secret) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, CHUNK)
    return out


def has_encrypted_files(folder: str | Path) -> bool:
    """Whether any file directly in `folder` is encrypted (a sealed model or checkpoint folder)."""
    folder = Path(folder)
    return folder.is_dir() and any(is_encrypted(p) for p in folder.iterdir() if p.is_file())


@contextlib.contextmanager
def plain_staging() -> Iterator[Path]:
    """A private (0700) temporary folder in RAM (/dev/shm) for plaintext a library insists on reading from or
    writing to files (transformers' save_pretrained / from_pretrained); removed when the block ends.

    RAM rather than disk, so no plaintext is ever at rest; where no RAM-backed folder exists, the system's
    temporary folder is used (still removed at the end) and a warning says so.
    """
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    if root is None:
        import logging

        logging.getLogger(__name__).warning("no RAM-backed /dev/shm here: decrypted files are staged in the "
                                            "system's temporary folder while they load")
    folder = Path(tempfile.mkdtemp(prefix="lmtailor-plain-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- sealing a run's outputs ---------------------------------------------------------------------------------------

_seal_key: Key | None = None


def sealing_key() -> Key | None:
    """The key a run's outputs are encrypted with (`encrypt_outputs`), or None when they are written plain."""
    return _seal_key


@contextlib.contextmanager
def seal_outputs(key: Key | None) -> Iterator[None]:
    """Inside the block, writers of run outputs (checkpoints, model, reports) encrypt with `key` (None: plain).

    Set once by `train` for the whole run, so that the training loop need not carry the key to each writer.
    """
    global _seal_key
    previous, _seal_key = _seal_key, key
    try:
        yield
    finally:
        _seal_key = previous


def write_output(path: str | Path, data: bytes | str) -> Path:
    """Write an output file atomically: sealed as `NAME.enc` while outputs are sealed (`seal_outputs`), else plain.

    Returns:
        The path written.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if _seal_key is None:
        atomic_write_bytes(path, raw)
        return Path(path)
    return write_bytes(Path(f"{path}{SUFFIX}"), raw, _seal_key)


def encrypt_path(src: str | Path, out: str | Path, key: Key | KeySource | None = None, force: bool = False) -> str:
    """`privacy encrypt`: a file into one encrypted file, or a folder into a folder of them; a line for the user.
    An existing `out` is an error unless `force`, which keeps it as `NAME.bak-<time>`."""
    src = Path(src)
    if not src.exists():
        raise EncryptionError(f"{src}: no such file or folder")
    target = check_output(out, force, folder=src.is_dir(), inputs=(src,))
    with replacing(target, force):
        if src.is_dir():
            encrypt_tree(src, out, key)
            return f"encrypted every file of {src} -> {out}"
        encrypt_file(src, out, key)
    return f"encrypted {src} -> {out}"


def decrypt_path(src: str | Path, out: str | Path, key: Key | KeySource | None = None, force: bool = False) -> str:
    """`privacy decrypt`: an encrypted file back to a file, or a folder of them (a run's model/) to a folder.
    An existing `out` is an error unless `force`, which keeps it as `NAME.bak-<time>`."""
    src = Path(src)
    target = check_output(out, force, folder=src.is_dir(), inputs=(src,) if src.exists() else ())
    with replacing(target, force):
        if src.is_dir():
            decrypt_tree(src, out, key)
            return f"decrypted every file of {src} -> {out}"
        decrypt_file(src, out, key)
    return f"decrypted {src} -> {out}"
