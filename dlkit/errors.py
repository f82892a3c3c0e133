"""Errors a user can act on.

Library code raises these; only the CLI catches them and turns them into one red line on stderr
(plus a hint) and a non-zero exit. Anything else escaping is a bug and shows a traceback.
"""

from __future__ import annotations


class DlkitError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(DlkitError):
    """A bad option value or combination of options."""

    exit_code = 2


class NotFoundError(UsageError):
    """An unknown model, dataset or other registered name."""


class IncompatibleError(UsageError):
    """A model and a dataset (or input shape) that cannot work together."""


class OutputError(UsageError):
    """An output path that cannot be written, or that something else holds or blocks."""


class DataError(DlkitError):
    """Data that cannot be found, downloaded, verified or parsed."""


class ArtifactError(DlkitError):
    """An artifact that is missing, corrupted, foreign or unsafe to load."""


class TrainingError(DlkitError):
    """Training that cannot go on (a NaN loss, say)."""


class Interrupted(DlkitError):
    """A run stopped by Ctrl-C or SIGTERM after saving what it could."""

    exit_code = 130
