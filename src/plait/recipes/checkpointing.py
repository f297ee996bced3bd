"""Saving a session's checkpoint and resuming from one.

A checkpoint holds the trainable models, their optimizers and schedulers, and the
trainer state: step, skip counts, group numbering, data position, evaluations and
the config it was made with (a resume whose config differs outside
:data:`~plait.runtime.run_dir.RESUME_SAFE_KEYS` is refused).
"""

from __future__ import annotations

import json
from pathlib import Path

from plait.config import ConfigError, config_to_dict
from plait.parallel import fsdp
from plait.parallel.heartbeat import report
from plait.runtime.run_dir import (
    RESUME_SAFE_KEYS,
    config_changes,
    describe_changes,
    recorded_config,
)
from plait.train.checkpoint import (
    latest_intact_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)


def save(session) -> Path | None:
    """Checkpoint ``session`` (rank 0 writes; every rank holds the same weights and
    optimizer state, and the data position is global; sharded ranks all join the
    gathering of whole states)."""
    report(f"saving checkpoint (step {session.global_step})")  # not a step: no progress limit
    models = session.models
    weights, optimizers = models.full_states()
    if not session.dist.is_main:
        return None
    state = {
        **session.state,
        "global_step": session.global_step,
        "nan_skips": session.skips.total,
        "consecutive_nan_skips": session.skips.in_a_row,
        "next_group_id": session.generator.next_group_id,
        "data": session.train_iter.state_dict(),
        "config": config_to_dict(session.config),  # what a resume is compared with
    }
    try:
        return save_checkpoint(session.checkpoint_root, session.global_step, models=weights,
                               tokenizer=session.tokenizer, optimizers=optimizers,
                               schedulers=models.schedulers, trainer_state=state,
                               keep_last=session.config.train.keep_last or None)
    finally:
        models.release_twins()


def resume(session) -> bool:
    """Resume ``session`` from the checkpoint :func:`resume_checkpoint` chooses; False
    when there is none to resume from."""
    mode = session.config.run.resume
    path = resume_checkpoint(session)
    if path is None:
        if mode == "must":
            raise ConfigError(f"run.resume is 'must' but {str(session.checkpoint_root)!r} "
                              "holds no complete checkpoint")
        return False
    session.state = read_trainer_state(path)
    check_resumable(session, path, session.state)
    models = session.models
    # the reference/critic structure must exist before their weights load, and the
    # optimizers before their states do
    if models.sharded:
        session.setup_training(resuming=True,
                               load_weights=lambda: models.load_sharded_weights(path))
        optimizers = {name: fsdp.FullOptimizerState(model, models.optimizers[name])
                      for name, model in models.named_trainable_models()}
    else:
        session.setup_training(resuming=True, load_weights=lambda: load_checkpoint(
            path, models=models.saved_models(), restore_rng=False))
        optimizers = models.optimizers
    state = load_checkpoint(path, models={}, optimizers=optimizers,
                            schedulers=models.schedulers)
    session.state = state
    session.global_step = state["global_step"]
    session.skips.total = state["nan_skips"]
    session.skips.in_a_row = state["consecutive_nan_skips"]
    session.generator.next_group_id = state["next_group_id"]
    session.train_iter.load_state_dict(state["data"])
    session.engine.update_weights(None, session.global_step)
    _truncate_records(session)
    dist = session.dist
    if dist.is_main:
        print(f"plait: resumed from {path} at step {session.global_step}"
              + (f" on {dist.world_size} ranks" if dist.active else ""), flush=True)
    return True


def _truncate_records(session) -> None:
    """Drop the metrics and timeline records of steps the interrupted run made after
    the checkpoint."""
    if session.metrics is not None:
        session.metrics.truncate_after(session.global_step)
    timeline = session.run_dir / "timeline.jsonl"
    if timeline.is_file() and session.dist.is_main:
        kept = [line for line in timeline.read_text().splitlines()
                if json.loads(line)["step"] <= session.global_step]
        timeline.write_text("".join(line + "\n" for line in kept))


def resume_checkpoint(session) -> Path | None:
    """The checkpoint to resume from, the same on every rank: rank 0 takes the newest
    intact one (setting newer corrupt ones aside) and sends its choice to the others,
    who would otherwise each verify on their own and might choose differently. None
    when there is none, or with run.resume=never."""
    mode = session.config.run.resume
    if mode == "never":
        return None
    dist = session.dist
    chosen = None
    if dist.rank == 0:
        path = latest_intact_checkpoint(session.checkpoint_root, fallback=mode == "auto",
                                        set_aside=dist.is_main)
        chosen = None if path is None else str(path)
    chosen = dist.all_gather_objects(chosen, kind="resume")[0]
    return None if chosen is None else Path(chosen)


def check_resumable(session, path: Path, state: dict) -> None:
    """Resume only with the config the checkpoint was made with (its trainer state's,
    else the run's config.yaml), up to :data:`RESUME_SAFE_KEYS`: any other change
    (model, data, rewards, algorithm...) is refused with the keys named; the safe
    ones are listed in one line."""
    recorded = state.get("config")
    if not isinstance(recorded, dict):  # checkpoints made before they held it
        recorded = recorded_config(session.run_dir)
    if recorded is None:
        return
    config = session.config
    changes = config_changes(recorded, config)
    refused = [change for change in changes if change[0] not in RESUME_SAFE_KEYS]
    if refused:
        raise ConfigError(
            f"cannot resume from {str(path)!r}: the config differs from the one it was "
            f"made with in settings that change the model or the algorithm "
            f"({describe_changes(refused)}); set them back, or start fresh with "
            "run.overwrite=true or a new run.dir")
    if changes and session.dist.is_main:
        stretched = any(change[0] == "train.steps" for change in changes) and \
            config.optim.schedule != "constant"
        print(f"plait: resuming with changed settings: {describe_changes(changes)}"
              + ("; the learning-rate schedule now decays over the new train.steps, so "
                 "the rate changes from this step on" if stretched else ""), flush=True)
