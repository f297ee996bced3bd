"""Atomic, resumable training checkpoints.

Layout of one checkpoint, ``<root>/step_000123/`` (``root`` is usually
``run_dir / "checkpoints"``)::

    COMPLETE                 JSON manifest, written last: step, model kinds, and the
                             size and sha256 of every other file
    trainer_state.json       the caller's JSON state (step, data position, counters...)
    rng.json                 python, numpy, torch CPU and CUDA RNG states
    policy/                  one directory per model:
        config.json            a transformers PreTrainedModel: ``save_pretrained`` output
        model.safetensors      (loadable by ``AutoModelForCausalLM.from_pretrained``),
        tokenizer.json ...     plus the tokenizer, if one was given
    critic/model.safetensors any other nn.Module: its state dict as safetensors
    optimizers/policy.pt     ``optimizer.state_dict()``
    schedulers/policy.pt     ``scheduler.state_dict()``

Never half written: everything goes into ``<root>/.tmp-step_000123-XXXX/``, is
fsynced, gets its ``COMPLETE`` manifest, and only then is renamed to
``step_000123`` (an older directory of that name is renamed aside first and
deleted after). Old checkpoints are renamed aside before deletion too, so a
crash can leave ``.tmp-*`` debris, which :func:`latest_checkpoint` ignores and
the next :func:`save_checkpoint` removes, but never a ``step_*`` directory that
looks complete and is not.

Never loads bad bytes: every load checks the files it reads against the sizes
and sha256 checksums of the manifest (manifests written before checksums were
recorded are checked by size only) and raises :class:`CorruptCheckpointError`
on a mismatch. A file's checksum is computed once per process while its stat
(size, times, inode) is unchanged, so verifying a checkpoint and then loading
it part by part reads each file once for hashing. To resume, use
:func:`latest_intact_checkpoint`: the newest checkpoint that verifies, with the
newer corrupt ones reported and (by the writer) renamed ``corrupt-step_*``,
kept for inspection but out of the way of resuming and rotation.

Never unpickles arbitrary objects: weights are safetensors, RNG and trainer
state are JSON, and optimizer/scheduler states are read with
``torch.load(weights_only=True)``.

One writer per ``root``: in multi-process training only rank 0 saves (after
gathering full state dicts); each rank may load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from plait.errors import PlaitError
from plait.telemetry.summary import fsync_dir, write_json_atomic

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "CorruptCheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "checkpoint_step",
    "latest_checkpoint",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "remove_partial_checkpoints",
    "restore_rng_state",
    "resume_note",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT = "plait-checkpoint"
FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.json"
OPTIMIZERS_DIR = "optimizers"
SCHEDULERS_DIR = "schedulers"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"  # corrupt checkpoints renamed aside, kept for inspection

_STEP_DIR = re.compile(r"step_(\d+)")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED_NAMES = frozenset({OPTIMIZERS_DIR, SCHEDULERS_DIR})
_KIND_HF = "hf"  # transformers PreTrainedModel, saved with save_pretrained
_KIND_STATE_DICT = "state_dict"  # any nn.Module, state dict in model.safetensors
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_THREADS = min(8, os.cpu_count() or 1)


class CheckpointError(PlaitError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit what it is loaded into."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose contents do not match its manifest, or that has no valid manifest.

    ``path`` is the checkpoint directory and ``reason`` a short phrase
    (``"policy/model.safetensors checksum mismatch"``). Nothing of it is loaded.
    """

    def __init__(self, message: str, *, path: Path | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason or message


def _corrupt(path: Path, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint {path} is corrupt: {reason}; nothing was loaded from it. Use an earlier "
        "checkpoint of that run",
        path=path, reason=reason)


# --------------------------------------------------------------------------- names


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint for ``step``: ``step_000123``."""
    return f"step_{step:06d}"


def checkpoint_step(path: Path | str) -> int:
    """The step of a checkpoint directory, from its name (``step_000123`` -> 123)."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(
            f"{path} is not a checkpoint directory (expected a name like step_000123)"
        )
    return int(match.group(1))


