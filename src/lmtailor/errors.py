"""The exceptions lmtailor raises; the CLI turns each into one line for the user."""

from __future__ import annotations


class LmtailorError(Exception):
    """Base class: a problem the user can fix. `hint` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(LmtailorError):
    """A recipe or override is wrong: unknown key, bad value, missing file."""


class DataError(LmtailorError):
    """A data file cannot be read or a record is malformed.

    `problems` holds one line per bad record (file:line: field: what), `count` how many there were.
    """

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None,
                 count: int = 0) -> None:
        super().__init__(message, hint)
        self.problems = problems or []
        self.count = count or len(self.problems)


class ModelError(LmtailorError):
    """A base model cannot be found, downloaded or loaded."""


class OfflineError(ModelError):
    """A hub id was requested but the hub cannot be reached."""


class CheckpointError(LmtailorError):
    """A run folder or checkpoint is missing, incomplete or unsafe to load."""


class TrainingError(LmtailorError):
    """Training cannot go on: a non-finite loss, gradient or weight (the step is named)."""


class EncryptionError(LmtailorError):
    """An encrypted file cannot be opened or written: no key, the wrong key, a damaged or tampered byte."""
