"""Experiment trackers (run.report_to): wandb offline runs and an MLflow file store hold
the logged values, resumed runs continue the same tracker run, a missing package names
its extra, and plait jobs report to all three sinks.

Outside CI a tracker that is not installed skips its tests; CI installs both extras, so
there a missing one fails."""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import ConfigError, load_config
from plait.runtime.run_dir import check_run_dir
from plait.telemetry.metrics import MetricsLogger, read_metrics
from plait.telemetry.trackers import TRACKERS_FILE, TrackerMissing, mlflow_name

CONFIG = {"run": {"dir": "x"}, "algo": {"name": "grpo", "kl_coef": 0.04},
          "data": {"task_args": {"digits": 2}}, "reward": {"functions": [{"fn": "task"}]},
          "long": "y" * 7000}


def _require(module: str):
    """The tracker's package; a skip when it is missing, except in CI (CI=true)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture
def tracker_env(monkeypatch):
    """No tracker settings from the environment: wandb offline, MLflow in the run dir."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # unset, as plait finds it (plait sets it; the first setenv restores it afterwards)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


# ----------------------------------------------------------------------------- readers


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a ``.wandb`` file (a LevelDB-style log of protobuf records:
    32 KiB blocks, each record cut into chunks behind a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += room
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_rows(tracker_dir: Path, run_id: str, count: int) -> list[dict]:
    """The history rows of run ``run_id``'s offline files (one directory per attempt,
    ``-1`` appended to a second one started in the same second) once they hold
    ``count``: the wandb service may still be writing when ``finish()`` returns (at exit
    it waits)."""
    deadline = time.monotonic() + 20
    while True:
        paths = (tracker_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")
        rows = [row for path in sorted(paths) for row in wandb_history(path)]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def mlflow_run(run_dir: Path):
    """(client, run) of the MLflow run whose id ``run_dir/trackers.json`` holds."""
    from mlflow.tracking import MlflowClient

    ref = json.loads((run_dir / TRACKERS_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ref["tracking_uri"])
    return client, client.get_run(ref["run_id"])


def mlflow_values(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# ------------------------------------------------------------------------------- wandb


def test_wandb_offline_run_holds_the_logged_values_and_resumes(tmp_path, tracker_env):
    _require("wandb")
    steps = {1: {"loss": 0.5, "eval/pass@4": 1.0, "bad": float("nan")},
             2: {"loss": 0.25, "eval/pass@4": 0.0, "bad": float("inf")},
             3: {"loss": 0.125}}
    with MetricsLogger(tmp_path, report_to=["wandb"], config=CONFIG) as logger:
        for step, values in steps.items():
            logger.log(step, values)
    run_id = json.loads((tmp_path / TRACKERS_FILE).read_text())["wandb"]["id"]
    rows = {row["_step"]: row for row in wandb_rows(tmp_path, run_id, 3)}
    assert sorted(rows) == [1, 2, 3]
    for step, values in steps.items():
        for key, value in values.items():
            assert same(rows[step][key], value), (step, key)
    assert not (tmp_path / "tensorboard").exists()  # not asked for

    # a resume from step 2 continues the same run id
    with MetricsLogger(tmp_path, report_to=["wandb"], config=CONFIG, resume=True,
                       resume_step=2) as logger:
        logger.log(3, {"loss": 0.0625})
    assert json.loads((tmp_path / TRACKERS_FILE).read_text())["wandb"]["id"] == run_id
    rows = wandb_rows(tmp_path, run_id, 4)
    assert (3, 0.0625) in [(row["_step"], row["loss"]) for row in rows]


def test_wandb_mode_from_the_environment_is_kept(tmp_path, tracker_env, monkeypatch):
    _require("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsLogger(tmp_path, report_to=["wandb"]) as logger:
        logger.log(1, {"loss": 1.0})
    assert not list((tmp_path / "wandb").glob("offline-run-*"))
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0]


# ------------------------------------------------------------------------------ mlflow


def test_mlflow_store_holds_the_logged_values_params_and_resumes(tmp_path, tracker_env):
    _require("mlflow")
    steps = {1: {"loss": 0.5, "eval/pass@4": 1.0, "time/x": 2.0, "nan": float("nan")},
             2: {"loss": 0.25, "eval/pass@4": 0.5, "inf": float("-inf")},
             3: {"loss": 0.125, "time/x/y": 3.0}}  # time/x is a metric: a file store clash
    with MetricsLogger(tmp_path, report_to=["mlflow"], config=CONFIG) as logger:
        for step, values in steps.items():
            logger.log(step, values)
    assert (tmp_path / "mlruns").is_dir()
    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert client.get_experiment(run.info.experiment_id).name == "plait"
    assert mlflow_values(client, run.info.run_id, "loss") == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert mlflow_values(client, run.info.run_id, "eval/pass_4") == [(1, 1.0), (2, 0.5)]
    assert mlflow_values(client, run.info.run_id, "time/x") == [(1, 2.0)]
    assert mlflow_values(client, run.info.run_id, "time_x_y") == [(3, 3.0)]
    assert mlflow_values(client, run.info.run_id, "inf") == [(2, float("-inf"))]
    assert math.isnan(mlflow_values(client, run.info.run_id, "nan")[0][1])
    params = run.data.params
    assert params["algo.kl_coef"] == "0.04" and params["data.task_args.digits"] == "2"
    assert json.loads(params["reward.functions"]) == [{"fn": "task"}]
    assert len(params["long"]) < 7000  # cut to MLflow's limit

    # a resume continues the run: new steps join the same metric history
    config = {**CONFIG, "algo": {"name": "grpo", "kl_coef": 0.5}}  # a param changed
    with MetricsLogger(tmp_path, report_to=["mlflow"], config=config, resume=True,
                       resume_step=3) as logger:
        logger.log(4, {"loss": 0.0625})
    client, resumed = mlflow_run(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert mlflow_values(client, run.info.run_id, "loss")[-1] == (4, 0.0625)
    assert resumed.data.params["algo.kl_coef"] == "0.04"  # params keep their first values

    # a fresh run in the same directory is a new MLflow run
    with pytest.warns(UserWarning, match="replacing the metrics"), \
            MetricsLogger(tmp_path, report_to=["mlflow"]) as logger:
        logger.log(1, {"loss": 9.0})
    client, fresh = mlflow_run(tmp_path)
    assert fresh.info.run_id != run.info.run_id
    assert mlflow_values(client, fresh.info.run_id, "loss") == [(1, 9.0)]


def test_mlflow_tracking_uri_from_the_environment(tmp_path, tracker_env, monkeypatch):
    _require("mlflow")
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    with MetricsLogger(tmp_path / "run", report_to=["mlflow"]) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "run" / "mlruns").exists() and store.is_dir()
    client, run = mlflow_run(tmp_path / "run")
    assert client.get_experiment(run.info.experiment_id).name == "mine"
    assert mlflow_values(client, run.info.run_id, "loss") == [(1, 1.0)]


def test_mlflow_names_are_sanitised_consistently():
    assert mlflow_name("eval/pass@4") == "eval/pass_4"
    assert mlflow_name("a//b/./c/../d/") == "a/b/c/d"
    assert mlflow_name("größe:x") == "gr__e_x"
    assert mlflow_name("@@") == "__" and mlflow_name("/") == "_"
    assert len(mlflow_name("k" * 300)) == 250


# ------------------------------------------------------------------- missing packages


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_names_its_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import now fails
    with pytest.raises(TrackerMissing, match=rf"pip install 'plait\[{name}\]'"):
        MetricsLogger(tmp_path, report_to=["tensorboard", name])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_command_line_reports_a_missing_tracker_in_one_line(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(["sft", *SFT_JOB, "sft.steps=2", f"run.dir={tmp_path / 'run'}",
                 "run.report_to=[wandb]"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "pip install 'plait[wandb]'" in err and "Traceback" not in err


def test_report_to_is_validated_and_defaults_to_tensorboard(tmp_path):
    assert load_config(None, []).run.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"run.report_to\[1\]: 'mlfow' is not one of "
                                          r"'tensorboard', 'wandb', 'mlflow'"):
        load_config(None, ["run.report_to=[wandb, mlfow]"])
    with MetricsLogger(tmp_path / "off", report_to=[]) as logger:  # tensorboard not asked
        logger.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path / "on") as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------- plait jobs

SFT_JOB = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.task=reverse",
    "data.num_train=64", "data.num_eval=4", "sft.batch_size=8", "train.threads=2",
    "run.progress=false",
]


def test_plait_sft_reports_to_tensorboard_wandb_and_mlflow(tmp_path, tracker_env, capsys):
    _require("wandb")
    _require("mlflow")
    run_dir = tmp_path / "run"
    job = [*SFT_JOB, "sft.steps=3", f"run.dir={run_dir}",
           "run.report_to=[tensorboard, wandb, mlflow]"]
    assert main(["sft", *job]) == 0, capsys.readouterr().err
    losses = {r["step"]: r["loss/sft"] for r in read_metrics(run_dir) if "loss/sft" in r}
    assert sorted(losses) == [1, 2, 3]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    run_id = json.loads((run_dir / TRACKERS_FILE).read_text())["wandb"]["id"]
    rows = wandb_rows(run_dir, run_id, 3)
    assert {r["_step"]: r["loss/sft"] for r in rows if "loss/sft" in r} == losses

    client, run = mlflow_run(run_dir)
    assert run.info.run_name == "run" and run.data.params["sft.steps"] == "3"
    assert mlflow_values(client, run.info.run_id, "loss/sft") == sorted(losses.items())

    # the trackers' files are plait's: run.overwrite may delete the directory
    check_run_dir(load_config(None, [*job, "run.overwrite=true"]))


def test_plait_train_warm_start_gets_its_own_tracker_runs(tmp_path, tracker_env, capsys):
    _require("mlflow")
    run_dir = tmp_path / "rl"
    job = [*SFT_JOB, "sft.steps=2", "train.steps=2", "algo.prompts_per_step=2",
           "algo.group_size=2", "rollout.max_new_tokens=4", "run.tensorboard=false",
           f"run.dir={run_dir}", "run.report_to=[mlflow]"]
    assert main(["train", *job]) == 0, capsys.readouterr().err
    client, run = mlflow_run(run_dir)
    _, warm = mlflow_run(run_dir / "sft")
    assert (run.info.run_name, warm.info.run_name) == ("rl", "rl-sft")
    assert run.info.experiment_id == warm.info.experiment_id  # one store: RUN_DIR/mlruns
    sft_losses = [(r["step"], r["sft/loss"]) for r in read_metrics(run_dir / "sft")]
    assert mlflow_values(client, warm.info.run_id, "sft/loss") == sft_losses
    rewards = [(r["step"], r["reward/mean"]) for r in read_metrics(run_dir)
               if "reward/mean" in r]
    assert mlflow_values(client, run.info.run_id, "reward/mean") == rewards
