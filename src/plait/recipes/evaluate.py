"""``plait eval``: greedy held-out accuracy of a model or a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from plait.config import Config, ConfigError
from plait.recipes.session import Session
from plait.train.checkpoint import latest_checkpoint


def evaluate_job(config: Config, checkpoint: str | None = None) -> dict:
    """Evaluate ``checkpoint`` (a checkpoint directory), else the run directory's latest
    checkpoint, else the configured model, on the config's held-out prompts."""
    if checkpoint is None:
        found = latest_checkpoint(Path(config.run.dir) / "checkpoints")
        checkpoint = str(found) if found is not None else None
    source = config.model.path
    if checkpoint is not None:
        policy_dir = Path(checkpoint) / "policy"
        if not (policy_dir / "config.json").is_file():
            raise ConfigError(f"checkpoint {checkpoint!r} has no policy/ model directory")
        source = str(policy_dir)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                       path=source))
    with Session(config, prepare_run_dir=False) as session:
        result = session.evaluate("eval")
    return {"model": source, "num_prompts": len(session.eval_rows), **result}
