"""The errors a user can fix, shown by the command line as one ``plait: error:`` line
with no traceback. Each is defined beside the code that raises it and derives from
:class:`PlaitError` (besides the built-in type it refines), so any layer can tell them
apart without importing the layers above it."""

from __future__ import annotations


class PlaitError(Exception):
    """Base of every error that is the user's to fix (bad config, data, rewards,
    checkpoints, models, a failed rank, a diverged run)."""


class TrainingDiverged(PlaitError, RuntimeError):
    """The loss or gradients stayed non-finite; the last good checkpoint is intact."""


def known_errors() -> tuple[type[BaseException], ...]:
    """Every error type that is the user's to fix: plait's own, and a missing file."""
    return (PlaitError, FileNotFoundError)
