"""A run folder as one training owns it: a lock, an identity, the previous run kept until the new one finishes.

    with open_run_folder(cfg, main=True) as folder:   # checks the path, takes the lock, cleans staging leftovers
        ...                                            # data, model: a mistake here leaves the old run untouched
        folder.start(identity)                         # the old run's files move aside; run.json names the new run
        ...                                            # steps, checkpoints (their manifests carry the identity)
        folder.finish()                                # the old run's files are deleted

- Lock: `.lmtailor.lock`, an flock held while the training runs; a second training into the folder stops at once.
- Identity (run.json and every checkpoint manifest): a random run id, the sha256 of the resolved recipe, the seed and
  the data fingerprint (sha256 of the data files). A fresh run refuses a folder holding another run's model or
  checkpoints (resume=true continues it, overwrite=true replaces it); resume reads only checkpoints of the folder's
  run and says which settings differ from the checkpoint's (`compare_configs`).
- Nothing a run did not write is moved or deleted: the previous run's files are the names a run writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtailor.checkpoint import PREFIX, list_checkpoints
from lmtailor.config import RunConfig
from lmtailor.errors import CheckpointError, ConfigError
from lmtailor.io import atomic_write_json

LOCK = ".lmtailor.lock"
IDENTITY = "run.json"
PREVIOUS = ".lmtailor-previous-"  # + time stamp: the replaced run's files, until the new run finishes
# What a run writes into its folder (a name with .enc appended is the sealed copy of the file).
RUN_FILES = {"config.yaml", IDENTITY, "history.jsonl", "checkpoints", "tb", "model", "metrics.json", "report.html",
             "task_report.html", "privacy_audit.json"}
# Staging left by a kill inside an atomic write (lmtailor.io): `.NAME.<8 chars>.tmp`, `.NAME.old`, and
# `.step-N.del` of a checkpoint being pruned.
STAGING = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|old)$")
PRUNING = re.compile(rf"^\.{PREFIX}\d+\.del$")
LARGE_FILE = 64 << 20  # data files larger than this are fingerprinted by size, head and tail
EDGE = 8 << 20


def data_fingerprint(cfg: RunConfig) -> str:
    """sha256 over the training and validation data files (a catalog or hub name stands for itself)."""
    from lmtailor.data.sources import local_files
    from lmtailor.errors import DataError

    digest = hashlib.sha256()
    for key in ("path", "val_path"):
        value = getattr(cfg.data, key, None)
        if not value:
            continue
        digest.update(f"{key}\0".encode())
        try:
            files = None if str(value).startswith("catalog:") else local_files(str(value))
        except DataError:
            files = None  # a missing file: reading the data says so
        if not files:
            digest.update(str(value).encode())
            continue
        for path in files:
            _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= LARGE_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:  # a pretraining corpus: its size, first and last EDGE bytes
            digest.update(f.read(EDGE))
            f.seek(size - EDGE)
            digest.update(f.read(EDGE))


def recipe_hash(config: dict[str, Any]) -> str:
    """sha256 of a resolved recipe, without the keys that only say how to start it."""
    kept = {k: v for k, v in config.items() if k not in IGNORED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# ---- what a resumed run may change -------------------------------------------------------------------------------
# Keys that only say how to start or where the files live.
IGNORED = {"resume", "overwrite", "name", "output_dir", "tune", "privacy"}
# Keys a resumed run applies from its resume step on (warned about); every other difference is refused, because the
# checkpoint could not hold it (another model, method, adapter shape, objective) or the data position of each step
# would change under it (seed, batch_size, the data and how it is cut into items).
CAN_CHANGE = {"lr", "epochs", "max_steps", "budget", "scheduler", "warmup_ratio", "max_grad_norm", "micro_batch_size",
              "eval_every", "save_every", "keep_checkpoints", "early_stopping_patience", "eval", "generation",
              "data.path", "data.val_path", "data.test_path"}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and prefix + key not in CAN_CHANGE:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _lookup(config: dict[str, Any], path: list[str]) -> Any:
    for part in path:
        config = config.get(part) if isinstance(config, dict) else None  # type: ignore[assignment]
    return config


def compare_configs(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes a resumed run applies, changes it refuses), each as 'key old -> new'."""
    before, after = _flatten(old), _flatten(new)
    applied: list[str] = []
    refused: list[str] = []
    common = set(before) & set(after)  # a key only one side has is another lmtailor version's ...
    for key in set(before) ^ set(after):  # ... unless a section was unset on one side (pretrain.scratch: null)
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in before or prefix in after:
                before.setdefault(prefix, _lookup(old, parts[:i]))
                after.setdefault(prefix, _lookup(new, parts[:i]))
                common.add(prefix)
    for key in sorted(common):
        if key.split(".")[0] in IGNORED or before[key] == after[key]:
            continue
        text = f"{key} {before[key]} -> {after[key]}"
        (applied if key in CAN_CHANGE or key.split(".")[0] in CAN_CHANGE else refused).append(text)
    return applied, refused


