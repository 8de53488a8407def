"""Reading files inside downloaded archives (zip/wheel, tar, .deb) in place: nothing is extracted to disk."""

from __future__ import annotations

import gzip
import io
import lzma
import re
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lmtailor.errors import DataError


def read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the one file in a zip/wheel or tar archive whose path ends with `suffix`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix) and not n.endswith("/")]
            if len(names) == 1:
                return zf.read(names[0])
    else:
        try:
            with tarfile.open(archive) as tf:
                members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(suffix)]
                if len(members) == 1:
                    f = tf.extractfile(members[0])
                    assert f is not None  # regular files always have content
                    return f.read()
        except tarfile.TarError as e:
            raise DataError(f"{archive.name}: not a zip or tar archive ({e})") from None
        names = [m.name for m in members]
    raise DataError(f"{archive.name}: expected one file ending in {suffix!r}, found {len(names)}",
                    "the upstream package layout may have changed")


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The filesystem tarball inside a .deb (an `ar` archive of debian-binary, control.tar.*, data.tar.*)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataError(f"{deb.name}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]  # name(16) mtime(12) uid(6) gid(6) mode(8) size(10) magic(2)
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif name.endswith(".gz"):
                body = gzip.decompress(body)
            elif name != "data.tar":
                raise DataError(f"{deb.name}: {name} uses a compression lmtailor cannot read",
                                "expected data.tar, data.tar.gz or data.tar.xz")
            return tarfile.open(fileobj=io.BytesIO(body))
    raise DataError(f"{deb.name}: no data.tar member")


def deb_files(deb: Path, pattern: str) -> Iterator[tuple[re.Match[str], bytes]]:
    """(match, content) of each regular file in a .deb whose path matches `pattern` (re.search), in path order.

    Symlinks and other non-regular members are skipped; `.gz` files are decompressed.
    """
    regex = re.compile(pattern)
    with deb_data_tar(deb) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            match = regex.search(member.name)
            if member.isfile() and match:
                f = tf.extractfile(member)
                assert f is not None  # regular files always have content
                content = f.read()
                yield match, gzip.decompress(content) if member.name.endswith(".gz") else content
