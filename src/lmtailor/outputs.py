"""What a verb may do to the path its `--out` names: create it, or with `--force` replace it keeping a backup.

    out = check_output(args.out, force, folder=True)    # before any work: a one-line error, nothing written
    ...                                                  # the work
    with replacing(out, force):                          # an existing output moves to NAME.bak-<time>, kept;
        write(out)                                       #   restored if the write fails
    with staged_folder(out, force) as tmp:               # or: fill a hidden new folder, which takes out's place
        write_files(tmp)                                 #   in one rename at the end (removed if the block fails)

No verb deletes or moves a file or folder it did not create: an existing output is an error unless `--force`, and
`--force` renames it to a visible backup instead of deleting it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lmtailor.errors import ConfigError

log = logging.getLogger(__name__)
FORCE_HINT = "give another path, or pass --force to replace it (the old one is kept as {name}.bak-<time>)"


def check_output(path: str | Path, force: bool = False, *, folder: bool, flag: str = "--out",
                 inputs: tuple[str | Path, ...] = ()) -> Path:
    """`path` as an output a verb may write: checked before any work.

    Args:
        path: the output path as given.
        force: an existing output may be replaced (it is kept as a backup by `replacing`).
        folder: the output is a folder (else a file).
        flag: the option that named it, for the message.
        inputs: paths the verb reads; an output may not contain them (a --force backup would take them away).

    Raises:
        ConfigError: the path exists (without force), is of the other kind, is or contains the current folder or
            an input, lies under a file, or cannot be created.
    """
    out = Path(path).expanduser()
    where = f"{flag} {path}"
    resolved = out.resolve()
    for inside in (Path.cwd(), *(Path(p).expanduser() for p in inputs)):
        target = inside.resolve()
        if resolved == target or resolved in target.parents:
            what = "the current folder" if inside == Path.cwd() else f"the input {inside}"
            raise ConfigError(f"{where} is or contains {what}", "write the output to a new path")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{where}: {parent} is a file, not a folder", "give a path in an existing folder")
    if out.exists() or out.is_symlink():
        if out.is_dir() and not folder:
            raise ConfigError(f"{where} is a folder; this output is a file", "give a file path")
        if not out.is_dir() and folder:
            raise ConfigError(f"{where} is a file; this output is a folder", "give a folder path")
        if not force:
            raise ConfigError(f"{where} already exists", FORCE_HINT.format(name=out.name))
    existing = next(p for p in (out.parent, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot create it, {existing} is not writable",
                          "give a path in a folder you may write to")
    return out


def existing(*paths: str | Path | None) -> tuple[Path, ...]:
    """The paths among `paths` that exist (inputs a verb reads, for check_output's `inputs`)."""
    return tuple(Path(p).expanduser() for p in paths if p and Path(p).expanduser().exists())


def backup_path(path: Path) -> Path:
    """A free `NAME.bak-<time>` beside `path`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.bak-{stamp}-{n}")
    return candidate


def set_aside(path: Path, force: bool = False, flag: str = "--out") -> Path | None:
    """Before a verb starts filling `path` in place: an existing one (allowed by `force` only) is renamed to a
    backup, which is returned (None when there was nothing)."""
    if not (path.exists() or path.is_symlink()):
        return None
    if not force:
        raise ConfigError(f"{flag} {path} already exists", FORCE_HINT.format(name=path.name))
    backup = backup_path(path)
    os.replace(path, backup)
    log.warning(f"the previous {path} is kept as {backup}")
    return backup


@contextlib.contextmanager
def replacing(path: Path, force: bool = False, flag: str = "--out") -> Iterator[Path | None]:
    """Write `path` inside this block; an existing one (allowed by `force` only) is renamed to a backup first and
    put back if the block fails. An OSError of the write becomes a one-line ConfigError. Yields the backup path."""
    backup = None
    if path.exists() or path.is_symlink():
        if not force:
            raise ConfigError(f"{flag} {path} already exists", FORCE_HINT.format(name=path.name))
        backup = backup_path(path)
        os.replace(path, backup)
    try:
        yield backup
    except BaseException as e:
        if backup is not None and not (path.exists() or path.is_symlink()):
            os.replace(backup, path)
        elif backup is not None:
            log.warning(f"the previous {path} is kept as {backup}")
        if isinstance(e, OSError):
            raise ConfigError(f"{flag} {path}: cannot write it: {e.strerror or e}",
                              "give a path in a folder you may write to") from e
        raise
    if backup is not None:
        log.warning(f"the previous {path} is kept as {backup}")


@contextlib.contextmanager
def staged_folder(path: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Fill a folder output atomically: yields a new hidden folder beside `path`; when the block succeeds it takes
    `path`'s place in one rename (an existing `path`, allowed by `force` only, is kept as a backup). If the block
    fails, the hidden folder is removed and `path` is left as it was. An OSError becomes a one-line ConfigError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create it: {e.strerror or e}",
                          "give a path in a folder you may write to") from e
    try:
        try:
            yield tmp
        except OSError as e:
            raise ConfigError(f"{flag} {path}: cannot write it: {e.strerror or e}",
                              "give a path in a folder you may write to") from e
        with replacing(path, force, flag):
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
