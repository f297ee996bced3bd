"""Telemetry: metrics JSONL + TensorBoard, resume truncation, plots, progress, atomic JSON."""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.telemetry import (
    MetricsLogger,
    ProgressBar,
    format_postfix,
    json_safe,
    plot_metrics,
    read_metrics,
    write_json_atomic,
)
from plait.telemetry import metrics as metrics_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_steps(run_dir: Path, steps: range, **kwargs: object) -> None:
    with MetricsLogger(run_dir, tensorboard=False, **kwargs) as logger:
        for step in steps:
            logger.log(step, {"reward/mean": step / 10})


# --------------------------------------------------------------------------- metrics


def test_log_writes_one_flushed_json_line_per_step(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": torch.tensor(0.5), "acc": np.float32(0.25), "tokens": 12, "ok": True})
    logger.log(2, {"loss": 0.25})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # before close: flushed
    first = json.loads(lines[0])
    assert len(lines) == 2
    assert first["step"] == 1 and isinstance(first["time"], float)
    assert {key: first[key] for key in ("loss", "acc", "tokens", "ok")} == {
        "loss": 0.5,
        "acc": 0.25,
        "tokens": 12,
        "ok": 1,
    }
    logger.close()
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]


def test_nan_and_inf_are_written_as_null_and_keep_their_key(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "lr": 1e-5})

    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["loss"] is None and record["grad_norm"] is None and record["lr"] == 1e-5


