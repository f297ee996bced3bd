"""Training curves as a PNG, drawn from ``metrics.jsonl`` records.

Uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) rather than
``pyplot``, so plotting never changes the process-wide backend or figure
state of a notebook or another library, and works without a display.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["DEFAULT_PANELS", "plot_metrics", "plot_reliability", "plot_stage_timeline", "save_png"]

Panels = Sequence[tuple[str, Sequence[str]]]

DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("eval/accuracy", "train/accuracy")),
)
"""Panels drawn by :func:`plot_metrics` when none are given: (title, metric keys)."""

_MARKER_MAX_POINTS = 20  # series this short are drawn with markers so single points show
_SPARSE_FRACTION = 0.5  # a series on fewer than this share of steps is "sparse" (e.g. eval)


def plot_metrics(
    records: Sequence[Mapping[str, Any]],
    out_png: Path | str,
    *,
    panels: Panels | None = None,
    title: str | None = None,
) -> Path:
    """Draw one panel per group of metric keys against ``step`` and save a PNG.

    Args:
        records: metric records as written by ``MetricsLogger`` (each with a
            ``"step"``), e.g. from ``read_metrics(run_dir)``.
        out_png: the file to write (atomically; parent directories are created).
        panels: ``[(panel_title, [key, ...]), ...]``; default :data:`DEFAULT_PANELS`.
            Keys absent from the records are skipped and panels left without
            data are omitted. ``None`` values (NaN in the run) leave gaps.
        title: a title over the whole figure.

    Sparse series (logged on few steps, like eval metrics) are drawn with markers.
    If no panel has data the PNG says so, so a caller can always show the file.

    Returns:
        ``out_png`` as a ``Path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = DEFAULT_PANELS if panels is None else panels
    step_count = len({record["step"] for record in records if "step" in record})
    drawn = [(name, _panel_series(records, keys)) for name, keys in panels]
    drawn = [(name, series) for name, series in drawn if series]

    columns = 1 if len(drawn) <= 2 else 2
    rows = max(1, math.ceil(len(drawn) / columns))
    figure = Figure(figsize=(6.5 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    if not drawn:
        figure.text(0.5, 0.5, "no metrics to plot yet", ha="center", va="center")
    else:
        axes = list(figure.subplots(rows, columns, squeeze=False).flat)
        for axis, (name, series) in zip(axes, drawn, strict=False):
            _draw_panel(axis, name, series, step_count)
        for axis in axes[len(drawn) :]:
            axis.set_visible(False)
    return save_png(figure, out_png)


def _panel_series(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> list[tuple[str, list[int], list[float]]]:
    """``(key, steps, values)`` for each key with at least one numeric point."""
    series = []
    for key in keys:
        steps, values = _series(records, key)
        if any(not math.isnan(value) for value in values):
            series.append((key, steps, values))
    return series


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = []
    for record in records:
        if key not in record or "step" not in record:
            continue
        value = record[key]
        if value is None:
            points.append((record["step"], math.nan))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            points.append((record["step"], float(value)))
    points.sort(key=lambda point: point[0])
    return [step for step, _ in points], [value for _, value in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN points are skipped)."""
    out, recent = [], []
    for value in values:
        if not math.isnan(value):
            recent.append(value)
            recent = recent[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def _draw_panel(axis: Any, name: str, series: list, step_count: int) -> None:
    for key, steps, values in series:
        sparse = len(steps) <= _MARKER_MAX_POINTS or len(steps) < _SPARSE_FRACTION * step_count
        if sparse:
            axis.plot(steps, values, label=key, marker="o", markersize=3.5, linewidth=1.2)
            continue
        # dense, noisy per-step series: faint raw line plus a trailing mean
        window = max(5, len(steps) // 30)
        (raw,) = axis.plot(steps, values, linewidth=0.8, alpha=0.3)
        axis.plot(steps, _moving_average(values, window), color=raw.get_color(),
                  linewidth=1.6, label=f"{key} (mean of {window})")
    axis.set_title(name)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="best")


def save_png(figure: Any, out_png: Path | str | BinaryIO) -> Any:
    """Save to a path atomically, so an image viewer polling the file never reads half a
    PNG; a binary file object (e.g. ``io.BytesIO``, for an HTML report) is written as is.
    Returns ``out_png`` (a path as a ``Path``)."""
    if hasattr(out_png, "write"):
        figure.savefig(out_png, format="png", dpi=100)
        return out_png
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".tmp-{out_png.name}-", suffix=".png", dir=out_png.parent
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        os.replace(tmp_name, out_png)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_png


def plot_stage_timeline(steps: Sequence[Mapping[str, Any]], out_png: Path | str | BinaryIO, *,
                        title: str | None = None) -> Any:
    """A Gantt chart of where each step's wall time went, saved to ``out_png`` (a path, or
    a binary file object such as ``io.BytesIO``).

    ``steps`` are ``{"step": n, "spans": [[stage, start_s, end_s], ...]}`` with times in
    seconds from that step's start; steps are laid end to end on the time axis, one row
    per stage, so overlapping stages (e.g. reward scoring during generation) show as
    overlapping bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages: list[str] = []
    for record in steps:
        for name, _, _ in record["spans"]:
            if name not in stages:
                stages.append(name)
    figure = Figure(figsize=(10, 0.45 * max(3, len(stages)) + 1.2), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    colors = {name: f"C{i % 10}" for i, name in enumerate(stages)}
    offset = 0.0
    for record in steps:
        spans = record["spans"]
        length = max((end for _, _, end in spans), default=0.0)
        for name, start, end in spans:
            axis.barh(stages.index(name), max(end - start, 1e-4), left=offset + start,
                      color=colors[name], height=0.6)
        axis.axvline(offset, color="0.6", linewidth=0.6)
        axis.text(offset, len(stages) - 0.4, f"step {record['step']}", fontsize=7)
        offset += length
    axis.set_yticks(range(len(stages)), stages)
    axis.invert_yaxis()
    axis.set_xlabel("seconds")
    axis.grid(axis="x", alpha=0.3)
    axis.set_title(title or "stage timeline")
    return save_png(figure, out_png)


def plot_reliability(table: Sequence[Mapping[str, float]], out_png: Path | str, *,
                     title: str | None = None) -> Path:
    """A reliability diagram of pairwise judgements: each confidence bin's accuracy
    against its mean confidence, bars as wide as the bin, the diagonal for reference, and
    each bin's pair count above it (``table`` as ``algos.pairwise_calibration`` gives)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.plot([0.5, 1.0], [0.5, 1.0], color="0.5", linestyle="--", linewidth=1,
              label="calibrated")
    for row in table:
        axis.bar(row["low"], row["accuracy"], width=row["high"] - row["low"], align="edge",
                 color="C0", alpha=0.7, edgecolor="C0")
        axis.plot(row["confidence"], row["accuracy"], "o", color="C1", markersize=4)
        axis.text((row["low"] + row["high"]) / 2, min(row["accuracy"] + 0.02, 1.02),
                  str(int(row["pairs"])), ha="center", fontsize=7)
    axis.set_xlim(0.5, 1.0)
    axis.set_ylim(0.0, 1.05)
    axis.set_xlabel("confidence: max(p, 1 - p), p = sigmoid(score gap)")
    axis.set_ylabel("share judged right")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title or "reliability")
    return save_png(figure, out_png)


def plot_score_distribution(groups: Mapping[str, Sequence[float]], out_png: Path | str, *,
                            title: str | None = None) -> Path:
    """Histograms of reward-model scores, one per group (e.g. chosen and rejected
    responses, or each data source), on shared bins, with each group's mean and standard
    deviation in the legend: whether the model separates them, and on what scale."""
    import statistics

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    values = [v for scores in groups.values() for v in scores]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    bins = [low + (high - low) * i / 40 for i in range(41)] if high > low else 40
    for name, scores in groups.items():
        if not scores:
            continue
        spread = statistics.pstdev(scores) if len(scores) > 1 else 0.0
        axis.hist(scores, bins=bins, alpha=0.5,
                  label=f"{name}: mean {statistics.fmean(scores):.2f}, std {spread:.2f}")
    axis.set_xlabel("score")
    axis.set_ylabel("responses")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title or "score distribution")
    return save_png(figure, out_png)