def list_checkpoints(root: Path | str) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a ``COMPLETE`` marker), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if _STEP_DIR.fullmatch(path.name) and (path / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path | str) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or ``None``.

    Unfinished saves (``.tmp-*`` directories, ``step_*`` without ``COMPLETE``)
    are ignored, never deleted here: a concurrent reader must not break a save
    in progress. :func:`save_checkpoint` removes the debris of crashed saves.
    The files are not checked against the manifest here (that reads them all):
    to pick a checkpoint to load, use :func:`latest_intact_checkpoint`.
    """
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def latest_intact_checkpoint(
    root: Path | str,
    *,
    fallback: bool = True,
    set_aside: bool = False,
    models: Collection[str] | None = None,
    action: str = "resuming from",
) -> Path | None:
    """The newest ``step_*`` checkpoint under ``root`` that passes :func:`verify_checkpoint`.

    Newer ``step_*`` directories that fail it (no ``COMPLETE`` manifest, a file
    missing, a size or checksum mismatch) are skipped, each with one line on
    stderr naming it, why, and the checkpoint taken instead (``action``, e.g.
    ``"resuming from"``). ``set_aside`` (only for the one process that writes
    checkpoints to ``root``) renames each skipped one ``corrupt-step_*``: kept for
    inspection, it no longer counts as the latest, is not rotated away and is not
    overwritten when that step is saved again. ``models``: verify only these
    models' files (and the manifest), e.g. ``["policy"]`` to evaluate.

    Returns ``None`` when ``root`` holds no ``step_*`` directory at all.

    Raises:
        CheckpointError: none is intact (naming each and why); or, with
            ``fallback=False``, the newest one is not intact (naming it and the
            newest intact one, and how to resume from that); or a checkpoint that
            cannot be read at all (permissions, a newer format).
    """
    root = Path(root)
    skipped: list[CorruptCheckpointError] = []
    for path in reversed(_step_directories(root)):
        try:
            verify_checkpoint(path, models=models)
        except CheckpointError as error:
            if not path.exists():
                continue  # renamed aside meanwhile by the process that writes checkpoints
            if not isinstance(error, CorruptCheckpointError):
                raise
            skipped.append(error)
            continue
        _report_skipped(skipped, path, fallback=fallback, set_aside=set_aside, action=action)
        return path
    if skipped:
        found = "; ".join(f"{error.path.name} ({error.reason})" for error in skipped)
        raise CheckpointError(
            f"no intact checkpoint in {root}: every one is corrupt: {found}. They are kept "
            f"for inspection; restore them from a copy, or move them out of {root} to start "
            "without them")
    return None


def _step_directories(root: Path) -> list[Path]:
    """Every ``step_*`` directory under ``root``, complete or not, oldest step first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _STEP_DIR.fullmatch(path.name) and path.is_dir()]
    return sorted(found, key=checkpoint_step)


def _report_skipped(
    skipped: list[CorruptCheckpointError],
    chosen: Path,
    *,
    fallback: bool,
    set_aside: bool,
    action: str,
) -> None:
    """Print one line per skipped checkpoint (renaming it aside if asked); or refuse."""
    if skipped and not fallback:
        newest = skipped[0]
        names = " and ".join(str(error.path) for error in skipped)
        raise CheckpointError(
            f"the latest checkpoint {newest.path} is corrupt ({newest.reason}) and run.resume "
            f"is 'must', which resumes only from the latest; the newest intact one is {chosen}. "
            f"To resume from it, rename {names} aside (e.g. {CORRUPT_PREFIX}{newest.path.name}, "
            "kept for inspection), or set run.resume=auto, which does that")
    for error in skipped:
        where = ""
        if set_aside:
            where = f", {_set_aside(error.path)}"
        print(f"plait: checkpoint {error.path} is corrupt ({error.reason}){where}; "
              f"{action} {chosen}", file=sys.stderr, flush=True)


