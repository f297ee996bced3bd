"""Experiment trackers beside ``metrics.jsonl``: Weights & Biases and MLflow.

Each is optional and imported only when asked for (``run.report_to``); a missing package
fails at once with :class:`TrackerMissing`, which names the extra to install.

- **wandb** runs offline unless ``WANDB_MODE`` is set: files under ``RUN_DIR/wandb``
  (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads them later); project from
  ``WANDB_PROJECT``, else ``plait``. Values are logged raw (NaN and infinity included).
- **mlflow** writes a file store under ``RUN_DIR/mlruns`` unless ``MLFLOW_TRACKING_URI``
  is set; experiment from ``MLFLOW_EXPERIMENT_NAME``, else ``plait``. Recent MLflow
  refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true, so plait sets it
  (when unset) for the process when the store is one. Params are the flattened config,
  values cut to MLflow's length limit.

MLflow names: metric names keep ASCII letters, digits, ``_ - . /`` and spaces; any other
character becomes ``_`` (``eval/pass@4`` is ``eval/pass_4``), empty, ``.`` and ``..``
path segments are dropped and names are cut to 250 characters, so a name maps to the
same MLflow name on every OS. A name that would also be a folder of another (``a``
beside ``a/b``, which a file store cannot hold) has its ``/`` made ``_``, then ``_``
appended while it still clashes (``a/b`` after ``a`` is ``a_b``, ``a`` after ``a/b``
is ``a_``); a logger keeps each name's mapping for all its steps. Param names follow
the same rule with ``/`` made ``_`` as well.

Resuming: each tracker's run id is kept in ``trackers.json`` beside ``metrics.jsonl``,
and a resumed logger continues that run (wandb ``resume="allow"`` with the same id: each
offline attempt has its own directory, and ``wandb sync`` adds them to one run; the
MLflow run is reopened). Neither can forget the steps a crashed attempt logged after its
last checkpoint: MLflow keeps both values of such a step, and wandb keeps the crashed
attempt's, ignoring a step below the last it holds. MLflow params keep their first
values: one changed on resume (e.g. ``train.steps``) is not logged again; ``config.yaml``
has it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plait.errors import PlaitError

__all__ = ["MLFLOW_DIR", "TRACKERS", "TRACKERS_FILE", "WANDB_DIR", "Tracker", "TrackerMissing",
           "check_installed", "flatten", "mlflow_name", "open_tracker"]

TRACKERS = ("tensorboard", "wandb", "mlflow")
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlruns"
TRACKERS_FILE = "trackers.json"  # each tracker's run id, to continue it on resume
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
_MLFLOW_NAME_MAX = 250
_MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000
_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


class TrackerMissing(PlaitError, ImportError):
    """A tracker in ``run.report_to`` whose package is not installed."""


def check_installed(name: str) -> Any:
    """Import the package of tracker ``name`` (``wandb`` or ``mlflow``) and return it, or
    raise :class:`TrackerMissing` naming the extra that installs it."""
    if name not in _PACKAGES:
        raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
    try:
        return importlib.import_module(_PACKAGES[name])
    except ImportError as err:
        raise TrackerMissing(
            f"run.report_to includes {name!r}, but {name} cannot be imported ({err}): "
            f"install it with pip install 'plait[{name}]', or drop {name!r} from "
            "run.report_to") from None


class Tracker:
    """One tracker's run: :meth:`log` a step's scalars, :meth:`close` at the end;
    ``run_ref`` is what ``trackers.json`` keeps to continue it."""

    run_ref: dict[str, str]

    def log(self, step: int, walltime: float, values: Mapping[str, float | int]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def open_tracker(name: str, *, run_dir: Path, tracker_dir: Path, run_name: str,
                 config: Mapping[str, Any] | None, resume: bool) -> Tracker:
    """Start (or, with ``resume``, continue) tracker ``name``'s run for the metrics of
    ``run_dir``; its files go under ``tracker_dir`` (``wandb/``, ``mlruns/``)."""
    ids = _RunIds(Path(run_dir) / TRACKERS_FILE)
    previous = ids.get(name) if resume else None
    if name == "wandb":
        tracker: Tracker = _WandbTracker(Path(tracker_dir), run_name, config, previous)
    elif name == "mlflow":
        tracker = _MlflowTracker(Path(tracker_dir), run_name, config, previous)
    else:
        raise ValueError(f"unknown tracker {name!r}")
    ids.set(name, tracker.run_ref)
    return tracker


class _RunIds:
    """``trackers.json``: ``{tracker: its run reference}`` for a run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, name: str) -> Any:
        return self._read().get(name)

    def set(self, name: str, ref: Any) -> None:
        from plait.telemetry.summary import write_json_atomic

        write_json_atomic(self.path, {**self._read(), name: ref})


