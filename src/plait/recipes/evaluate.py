"""``plait eval``: held-out greedy accuracy, the eval sets of ``eval.suites`` (pass@k,
maj@k) and the bias probes of ``eval.bias``, for one or several models or checkpoints.

A plait checkpoint (a directory with a ``COMPLETE`` manifest, or named
``step_*``) is evaluated only once its policy files match the manifest; a
directory that only holds a ``policy/`` model, as any tool may write, is
evaluated as it is.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from plait.config import Config, ConfigError
from plait.evals.bias import plot_bias, run_bias_probe
from plait.recipes.session import Session
from plait.telemetry.summary import write_json_atomic
from plait.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_step,
    latest_intact_checkpoint,
    verify_checkpoint,
)


def evaluate_job(config: Config, checkpoint: str | list[str] | None = None) -> dict:
    """Evaluate each of ``checkpoint`` (checkpoint or model directories), else the run
    directory's latest intact checkpoint, else the configured model: held-out greedy
    accuracy, every ``eval.suites`` set and the ``eval.bias`` probes. Suite results are
    appended to run.dir's eval_results.json, probe results to bias_results.json (with
    bias.png of this call's models). One model gives its result; several, {"results": [...]}."""
    checkpoints = checkpoint if isinstance(checkpoint, list) else [checkpoint]
    run_dir = Path(config.run.dir)
    records, probes = [], []
    for one in checkpoints:  # each model's results are kept as soon as it is done
        record = _evaluate_one(config, one)
        records.append(record)
        if record.get("suites"):
            _append_json(run_dir / "eval_results.json", [
                {key: record[key] for key in ("model", "checkpoint", "step", "time", "suites")}])
        if "bias" in record:
            probes.append(record["bias"])
            _append_json(run_dir / "bias_results.json", [record["bias"]])
    if probes:
        plot_bias(probes, run_dir / "bias.png")
    return records[0] if len(records) == 1 else {"results": records}


def _evaluate_one(config: Config, checkpoint: str | None) -> dict:
    if checkpoint is None:
        found = latest_intact_checkpoint(Path(config.run.dir) / "checkpoints",
                                         models=["policy"], action="evaluating")
        checkpoint = str(found) if found is not None else None
    source, step = config.model.path, None
    if checkpoint is not None:
        path = Path(checkpoint)
        if (path / "config.json").is_file() and not (path / "policy").is_dir():
            source = str(path)  # a model directory (plait sft_model/, dpo_model/, any HF LM)
        else:
            source = str(_policy_dir(path))
            step = checkpoint_step(path) if _named_like_checkpoint(path) else None
        config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                       path=source))
    with Session(config, prepare_run_dir=False) as session:
        held_out = session.evaluate("eval")
        record = {"model": source, "checkpoint": checkpoint, "step": step,
                  "time": time.time(), "num_prompts": len(session.eval_rows),
                  **{k: v for k, v in held_out.items() if not _is_suite_key(k, config)}}
        if config.eval.suites:
            record["suites"] = session.suite_results
        bias = config.eval.bias
        if bias.bbq is not None or bias.winogender is not None:
            record["bias"] = run_bias_probe(session, _label(Path(checkpoint or source)))
    return record


def _label(path: Path) -> str:
    """A short name of a model for tables and charts: the directory's name, with its
    run's name before the names plait gives every run's models and checkpoints."""
    if path.name in ("sft_model", "dpo_model", "ema_model", "tiny_model") or \
            _named_like_checkpoint(path):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{run.name}/{path.name}"
    return path.name


def _is_suite_key(key: str, config: Config) -> bool:
    return any(key.startswith(f"eval/{s.name}/") for s in config.eval.suites)


def _append_json(path: Path, records: list[dict]) -> None:
    """Add ``records`` to the JSON list in ``path`` (a missing or unreadable file starts
    a new list; the unreadable one is kept beside it as ``NAME.bad``)."""
    old: list = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, list):
                raise ValueError("not a list")
        except ValueError:
            path.replace(path.with_name(path.name + ".bad"))
            old = []
    write_json_atomic(path, old + records)


def _policy_dir(checkpoint: Path) -> Path:
    """The policy model directory of ``checkpoint``, checked against the manifest when the
    directory is a plait checkpoint (raises :class:`CheckpointError` when it fails)."""
    if (checkpoint / COMPLETE_MARKER).exists() or _named_like_checkpoint(checkpoint):
        verify_checkpoint(checkpoint, models=["policy"])
    policy_dir = checkpoint / "policy"
    if not (policy_dir / "config.json").is_file():
        if not checkpoint.exists():
            raise ConfigError(f"--checkpoint {str(checkpoint)!r} does not exist")
        raise ConfigError(f"--checkpoint {str(checkpoint)!r} is neither a checkpoint (with a "
                          "policy/ model directory) nor a model directory (with config.json)")
    return policy_dir


def _named_like_checkpoint(path: Path) -> bool:
    try:
        checkpoint_step(path)
    except CheckpointError:
        return False
    return True