def _set_aside(path: Path) -> str:
    """Rename a corrupt checkpoint ``corrupt-step_*`` (numbered if taken); say where it went."""
    for number in range(1000):
        suffix = f"-{number}" if number else ""
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}{suffix}")
        if target.exists():
            continue
        try:
            path.rename(target)
        except OSError as error:
            return f"left in place ({error})"
        fsync_dir(path.parent)
        return f"renamed {target.name} (kept for inspection)"
    return "left in place (too many corrupt copies of it)"


def resume_note(root: Path | str, *, resume: str = "auto", overwrite: bool = False) -> str:
    """What rerunning a stopped job continues from: the last complete checkpoint under
    ``root`` by path and step, or that there is none yet; and how to rerun it given the
    job's ``run.resume`` and ``run.overwrite`` (the same command would delete the
    checkpoint with ``overwrite``, and refuse it with ``resume="never"``)."""
    latest = latest_checkpoint(root)
    if latest is None:
        rerun = "rerunning with run.resume=auto" if resume == "must" else \
            "rerunning the same command"
        return (f"no checkpoint yet in {root} (train.save_every sets how often one is "
                f"written): {rerun} starts over")
    changes = []
    if overwrite:
        changes.append("without run.overwrite=true (which deletes it)")
    if resume == "never":
        changes.append("with run.resume=auto (run.resume=never refuses to resume)")
    rerun = f"rerun {' and '.join(changes)}" if changes else "rerun the same command"
    return (f"the last complete checkpoint is {latest} (step {checkpoint_step(latest)}): "
            f"{rerun} to resume from it")