# ------------------------------------------------------------------------------- wandb


class _WandbTracker(Tracker):
    def __init__(self, tracker_dir: Path, run_name: str, config: Mapping[str, Any] | None,
                 previous: Any) -> None:
        wandb = check_installed("wandb")
        run_id = previous.get("id") if isinstance(previous, dict) else None
        tracker_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            dir=str(tracker_dir),  # wandb writes into dir/wandb
            project=os.environ.get("WANDB_PROJECT") or "plait",
            name=run_name,
            config=dict(config or {}),
            id=run_id,  # None: a new run
            resume="allow",
            # read here: wandb reads the environment once per process
            mode=os.environ.get("WANDB_MODE") or "offline",
            reinit="create_new",  # never end another logger's run in this process
        )
        self.run_ref = {"id": self.run.id}

    def log(self, step: int, walltime: float, values: Mapping[str, float | int]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


# ------------------------------------------------------------------------------ mlflow


def mlflow_name(name: str) -> str:
    """``name`` as MLflow accepts it on every OS (the rule is in the module doc)."""
    segments = [s for s in _MLFLOW_UNSAFE.sub("_", name).split("/") if s not in ("", ".", "..")]
    return "/".join(segments)[:_MLFLOW_NAME_MAX].rstrip("/") or "_"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``optim.lr``); other values as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


class _MlflowTracker(Tracker):
    def __init__(self, tracker_dir: Path, run_name: str, config: Mapping[str, Any] | None,
                 previous: Any) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            store = tracker_dir / MLFLOW_DIR
            store.mkdir(parents=True, exist_ok=True)
            uri = store.resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # a file store, plait's or the user's
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        check_installed("mlflow")
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as max_value
        except ImportError:  # pragma: no cover - moved in some release
            max_value = 500
        self._metric, self._running = Metric, RunStatus.to_string(RunStatus.RUNNING)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._continued(previous, uri, MlflowException)
        if self.run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "plait"
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else \
                self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            logged: set[str] = set()
            names: set[str] = set()
        else:
            data = self.client.get_run(self.run_id).data
            logged, names = set(data.params), set(data.metrics)
        params = {mlflow_name(k).replace("/", "_"): _param_value(v)[:max_value]
                  for k, v in flatten(config or {}).items()}
        params = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH])
        self.run_ref = {"run_id": self.run_id, "tracking_uri": uri}
        self._names: dict[str, str] = {}  # metric key -> its MLflow name
        self._taken = names  # the MLflow names logged in this run

    def _continued(self, previous: Any, uri: str, error: type[Exception]) -> str | None:
        """The stored run's id when it is in this store and can be reopened, else None."""
        if not isinstance(previous, dict) or previous.get("tracking_uri") != uri:
            return None
        run_id = previous.get("run_id")
        if not isinstance(run_id, str):
            return None
        try:
            run = self.client.get_run(run_id)
            if run.info.lifecycle_stage != "active":
                return None
            self.client.update_run(run_id, status=self._running)
        except error:
            return None
        return run_id

    def log(self, step: int, walltime: float, values: Mapping[str, float | int]) -> None:
        stamp = int(walltime * 1000)
        metrics = [self._metric(self._name(key), float(value), stamp, step)
                   for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def _name(self, key: str) -> str:
        name = self._names.get(key)
        if name is None:
            name = mlflow_name(key)
            if self._clashes(name):
                name = name.replace("/", "_")
                while self._clashes(name):
                    name += "_"
            self._names[key] = name
            self._taken.add(name)
        return name

    def _clashes(self, name: str) -> bool:
        """Whether ``name`` is a folder of a taken name, or one of its folders is taken."""
        parts = name.split("/")
        return any("/".join(parts[:i]) in self._taken for i in range(1, len(parts))) or \
            any(taken.startswith(name + "/") for taken in self._taken)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
