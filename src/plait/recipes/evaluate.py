"""``plait eval``: greedy held-out accuracy of a model or a checkpoint.

A plait checkpoint (a directory with a ``COMPLETE`` manifest, or named
``step_*``) is evaluated only once its policy files match the manifest; a
directory that only holds a ``policy/`` model, as any tool may write, is
evaluated as it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from plait.config import Config, ConfigError
from plait.recipes.session import Session
from plait.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_step,
    latest_intact_checkpoint,
    verify_checkpoint,
)


def evaluate_job(config: Config, checkpoint: str | None = None) -> dict:
    """Evaluate ``checkpoint`` (a checkpoint directory), else the run directory's latest
    intact checkpoint, else the configured model, on the config's held-out prompts."""
    if checkpoint is None:
        found = latest_intact_checkpoint(Path(config.run.dir) / "checkpoints",
                                         models=["policy"], action="evaluating")
        checkpoint = str(found) if found is not None else None
    source = config.model.path
    if checkpoint is not None:
        source = str(_policy_dir(Path(checkpoint)))
        config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                       path=source))
    with Session(config, prepare_run_dir=False) as session:
        result = session.evaluate("eval")
    return {"model": source, "num_prompts": len(session.eval_rows), **result}


def _policy_dir(checkpoint: Path) -> Path:
    """The policy model directory of ``checkpoint``, checked against the manifest when the
    directory is a plait checkpoint (raises :class:`CheckpointError` when it fails)."""
    if (checkpoint / COMPLETE_MARKER).exists() or _named_like_checkpoint(checkpoint):
        verify_checkpoint(checkpoint, models=["policy"])
    policy_dir = checkpoint / "policy"
    if not (policy_dir / "config.json").is_file():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} has no policy/ model directory; "
                          "to evaluate a model directory itself, set model.path to it")
    return policy_dir


def _named_like_checkpoint(path: Path) -> bool:
    try:
        checkpoint_step(path)
    except CheckpointError:
        return False
    return True
