"""Scalar metrics sinks: one JSON line per step in ``metrics.jsonl``, plus TensorBoard,
Weights & Biases and MLflow as asked (``run.report_to``).

``metrics.jsonl`` is the source of truth (plots and ``summary.json`` are built
from it); TensorBoard is a convenience view and is skipped with one warning
when the ``tensorboard`` package is missing. wandb and MLflow are optional packages
whose absence fails the logger at construction (see :mod:`plait.telemetry.trackers`).

Every line is ``{"step": int, "time": unix_seconds, "<key>": number | null, ...}``.
JSON cannot hold NaN or infinity, so such values are written as ``null`` with
the key kept (a NaN loss is a fact worth seeing); TensorBoard and the trackers get the
raw value.

Resuming: a run that restarts from the checkpoint of step ``s`` calls
``MetricsLogger(run_dir, resume=True, resume_step=s)`` (or ``truncate_after(s)``),
which drops the lines logged after ``s`` by the crashed attempt, so the
resumed run does not log those steps twice; TensorBoard events after ``s`` are
purged the same way (``SummaryWriter(purge_step=s + 1)``). The trackers continue
their runs (ids in ``trackers.json``); what they cannot drop is said in
:mod:`plait.telemetry.trackers`.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from plait.telemetry.summary import write_text_atomic
from plait.telemetry.trackers import TRACKERS, Tracker, check_installed, open_tracker

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = frozenset({"step", "time"})
_tensorboard_warned = False

Scalar = float | int | bool | torch.Tensor | np.generic


class MetricsLogger:
    """Append per-step scalar metrics to ``run_dir/metrics.jsonl``, TensorBoard and the
    trackers of ``report_to``.

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: write TensorBoard scalars to ``run_dir/tensorboard`` (when
            ``report_to`` holds ``"tensorboard"`` too).
        resume: continue an existing ``metrics.jsonl``.
        resume_step: with ``resume=True``, first drop the lines with
            ``step > resume_step`` (see :meth:`truncate_after`).
        report_to: sinks besides ``metrics.jsonl``: ``"tensorboard"``, ``"wandb"``,
            ``"mlflow"``. A tracker whose package is missing raises
            :class:`~plait.telemetry.trackers.TrackerMissing` here.
        run_name: the trackers' run name; default: ``run_dir``'s name.
        config: the resolved config, recorded by the trackers (wandb config, MLflow params).
        tracker_dir: where the trackers' files go (``wandb/``, ``mlruns/``); default:
            ``run_dir`` (a job's SFT warm start shares its job's).

    Without ``resume``, an existing ``metrics.jsonl`` is replaced (with a
    warning) at the first :meth:`log`, unless :meth:`truncate_after` is called
    before that: it marks the run as resumed, so a trainer may create the
    logger first and decide whether it resumes later. Nothing is written at
    construction; the trackers start their runs (new, or continued when resumed) at
    the first :meth:`log`.

    Use as a context manager, or call :meth:`close`. Only one process (rank 0)
    should log into a run directory.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        tensorboard: bool = True,
        resume: bool = False,
        resume_step: int | None = None,
        report_to: Sequence[str] = ("tensorboard",),
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tracker_dir: Path | str | None = None,
    ) -> None:
        if resume_step is not None and not resume:
            raise ValueError("resume_step is only meaningful with resume=True")
        if isinstance(report_to, str):
            report_to = [report_to]
        unknown = [name for name in report_to if name not in TRACKERS]
        if unknown:
            raise ValueError(f"report_to: unknown {unknown}; choose from {', '.join(TRACKERS)}")
        self._tracker_names = [name for name in dict.fromkeys(report_to)
                               if name != "tensorboard"]
        for name in self._tracker_names:
            check_installed(name)  # fail before the job starts, not at its first step
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._resume = resume
        self._use_tensorboard = tensorboard and "tensorboard" in report_to
        self._run_name = run_name or self.run_dir.resolve().name
        self._config = config
        self._tracker_dir = Path(tracker_dir) if tracker_dir is not None else self.run_dir
        self._trackers: dict[str, Tracker] | None = None  # started at the first log
        self._file: TextIO | None = None
        self._writer: Any = None
        self._purge_step: int | None = None
        self._closed = False
        if resume_step is not None:
            self.truncate_after(resume_step)

    def log(self, step: int, metrics: Mapping[str, Scalar]) -> None:
        """Write one record for ``step``: a JSON line (flushed), TensorBoard scalars and
        the trackers' metrics.

        Values may be Python numbers, numpy scalars or one-element tensors.

        Raises:
            ValueError: a key is ``"step"``/``"time"``, or a tensor has more than one element.
            TypeError: a key is not a string or a value is not a number.
            RuntimeError: the logger is closed.
        """
        self._check_open()
        step = _as_step(step)
        now = time.time()
        values = {_check_key(key): _to_number(key, value) for key, value in metrics.items()}
        record: dict[str, Any] = {"step": step, "time": now}
        record.update({key: _json_number(value) for key, value in values.items()})
        resumed = self._resume  # before the first open settles it
        jsonl = self._jsonl()
        jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        jsonl.flush()
        self._log_tensorboard(step, now, values)
        if self._trackers is None:
            self._trackers = self._open_trackers(resumed)
        for tracker in self._trackers.values():
            tracker.log(step, now, values)

    def truncate_after(self, step: int) -> int:
        """Keep the file for a run resuming from ``step``: drop lines with a greater step.

        Lines that are not valid JSON (a line cut short by a crash) are dropped
        too. TensorBoard events after ``step`` are purged when the writer next
        opens. Returns the number of lines dropped.
        """
        self._check_open()
        step = _as_step(step)
        self._close_sinks()
        kept, dropped = [], 0
        for line in _read_lines(self.path):
            record = _parse_line(line)
            if record is None or record["step"] > step:
                dropped += 1
            else:
                kept.append(line)
        write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
        self._resume = True
        self._purge_step = step + 1
        return dropped

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (JSON lines are flushed as written)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the JSONL file, the TensorBoard writer and the trackers' runs
        (a tracker failing to close is a warning). Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close_sinks()
            for name, tracker in (self._trackers or {}).items():
                try:
                    tracker.close()
                except Exception as err:  # the metrics are written; report, do not mask
                    warnings.warn(f"closing the {name} run failed: {err}", stacklevel=2)
            self._trackers = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")

    def _close_sinks(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _jsonl(self) -> TextIO:
        """The open metrics file; a fresh (not resumed) run replaces an old one here."""
        if self._file is None:
            fresh = not self._resume
            if fresh and self.path.exists() and self.path.stat().st_size > 0:
                warnings.warn(
                    f"replacing the metrics of an earlier run in {self.path}; pass "
                    "resume=True (or call truncate_after) to continue them",
                    stacklevel=3,
                )
                self._purge_step = 0  # hide the old run's TensorBoard events as well
            self._file = self.path.open("w" if fresh else "a", encoding="utf-8")
            self._resume = True  # from now on, this run's own file is continued
        return self._file

    def _log_tensorboard(self, step: int, walltime: float, values: dict[str, float | int]) -> None:
        writer = self._tensorboard_writer()
        if writer is None or not values:
            return
        # one event holding every scalar of the step (one add_scalar per key writes one
        # event each, a cost paid per key at every step)
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        merged = Summary(value=[v for key, value in values.items()
                                for v in scalar(key, float(value)).value])
        writer._get_file_writer().add_summary(merged, step, walltime)

    def _open_trackers(self, resumed: bool) -> dict[str, Tracker]:
        trackers: dict[str, Tracker] = {}
        try:
            for name in self._tracker_names:
                trackers[name] = open_tracker(
                    name, run_dir=self.run_dir, tracker_dir=self._tracker_dir,
                    run_name=self._run_name, config=self._config, resume=resumed)
        except BaseException:
            for tracker in trackers.values():
                tracker.close()
            raise
        return trackers

    def _tensorboard_writer(self) -> Any:
        if self._writer is None and self._use_tensorboard:
            writer_class = _import_summary_writer()
            if writer_class is None:
                self._use_tensorboard = False
                return None
            self._writer = writer_class(
                log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step
            )
        return self._writer


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Read the records of a ``metrics.jsonl`` file (or of a run directory holding one).

    ``null`` values stay ``None``. A malformed *last* line (cut short by a
    crash) is skipped; a malformed line elsewhere raises ``ValueError`` naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = _read_lines(path)
    records = []
    for number, line in enumerate(lines, start=1):
        record = _parse_line(line)
        if record is not None:
            records.append(record)
        elif number != len(lines):
            raise ValueError(f"{path}:{number} is not a JSON metrics record: {line[:80]!r}")
    return records


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _as_step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError(f"step must be an integer, got {step!r}")
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {type(step).__name__}") from None


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"metric names must be strings, got {key!r}")
    if key in _RESERVED_KEYS:
        raise ValueError(f"metric name {key!r} is reserved for the record itself")
    return key


def _to_number(key: str, value: Any) -> float | int:
    """A Python number from a number, a numpy scalar or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log a scalar "
                "(e.g. .mean()) instead"
            )
        value = value.detach().item()
    elif isinstance(value, np.ndarray | np.generic):
        if np.size(value) != 1:
            raise ValueError(f"metric {key!r} is an array of shape {np.shape(value)}; log a scalar")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; metrics must be numbers")


def _json_number(value: float | int) -> float | int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _import_summary_writer() -> Any:
    global _tensorboard_warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if not _tensorboard_warned:
            _tensorboard_warned = True
            warnings.warn(
                f"TensorBoard logging is off ({error}); metrics go to {METRICS_FILE} only. "
                "Install it with `pip install tensorboard`.",
                stacklevel=4,
            )
        return None
    return SummaryWriter