def remove_partial_checkpoints(root: Path | str) -> list[Path]:
    """Delete the ``.tmp-*`` directories of crashed saves under ``root``; return them.

    Only call this from the single process that writes checkpoints to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    partial = [path for path in root.iterdir() if path.name.startswith(TMP_PREFIX)]
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return partial


# --------------------------------------------------------------------------- save


def save_checkpoint(
    root: Path | str,
    step: int,
    *,
    models: Mapping[str, nn.Module],
    tokenizer: Any = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any],
    keep_last: int | None = 3,
) -> Path:
    """Write a complete checkpoint for ``step`` under ``root`` atomically and return its path.

    Args:
        root: the checkpoints directory, e.g. ``run_dir / "checkpoints"`` (created if missing).
        step: the training step this checkpoint continues from.
        models: name -> module; each goes to ``<ckpt>/<name>/``. Names are
            directory names; ``optimizers`` and ``schedulers`` are reserved.
        tokenizer: saved (``save_pretrained``) beside the ``"policy"`` model, or
            beside the first model when there is no ``"policy"``.
        optimizers: name -> optimizer, saved as ``optimizers/<name>.pt``.
        schedulers: name -> LR scheduler, saved as ``schedulers/<name>.pt``.
        trainer_state: JSON-able dict (tensors and numpy scalars are converted,
            NaN becomes null, tuples become lists), returned by :func:`load_checkpoint`.
        keep_last: keep only this many complete checkpoints up to ``step``,
            deleting older ones after the new one is in place (later ones are kept
            and do not count); ``None`` or ``0`` keeps all.

    If ``step_<step>`` exists already (an earlier attempt) it is replaced.

    Raises:
        ValueError / TypeError: bad arguments (nothing is written).
        CheckpointError: a scheduler state that could not be loaded back safely.
        Any error from writing; the partial directory is removed and no
        checkpoint becomes visible.
    """
    root = Path(root)
    _check_save_args(step, models, tokenizer, keep_last)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(root)
    name = checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=root))
    try:
        manifest = _write_contents(
            staging, step, models, tokenizer, optimizers or {}, schedulers or {}, trainer_state
        )
        _fsync_tree(staging)
        write_json_atomic(staging / COMPLETE_MARKER, manifest)
        final = _move_into_place(staging, root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _warn_if_shadowed(root, step)
    _rotate(root, keep_last, keep=final)
    return final


def _check_save_args(
    step: int, models: Mapping[str, nn.Module], tokenizer: Any, keep_last: int | None
) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be None, 0 (keep all) or positive, got {keep_last}")
    for name, model in models.items():
        if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or name in _RESERVED_NAMES:
            raise ValueError(
                f"model name {name!r} cannot be a checkpoint directory: use letters, digits, "
                f"'_', '-', '.', not starting with '.', and not {sorted(_RESERVED_NAMES)}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not a torch.nn.Module")
    if tokenizer is not None and not models:
        raise ValueError("a tokenizer is saved beside a model, but no models were given")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"the tokenizer ({type(tokenizer).__name__}) has no save_pretrained method")


def _write_contents(
    staging: Path,
    step: int,
    models: Mapping[str, nn.Module],
    tokenizer: Any,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
) -> dict[str, Any]:
    """Write every part of the checkpoint into ``staging``; return the manifest."""
    # Small, checkable parts first, so a bad one fails before gigabytes are written.
    for name, scheduler in schedulers.items():
        state = _weights_only_bytes(scheduler.state_dict(), f"scheduler {name!r}")
        _write_bytes(staging / SCHEDULERS_DIR / f"{name}.pt", state)
    write_json_atomic(staging / TRAINER_STATE_FILE, dict(trainer_state))
    write_json_atomic(staging / RNG_FILE, capture_rng_state(), indent=None)
    tokenizer_owner = "policy" if "policy" in models else next(iter(models), None)
    kinds = {
        name: _save_model(model, staging / name, tokenizer if name == tokenizer_owner else None)
        for name, model in models.items()
    }
    for name, optimizer in optimizers.items():
        _save_torch_state(optimizer.state_dict(), staging / OPTIMIZERS_DIR / f"{name}.pt")
    sizes = _file_sizes(staging)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "created": time.time(),
        "models": kinds,
        "optimizers": sorted(optimizers),
        "schedulers": sorted(schedulers),
        "files": sizes,
        # a key of its own, so that readers predating checksums read the manifest as before
        "sha256": _digests(staging, list(sizes)),
    }


def _save_model(model: nn.Module, directory: Path, tokenizer: Any) -> str:
    """Save one model into ``directory``; return its kind (``"hf"`` or ``"state_dict"``)."""
    model = _unwrap(model)
    if _is_hf_model(model):
        model.save_pretrained(directory)  # safetensors by default in transformers >= 4.35
        kind = _KIND_HF
    else:
        directory.mkdir(parents=True)
        # save_model de-duplicates shared (tied) tensors, which save_file rejects.
        save_model(model, str(directory / WEIGHTS_FILE), force_contiguous=True)
        kind = _KIND_STATE_DICT
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return kind


def _save_torch_state(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _weights_only_bytes(state: dict[str, Any], what: str) -> bytes:
    """Serialise ``state`` and prove it loads with ``weights_only=True`` (fail at save, not at resume)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"the state of {what} holds objects that cannot be loaded safely "
            f"(torch.load weights_only=True): {error}. LambdaLR keeps the attributes of "
            "callable-object lr_lambdas; use a plain function or keep those attributes "
            "to numbers, strings, lists and dicts."
        ) from error
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _fsync_tree(directory: Path) -> None:
    """fsync every file, then every directory (deepest first), under ``directory``."""
    paths = sorted(directory.rglob("*"), key=lambda path: len(path.parts), reverse=True)
    for path in paths:
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [*(path for path in paths if path.is_dir()), directory]:
        fsync_dir(path)