# ---- the folder ------------------------------------------------------------------------------------------------
@dataclass
class RunFolder:
    """One training's hold on its run folder (see the module docstring)."""

    path: Path
    main: bool
    lock_fd: int | None = None
    previous: dict[str, int] = field(default_factory=dict)  # name -> inode of the old run's files at start-up
    aside: Path | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        """The id in run.json (None in a folder written before run identities)."""
        try:
            loaded = json.loads((self.path / IDENTITY).read_text())
        except (OSError, ValueError):
            return None
        return str(loaded.get("id")) if isinstance(loaded, dict) and loaded.get("id") else None

    def start(self, identity: dict[str, Any], resume: bool) -> None:
        """The run really starts: a fresh one moves the previous run's files aside and writes run.json."""
        if not self.main:
            return
        if resume:
            self.identity = {**identity, "id": self.run_id or identity["id"]}
            if self.run_id is None:
                atomic_write_json(self.path / IDENTITY, self.identity)
            return
        moving = [name for name, inode in self.previous.items()
                  if (self.path / name).exists() and (self.path / name).lstat().st_ino == inode]
        if moving:
            self.aside = self.path / f"{PREVIOUS}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            self.aside.mkdir()
            for name in moving:
                os.replace(self.path / name, self.aside / name)
            print(f"the previous run's files are kept in {self.aside} until this run finishes")
        self.identity = identity
        atomic_write_json(self.path / IDENTITY, identity)

    def finish(self) -> None:
        """The new run finished: the previous run's files go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None


def new_identity(cfg: RunConfig, config: dict[str, Any]) -> dict[str, Any]:
    """A fresh run's identity: random id, recipe hash, seed, data fingerprint (and the config, for manifests)."""
    return {"id": uuid.uuid4().hex[:16], "recipe_hash": recipe_hash(config), "seed": cfg.seed,
            "data_fingerprint": data_fingerprint(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@contextlib.contextmanager
def open_run_folder(cfg: RunConfig, main: bool) -> Iterator[RunFolder]:
    """Check cfg.run_dir, create it, lock it and clean its staging leftovers (main process); see the module doc.

    Raises:
        ConfigError: output_dir is a file, lies under a file, cannot be created or written, or holds another run.
        CheckpointError: another training holds the folder, or its `checkpoints` is a file.
    """
    path = cfg.run_dir
    folder = RunFolder(path, main)
    if main:
        _make_folder(path)
        folder.lock_fd = _lock(path)
    else:
        path.mkdir(parents=True, exist_ok=True)
    try:
        if main:
            _clean_staging(path)
            folder.previous = _check_previous(cfg, path)
        yield folder
    finally:
        folder.close()


def _make_folder(path: Path) -> None:
    where = "config key 'output_dir'"
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == path else f"lies under {parent}, which is a file"
            raise ConfigError(f"{where}: the run folder {path} {what}", "give output_dir a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{where}: cannot create the run folder {path}: {e.strerror or e}",
                          "give output_dir a folder you may write to") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: the run folder {path} is not writable",
                          "give output_dir a folder you may write to")
    checkpoints = path / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise CheckpointError(f"{checkpoints} is a file, where the run keeps its checkpoint folders",
                              "move it away, or give another output_dir")


def _lock(path: Path) -> int:
    import fcntl

    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"config key 'output_dir': cannot write {lock}: {e.strerror or e}",
                          "give output_dir a folder you may write to") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise CheckpointError(f"run folder {path} is in use by another training (pid {holder})",
                                  "wait for it to end, or give another output_dir") from None
        raise ConfigError(f"cannot lock the run folder {path}: {e.strerror or e}") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _clean_staging(path: Path) -> None:
    """Remove what a kill inside an atomic write left (only names lmtailor.io gives its staging).

    A `.NAME.old` whose NAME is missing is the only copy (the kill fell between the two renames): it is put back.
    """
    for root in (path, path / "checkpoints"):
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            match = STAGING.match(entry.name)
            if match and not (_run_file(match["name"]) if root == path else _step_name(match["name"])):
                continue  # not a name lmtailor writes here: not ours to touch
            if match and entry.name.endswith(".old") and not (root / match["name"]).exists():
                os.replace(entry, root / match["name"])
            elif match or PRUNING.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _run_file(name: str) -> bool:
    return name in RUN_FILES or name.removesuffix(".enc") in RUN_FILES or name.endswith((".png", ".png.enc"))


def _step_name(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX):].isdigit()


def _check_previous(cfg: RunConfig, path: Path) -> dict[str, int]:
    """The previous run's files a fresh run will move aside (name -> inode); raises when they are worth keeping."""
    run_folder = (path / "config.yaml").exists() or (path / IDENTITY).exists()
    names = [e.name for e in path.iterdir() if e.name in RUN_FILES or e.name.removesuffix(".enc") in RUN_FILES
             or (run_folder and e.name.endswith((".png", ".png.enc")))]
    if cfg.resume or not names:
        return {}
    finished = (path / "model").exists()
    checkpoints = list_checkpoints(path)
    if (finished or checkpoints) and not cfg.overwrite:
        what = "a finished run" if finished else f"checkpoints of an unfinished run (newest {checkpoints[-1].name})"
        raise ConfigError(f"run folder {path} already holds {what}",
                          "resume=true continues it; overwrite=true replaces it, keeping it until the new run "
                          "finishes; or give another name or output_dir")
    return {name: (path / name).lstat().st_ino for name in names}
