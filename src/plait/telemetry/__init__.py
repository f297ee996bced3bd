"""Run telemetry: metrics sinks (JSONL + TensorBoard), progress display, plots, JSON artefacts.

Everything here is boilerplate around training, never part of it: algorithms
and engines return numbers, and the recipe hands them to these sinks.
"""

from plait.telemetry.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, read_metrics
from plait.telemetry.plots import DEFAULT_PANELS, plot_metrics
from plait.telemetry.progress import PROGRESS_ENV, ProgressBar, format_postfix
from plait.telemetry.summary import json_safe, write_json_atomic, write_text_atomic

__all__ = [
    "DEFAULT_PANELS",
    "METRICS_FILE",
    "PROGRESS_ENV",
    "TENSORBOARD_DIR",
    "MetricsLogger",
    "ProgressBar",
    "format_postfix",
    "json_safe",
    "plot_metrics",
    "read_metrics",
    "write_json_atomic",
    "write_text_atomic",
]