def _move_into_place(staging: Path, final: Path) -> Path:
    """Rename ``staging`` to ``final``; an existing ``final`` is moved aside, then deleted."""
    aside = None
    if final.exists():
        aside = _rename_aside(final, "old")
    staging.rename(final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _rename_aside(path: Path, why: str) -> Path:
    """Atomically hide ``path`` as ``.tmp-<why>-<name>-<random>`` so it stops counting at once."""
    aside = path.with_name(f"{TMP_PREFIX}{why}-{path.name}-{secrets.token_hex(4)}")
    path.rename(aside)
    return aside


def _rotate(root: Path, keep_last: int | None, *, keep: Path) -> None:
    """Delete all but the ``keep_last`` newest checkpoints up to ``keep`` (the one just
    saved). Later ones (an abandoned run's, or a corrupt one that could not be renamed
    aside) do not count: they must not push out the intact ones this run resumes from."""
    if not keep_last:
        return
    step = checkpoint_step(keep)
    counted = [path for path in list_checkpoints(root) if checkpoint_step(path) <= step]
    for path in counted[: max(0, len(counted) - keep_last)]:
        shutil.rmtree(_rename_aside(path, "deleted"), ignore_errors=True)
    fsync_dir(root)


def _warn_if_shadowed(root: Path, step: int) -> None:
    later = [path.name for path in list_checkpoints(root) if checkpoint_step(path) > step]
    if later:
        warnings.warn(
            f"saved {checkpoint_name(step)} in {root}, but checkpoints of later steps exist "
            f"({', '.join(later)}); latest_checkpoint() returns {later[-1]}, not this one. "
            "Delete them if they belong to an abandoned run.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- load


def load_checkpoint(
    path: Path | str,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint in place and return its ``trainer_state``.

    Loads weights into ``models`` (strictly: every weight of the module must
    be in the checkpoint with the same shape, and the checkpoint must hold no
    others; tied weights need to be stored once), then optimizer and scheduler
    states, then (``restore_rng``) the global RNG states. Only the names given
    are loaded; the checkpoint may hold more (e.g. load just the policy).

    Build the optimizers over the model parameters before loading, the same
    way as when saving, so parameter order matches.

    Every file it reads is checked against the manifest first (size and
    sha256); nothing is loaded from a checkpoint that fails the check.

    Raises:
        CorruptCheckpointError: the checkpoint is incomplete or corrupt.
        CheckpointError: it lacks a requested name, or does not fit the given
            modules; the message names the checkpoint and the offending keys.
    """
    path = Path(path)
    optimizers, schedulers = optimizers or {}, schedulers or {}
    manifest = _read_manifest(path)
    _check_requested(path, manifest, models, optimizers, schedulers)
    read = (
        *(f"{name}/" for name in models),
        *(f"{OPTIMIZERS_DIR}/{name}.pt" for name in optimizers),
        *(f"{SCHEDULERS_DIR}/{name}.pt" for name in schedulers),
        TRAINER_STATE_FILE,
        *((RNG_FILE,) if restore_rng else ()),
    )
    _verify_files(path, manifest, read)
    for name, model in models.items():
        _load_model(path, name, _unwrap(model), manifest["models"][name])
    for name, optimizer in optimizers.items():
        state = _keep_kernel(optimizer, _load_torch_state(path / OPTIMIZERS_DIR / f"{name}.pt"))
        _apply_state(optimizer, state, f"{path}: optimizer {name!r}")
    for name, scheduler in schedulers.items():
        state = _load_torch_state(path / SCHEDULERS_DIR / f"{name}.pt")
        _apply_state(scheduler, state, f"{path}: scheduler {name!r}")
    trainer_state = _read_json(path / TRAINER_STATE_FILE)
    if restore_rng:
        try:
            restore_rng_state(_read_json(path / RNG_FILE))
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise CheckpointError(f"{path}: {RNG_FILE} is malformed: {error}") from error
    return trainer_state


def read_trainer_state(path: Path | str) -> dict[str, Any]:
    """The ``trainer_state`` of a complete checkpoint, without loading anything else.

    Useful to rebuild the modules (e.g. whether a critic exists) before
    :func:`load_checkpoint`. Raises :class:`CheckpointError` like it.
    """
    path = Path(path)
    _verify_files(path, _read_manifest(path), (TRAINER_STATE_FILE,))
    return _read_json(path / TRAINER_STATE_FILE)


def verify_checkpoint(path: Path | str, *, models: Collection[str] | None = None) -> dict:
    """Check a checkpoint against its manifest and return the manifest.

    Every file the manifest lists must exist with its recorded size, and (for
    manifests with checksums) every file, or with ``models`` only those of these
    models, must match its sha256. Checksums computed here are remembered for the
    load that follows (see the module docstring).

    Raises:
        CorruptCheckpointError: no ``COMPLETE`` manifest, an invalid one, or a
            file missing or not matching it (``reason`` says which).
        CheckpointError: a missing directory, a model not in the checkpoint, an
            unreadable file, or a format newer than this plait reads.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if models is not None:
        _check_requested(path, manifest, models, {}, {})
    _verify_files(path, manifest, None if models is None else tuple(f"{m}/" for m in models))
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / COMPLETE_MARKER).is_file():
        raise CorruptCheckpointError(
            f"checkpoint {path} has no {COMPLETE_MARKER} marker: it was never finished or was "
            "copied in part; nothing was loaded from it. Use an earlier checkpoint of that run",
            path=path, reason=f"no {COMPLETE_MARKER} manifest: never finished or copied in part")
    manifest = _read_json(path / COMPLETE_MARKER, checkpoint=path)
    if manifest.get("format") != FORMAT:
        raise _corrupt(path, f"{COMPLETE_MARKER} is not a {FORMAT} manifest")
    version = manifest.get("version")
    if not _is_count(version) or version < 1:
        raise _corrupt(path, f"{COMPLETE_MARKER} has no valid format version ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this "
            f"plait reads ({FORMAT_VERSION}); upgrade plait"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise _corrupt(path, f"{COMPLETE_MARKER} manifest {problem}")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str:
    """What is wrong with the manifest's entries ('' when nothing): wrong types, unsafe paths."""
    models = manifest.get("models")
    if not isinstance(models, dict) or not all(
        isinstance(name, str) and kind in (_KIND_HF, _KIND_STATE_DICT)
        for name, kind in models.items()
    ):
        return f"has no valid 'models' (name -> {_KIND_HF!r} or {_KIND_STATE_DICT!r})"
    for key in ("optimizers", "schedulers"):
        names = manifest.get(key, [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return f"has no valid {key!r} (a list of names)"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(
        _is_safe_relative(name) and _is_count(size) for name, size in files.items()
    ):
        return "has no valid 'files' (relative path -> size in bytes)"
    digests = manifest.get("sha256")
    if digests is not None and (
        not isinstance(digests, dict)
        or digests.keys() != files.keys()
        or not all(isinstance(d, str) and _SHA256_HEX.fullmatch(d) for d in digests.values())
    ):
        return "has no valid 'sha256' (a checksum for each of its 'files')"
    return ""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_safe_relative(name: Any) -> bool:
    """A relative path inside the checkpoint: no absolute path, no '..', no empty parts."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _read_json(path: Path, *, checkpoint: Path | None = None) -> dict[str, Any]:
    """A JSON object from a checkpoint file; bad content is corruption of ``checkpoint``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        if checkpoint is not None:
            raise _corrupt(checkpoint, f"{path.name} is not valid JSON ({error})") from error
        raise CheckpointError(f"checkpoint file {path} is corrupt: {error}") from error
    if not isinstance(value, dict):
        if checkpoint is not None:
            raise _corrupt(checkpoint, f"{path.name} does not hold a JSON object")
        raise CheckpointError(f"checkpoint file {path} should hold a JSON object")
    return value


def _check_requested(
    path: Path, manifest: dict[str, Any], models: Mapping, optimizers: Mapping, schedulers: Mapping
) -> None:
    available = {
        "model": set(manifest["models"]),
        "optimizer": set(manifest.get("optimizers", [])),
        "scheduler": set(manifest.get("schedulers", [])),
    }
    requested = {"model": models, "optimizer": optimizers, "scheduler": schedulers}
    for what, names in requested.items():
        missing = sorted(set(names) - available[what])
        if missing:
            raise CheckpointError(
                f"checkpoint {path} has no {what} named {', '.join(map(repr, missing))}; "
                f"it holds {sorted(available[what]) or 'none'}"
            )


def _verify_files(path: Path, manifest: dict[str, Any], read: tuple[str, ...] | None) -> None:
    """Every file the manifest lists must exist with its recorded size, and those whose
    relative path starts with one of ``read`` (all when ``None``) must match their sha256
    (manifests without checksums: sizes only)."""
    for relative, size in manifest["files"].items():
        file = path / relative
        if not file.is_file():
            raise _corrupt(path, f"{relative} is missing")
        if file.stat().st_size != size:
            raise _corrupt(path, f"{relative} has {file.stat().st_size} bytes, the manifest "
                                 f"says {size}")
    expected = manifest.get("sha256")
    if expected is None:
        return
    wanted = [name for name in expected if read is None or name.startswith(read)]
    try:
        actual = _digests(path, wanted)
    except FileNotFoundError as error:
        raise _corrupt(path, f"{Path(str(error.filename)).name} vanished while checked") from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    bad = [name for name in wanted if actual[name] != expected[name]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _corrupt(path, f"{bad[0]} checksum mismatch{more}")


_digest_cache: dict[tuple, str] = {}


def _digests(directory: Path, relatives: list[str]) -> dict[str, str]:
    """The sha256 of each file (relative to ``directory``), hashed in parallel threads."""
    files = [directory / relative for relative in relatives]
    if len(files) < 2:
        return {relative: _sha256(file) for relative, file in zip(relatives, files, strict=True)}
    with ThreadPoolExecutor(min(_HASH_THREADS, len(files)), "plait-sha256") as pool:
        return dict(zip(relatives, pool.map(_sha256, files), strict=True))


def _sha256(file: Path) -> str:
    """The file's sha256, remembered while its size, times and inode stay the same."""
    before = file.stat()
    key = (str(file.absolute()), before.st_dev, before.st_ino, before.st_size,
           before.st_mtime_ns, before.st_ctime_ns)
    cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])  # releases the GIL: files hash in parallel
    after = file.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[3:]:
        if len(_digest_cache) > 10_000:
            _digest_cache.clear()
        _digest_cache[key] = digest.hexdigest()
    return digest.hexdigest()


def _load_torch_state(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {file} is missing") from None
    except Exception as error:
        raise CheckpointError(
            f"cannot load {file} safely (torch.load weights_only=True): {error}"
        ) from error


_KERNEL_OPTIONS = ("fused", "foreach")


def _keep_kernel(optimizer: Any, state: Any) -> Any:
    """``state`` with the optimizer's current kernel choice (``fused``/``foreach``) in its
    parameter groups: a saved choice would otherwise override the resumed run's
    ``optim.implementation`` (the update is the same up to rounding either way)."""
    groups = getattr(getattr(optimizer, "optimizer", optimizer), "param_groups", None)
    if not groups or not isinstance(state, dict) or "param_groups" not in state:
        return state
    saved = state["param_groups"]
    if len(saved) != len(groups):
        return state  # _apply_state reports the mismatch
    state["param_groups"] = [
        {**old, **{k: new[k] for k in _KERNEL_OPTIONS if k in new and k in old}}
        for old, new in zip(saved, groups, strict=True)]
    return state


def _apply_state(target: Any, state: Any, what: str) -> None:
    try:
        target.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as error:
        raise CheckpointError(
            f"{what} does not fit: {error}. Build it the same way (same parameter groups, "
            "same parameters in the same order) as in the run that saved it."
        ) from error


# --------------------------------------------------------------------------- weights


def _load_model(path: Path, name: str, model: nn.Module, kind: str) -> None:
    directory = path / name
    stored = _stored_weights(directory)
    problems = _key_problems(model, stored)
    if not problems:
        _copy_weights(model, sorted({file for file, _ in stored.values()}))
    elif kind == _KIND_HF and _is_hf_model(model):
        # transformers >= 5 stores some architectures (e.g. MoE experts) under
        # their original names and converts on load; let from_pretrained do that.
        _load_via_from_pretrained(path, name, model)
    else:
        raise CheckpointError(f"checkpoint {path}: model {name!r} does not fit: {problems}")


def _stored_weights(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Map every tensor name in a model directory to (its safetensors file, its shape)."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) and file and Path(file).name == file
            for file in weight_map.values()
        ):
            raise CheckpointError(f"{index} has no valid weight_map (tensor name -> file name)")
        files = sorted({directory / file for file in weight_map.values()})
    elif (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    else:
        raise CheckpointError(f"{directory} holds no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")
    stored = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    stored[key] = (file, tuple(handle.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read weights file {file}: {error}") from error
    return stored


def _key_problems(model: nn.Module, stored: dict[str, tuple[Path, tuple[int, ...]]]) -> str:
    """Describe missing, unexpected and mis-shaped weights ('' when the checkpoint fits)."""
    expected = model.state_dict()
    aliases = _tied_aliases(expected)
    missing = sorted(
        key for key in expected.keys() - stored.keys() if not any(a in stored for a in aliases[key])
    )
    unexpected = sorted(stored.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: checkpoint {stored[key][1]} vs model {tuple(expected[key].shape)}"
        for key in stored.keys() & expected.keys()
        if stored[key][1] != tuple(expected[key].shape)
    )
    labelled = (
        ("missing weights", missing),
        ("unexpected weights", unexpected),
        ("shape mismatches", mismatched),
    )
    return "; ".join(f"{label} {_preview(keys)}" for label, keys in labelled if keys)


def _tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each key, the other keys that are the very same tensor (tied weights)."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault(_tensor_identity(tensor), []).append(key)
    return {key: [k for k in group if k != key] for group in groups.values() for key in group}


def _tensor_identity(tensor: torch.Tensor) -> tuple:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return (id(tensor),)
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


def _copy_weights(model: nn.Module, files: list[Path]) -> None:
    """Copy the stored tensors into ``model``, one safetensors file at a time."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                shard = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read weights file {file}: {error}") from error
        with torch.no_grad():
            model.load_state_dict(shard, strict=False)
        del shard


def _load_via_from_pretrained(path: Path, name: str, model: nn.Module) -> None:
    try:
        loaded, info = type(model).from_pretrained(
            path / name, config=model.config, output_loading_info=True
        )
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: model {name!r} does not fit: {error}") from error
    bad = {
        key: sorted(info.get(key) or [])
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(bad.values()):
        details = "; ".join(
            f"{key.replace('_', ' ')} {_preview(keys)}" for key, keys in bad.items() if keys
        )
        raise CheckpointError(f"checkpoint {path}: model {name!r} does not fit: {details}")
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict())


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... {len(keys) - limit} more' if len(keys) > limit else ''}]"


def _is_hf_model(model: nn.Module) -> bool:
    # A PreTrainedModel cannot exist unless transformers was imported: skip the slow import.
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, every CUDA device) as a JSON-able dict."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [device_state.tolist() for device_state in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNG states captured by :func:`capture_rng_state`.

    Parts absent from ``state`` are left alone. CUDA states are restored for
    as many devices as both the state and this machine have (with a warning
    when the counts differ, e.g. resuming a GPU run on CPU).
    """
    if "python" in state:
        python = state["python"]
        random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["bit_generator"],
                np.asarray(numpy_state["keys"], dtype=np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        _restore_cuda_rng(state["cuda"])


def _restore_cuda_rng(device_states: list[list[int]]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(device_states):
        warnings.warn(
            f"the checkpoint has CUDA RNG states for {len(device_states)} device(s) and this "
            f"process sees {available}; restoring the first {min(available, len(device_states))}",
            stacklevel=3,
        )
    for index in range(min(available, len(device_states))):
        torch.cuda.set_rng_state(torch.tensor(device_states[index], dtype=torch.uint8), index)