def test_resume_truncates_steps_after_the_checkpoint(tmp_path: Path) -> None:
    log_steps(tmp_path, range(1, 6))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "rew')  # a line cut short by the crash

    log_steps(tmp_path, range(4, 6), resume=True, resume_step=3)

    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_truncate_after_before_the_first_log_resumes_a_default_logger(tmp_path: Path) -> None:
    log_steps(tmp_path, range(1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "replacing the metrics" warning
        with MetricsLogger(tmp_path, tensorboard=False) as logger:  # resume decided later
            logger.truncate_after(2)
            logger.log(3, {"reward/mean": 3.0})
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3]


def test_truncate_after_returns_dropped_count(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(5):
            logger.log(step, {"x": step})
        assert logger.truncate_after(2) == 2
        logger.log(3, {"x": 30})
    assert [(record["step"], record["x"]) for record in read_metrics(tmp_path)][-2:] == [
        (2, 2),
        (3, 30),
    ]


def test_fresh_run_overwrites_existing_metrics_with_a_warning(tmp_path: Path) -> None:
    log_steps(tmp_path, range(3))
    with pytest.warns(UserWarning, match="resume=True"):
        log_steps(tmp_path, range(1))
    assert len(read_metrics(tmp_path)) == 1


def test_tensorboard_event_file_is_written(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward/mean": 0.5})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_missing_tensorboard_warns_once_and_keeps_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    monkeypatch.setattr(metrics_module, "_tensorboard_warned", False)
    with pytest.warns(UserWarning, match="TensorBoard logging is off") as caught:
        with MetricsLogger(tmp_path) as logger:
            logger.log(1, {"x": 1.0})
            logger.log(2, {"x": 2.0})
        with MetricsLogger(tmp_path / "other") as logger:
            logger.log(1, {"x": 1.0})
    assert len([w for w in caught if "TensorBoard" in str(w.message)]) == 1
    assert len(read_metrics(tmp_path)) == 2
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize(
    ("metrics", "error", "match"),
    [
        ({"step": 1.0}, ValueError, "reserved"),
        ({"v": torch.ones(3)}, ValueError, r"shape \(3,\)"),
        ({"v": "high"}, TypeError, "must be numbers"),
        ({3: 1.0}, TypeError, "must be strings"),
    ],
)
def test_bad_metrics_raise_clear_errors(
    tmp_path: Path, metrics: dict, error: type, match: str
) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(error, match=match):
            logger.log(1, metrics)


def test_logging_after_close_raises(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(1, {"x": 1})


def test_read_metrics_rejects_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


# --------------------------------------------------------------------------- plots


def test_plot_metrics_writes_a_png(tmp_path: Path) -> None:
    records = [{"step": step, "reward/mean": math.sin(step / 5)} for step in range(50)]
    records += [{"step": step, "eval/accuracy": step / 50} for step in range(0, 50, 10)]
    records[3]["reward/mean"] = None  # a NaN step leaves a gap

    out = plot_metrics(records, tmp_path / "plots" / "metrics.png", title="run")

    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [path.name for path in out.parent.iterdir()] == ["metrics.png"]


def test_plot_metrics_with_custom_panels_and_no_data(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    custom = plot_metrics(records, tmp_path / "a.png", panels=[("loss", ["loss", "absent"])])
    empty = plot_metrics([], tmp_path / "b.png")
    assert custom.read_bytes().startswith(PNG_MAGIC)
    assert empty.read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------- progress


def test_disabled_progress_prints_about_ten_status_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    with ProgressBar(100, "grpo", disable=True, file=stream) as bar:
        for step in range(100):
            bar.update(1, reward=0.5 + step / 1000, **{"tok/s": 12345.6})

    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("grpo: 10/100 (10%)")
    assert lines[-1].startswith("grpo: 100/100 (100%)")
    assert "reward=0.599 tok/s=12346" in lines[-1]


def test_progress_is_status_lines_when_stream_is_not_a_tty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PLAIT_PROGRESS", raising=False)
    stream = io.StringIO()  # isatty() is False
    bar = ProgressBar(4, "sft", initial=2, file=stream)
    bar.update()
    bar.close()
    assert bar.disabled
    assert stream.getvalue().startswith("sft: 3/4 (75%)")


def test_progress_env_forces_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_PROGRESS", "1")
    stream = io.StringIO()
    with ProgressBar(3, "dpo", file=stream) as bar:
        bar.update(3, loss=0.25)
    assert not bar.disabled
    assert "dpo" in stream.getvalue() and "loss=0.25" in stream.getvalue()


def test_close_reports_unreported_progress_of_an_interrupted_run() -> None:
    stream = io.StringIO()
    bar = ProgressBar(100, disable=True, file=stream)
    bar.update(3, acc=torch.tensor(0.125))
    bar.close()
    assert stream.getvalue().startswith("3/100 (3%)")
    assert stream.getvalue().rstrip().endswith("acc=0.125")


def test_format_postfix_is_compact() -> None:
    assert format_postfix({"reward": 0.51234, "n": 3, "samples/s": np.float64(2.5e3)}) == (
        "reward=0.512 n=3 samples/s=2500"
    )


# --------------------------------------------------------------------------- JSON


def test_write_json_atomic_converts_values_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = write_json_atomic(
        tmp_path / "summary.json",
        {"loss": torch.tensor(0.5), "nan": float("nan"), "ids": (1, 2), "arr": np.arange(2)},
    )
    assert json.loads(path.read_text()) == {"loss": 0.5, "nan": None, "ids": [1, 2], "arr": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_json_safe_names_the_offending_value() -> None:
    with pytest.raises(TypeError, match=r"state\['data'\]\[1\] has type object"):
        json_safe({"data": [1, object()]}, where="state")
    with pytest.raises(TypeError, match="key 3"):
        json_safe({"ok": {3: 1}})


def test_stage_memory_peaks_nest(monkeypatch) -> None:
    """Each stage keeps the peak allocated during it; an inner stage's peak counts in its
    parent's, and a parent's earlier peak survives the inner stage's counter restart."""
    from plait.telemetry import timing

    state = {"now": 0, "peak": 0}

    def alloc(mb):
        state["now"] += mb * 2**20
        state["peak"] = max(state["peak"], state["now"])

    def reset():
        state["peak"] = state["now"]

    monkeypatch.setattr(timing, "_cuda_tracked", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    timer = timing.StageTimer()
    with timer.stage("generate"):
        alloc(300)                 # KV cache
        alloc(-200)
        with timer.stage("reward"):
            alloc(20)
            alloc(-20)
        alloc(-100)
    with timer.stage("update"):
        alloc(500)
        alloc(-500)
    assert timer.memory == {"generate": 300.0, "reward": 120.0, "update": 500.0}


def test_tensorboard_holds_every_scalar_of_every_step(tmp_path: Path) -> None:
    """All keys of a step go into one event; TensorBoard reads each back as its own
    scalar series, NaN included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward/mean": 0.5, "time/step": 0.25, "loss/policy": float("nan")})
        logger.log(2, {"reward/mean": 0.75, "time/step": 0.125})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"reward/mean", "time/step", "loss/policy"}
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("time/step")] == [(1, 0.25), (2, 0.125)]
    assert math.isnan(events.Scalars("loss/policy")[0].value)
