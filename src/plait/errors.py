"""The errors a user can fix, shown by the command line as one ``plait: error:`` line
with no traceback. Import-light: the classes are defined beside the code that raises
them and imported here only when asked for, so any layer may ask."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite; the last good checkpoint is intact."""


def known_errors() -> tuple[type[BaseException], ...]:
    """Every error type that is the user's to fix (bad config, data, rewards, checkpoints,
    models, a failed rank, a diverged run)."""
    from plait.config import ConfigError
    from plait.data.datasets import DataError
    from plait.rewards import RewardError, RewardLoadError
    from plait.runtime.launch import RankFailure
    from plait.train.checkpoint import CheckpointError

    return (ConfigError, DataError, RewardError, RewardLoadError, CheckpointError,
            TrainingDiverged, FileNotFoundError, RankFailure)
