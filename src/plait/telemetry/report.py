"""One self-contained HTML page about one run or several: ``plait report``.

The page is built from what a run directory holds (``config.yaml``, ``summary.json``,
``metrics.jsonl``, ``timeline.jsonl``, ``eval_results.json``, ``bias_results.json`` and
the PNGs beside them) and needs nothing else: plots are embedded as base64 PNG data URIs,
the style is inline, there is no script, and a Content-Security-Policy forbids every
fetch, so the file can be mailed or archived as it is. Several runs are compared side by
side: one table column per run, the config keys that differ, curves overlaid.

A missing or malformed file becomes a note on the page, never a failure: a report is
most wanted for a run that went wrong. Every string read from a file is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait import __version__
from plait.errors import PlaitError
from plait.telemetry.trackers import flatten

__all__ = ["ReportError", "RunData", "default_report_path", "load_run", "render_report",
           "write_report"]

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval_results.json",
             "bias_results.json")
"""A directory holding none of these is not a run directory."""

SECTIONS = (
    ("summary", "Summary"),
    ("config", "Config"),
    ("curves", "Training curves"),
    ("timeline", "Stage timeline"),
    ("eval-suites", "Eval suites"),
    ("bias-probes", "Bias probes"),
    ("plots", "Plots"),
)
"""Each section's element id (stable: tests and links use it) and heading, in page order."""

_TIMELINE_STEPS = 5  # the Gantt chart shows the last steps only: more would be unreadable
_MAX_PNG_BYTES = 20 * 2**20  # a run-directory PNG above this is listed, not embedded
_REPLOTTED = ("bias.png",)  # drawn from its JSON in its own section, not shown twice
_PNG_FIRST = ("metrics.png", "timeline.png", "reliability.png", "scores.png")
_MARKER_MAX_POINTS = 20  # series this short are drawn with markers so single points show
_DPI = 100

# curve groups: (title, does a metric key belong); a key joins the first group it matches
_CURVE_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("reward", lambda key: key in ("reward/mean", "eval/reward")),
    ("accuracy", lambda key: key.count("/") <= 1
     and ("accuracy" in key.rsplit("/", 1)[-1] or key.endswith("/true_score"))),
    ("KL", lambda key: re.search(r"(^|[/_])kl($|[/_])", key.lower()) is not None),
    ("entropy", lambda key: "entropy" in key.lower()),
    ("response length", lambda key: "length" in key.lower()),
    ("loss", lambda key: "loss" in key.lower()),
    ("margin", lambda key: "margin" in key.lower()),
)
# held-out metrics whose per-source keys (eval/accuracy/SOURCE) look like an eval set's
_HELD_OUT_PREFIXES = frozenset({"accuracy", "reward", "reward_fn", "response_length"})
_SUITE_CURVE = re.compile(r"^(greedy_accuracy|pass@\d+|maj@\d+)$")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; margin: 0; color: #1f2328; background: #eef1f4; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 36px 48px; background: #fff;
  min-height: 100vh; box-sizing: border-box; }
h1 { font-size: 1.6em; margin: 0 0 .2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #d0d7de; padding-bottom: .25em;
  margin: 1.8em 0 .6em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
nav ul { list-style: none; padding: 8px 0; margin: 0; display: flex; flex-wrap: wrap;
  gap: .3em 1.4em; border-top: 1px solid #d0d7de; border-bottom: 1px solid #d0d7de; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; font-size: .86em; margin: .4em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.differs td { background: #fff8c5; }
.scroll { overflow-x: auto; max-width: 100%; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 10px 12px; overflow-x: auto;
  font-size: .82em; max-height: 40em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
details { margin: .3em 0; } summary { cursor: pointer; }
img { max-width: 100%; height: auto; display: block; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr));
  gap: 14px 18px; }
.figures.wide { grid-template-columns: 1fr; }
figure { margin: 0; } figcaption { font-size: .85em; color: #59636e; margin-top: 2px; }
.note { color: #7d4e00; } .muted { color: #59636e; } .nowrap { white-space: nowrap; }
ul.notes li { color: #7d4e00; }
footer { margin-top: 3em; font-size: .85em; color: #59636e; }
"""


class ReportError(PlaitError, ValueError):
    """A path given to ``plait report`` is not a run directory."""


@dataclass
class RunData:
    """What one run directory holds, as far as it could be read; ``notes`` says what
    could not (each becomes a line on the page)."""

    path: Path
    name: str
    notes: list[str] = field(default_factory=list)
    config_text: str | None = None
    config: dict | None = None
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    evals: list[dict] | None = None
    bias: list[dict] | None = None
    pngs: list[Path] = field(default_factory=list)
    version: str | None = None


# --------------------------------------------------------------------------- reading


def load_run(path: Path | str, name: str | None = None) -> RunData:
    """Read a run directory. Raises :class:`ReportError` when ``path`` is not one (it holds
    none of config.yaml, metrics.jsonl, summary.json); any file that cannot be read is
    left out with a note instead."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{str(path)!r} is not a directory; plait report takes run "
                          "directories (run.dir of plait train, sft, rm or dpo)")
    if not any((path / file).is_file() for file in RUN_FILES):
        raise ReportError(f"{str(path)!r} is not a plait run directory: it holds none of "
                          f"{', '.join(RUN_FILES)}")
    run = RunData(path=path, name=name or path.resolve().name or str(path))
    run.config_text = _read_text(run, "config.yaml")
    if run.config_text is not None:
        run.config = _parse_yaml(run, run.config_text)
    run.summary = _read_json(run, "summary.json", dict)
    run.metrics = _read_metrics(run)
    run.timeline = _read_timeline(run)
    run.evals = _records(run, "eval_results.json", "suites")
    run.bias = _records(run, "bias_results.json", "conditions")
    marker = _read_json(run, ".plait-run", dict, quiet=True)
    run.version = str(marker["version"]) if marker and "version" in marker else None
    run.pngs = _pngs(path)
    return run


def _read_text(run: RunData, name: str) -> str | None:
    path = run.path / name
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        run.notes.append(f"{name} could not be read ({err})")
        return None


def _parse_yaml(run: RunData, text: str) -> dict | None:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        run.notes.append(f"config.yaml is not valid YAML ({_one_line(err)})")
        return None
    if not isinstance(value, dict):
        run.notes.append("config.yaml does not hold a mapping of settings")
        return None
    return value


def _read_json(run: RunData, name: str, kind: type, *, quiet: bool = False) -> Any:
    text = _read_text(run, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if not quiet:
            run.notes.append(f"{name} is not valid JSON ({err}); left out")
        return None
    if not isinstance(value, kind):
        if not quiet:
            run.notes.append(f"{name} holds a JSON {type(value).__name__}, not a "
                             f"{'list' if kind is list else 'object'}; left out")
        return None
    return value


def _read_metrics(run: RunData) -> list[dict]:
    """``read_metrics``' records; when a line in the middle is malformed (which it
    refuses), every readable line, with a note naming the others."""
    from plait.telemetry.metrics import METRICS_FILE, read_metrics

    path = run.path / METRICS_FILE
    if not path.is_file():
        return []
    try:
        return read_metrics(path)
    except ValueError:
        pass
    except (OSError, UnicodeDecodeError) as err:
        run.notes.append(f"{METRICS_FILE} could not be read ({err})")
        return []
    records, bad = _jsonl_records(_read_text(run, METRICS_FILE) or "", lambda record: (
        isinstance(record, dict) and isinstance(record.get("step"), int)))
    run.notes.append(f"{METRICS_FILE}: skipped {_count(len(bad), 'line')} that "
                     f"{'is' if len(bad) == 1 else 'are'} not a metrics record "
                     f"({_listed(bad)})")
    return records


def _read_timeline(run: RunData) -> list[dict]:
    """``timeline.jsonl``'s steps whose spans are ``[stage, start_s, end_s]``; the others
    are counted in a note."""
    text = _read_text(run, "timeline.jsonl")
    if text is None:
        return []
    steps, bad = _jsonl_records(text, _is_timeline_step)
    if bad:
        run.notes.append(f"timeline.jsonl: skipped {_count(len(bad), 'line')} that "
                         f"{'is' if len(bad) == 1 else 'are'} not a step's spans "
                         f"({_listed(bad)})")
    return steps


def _jsonl_records(text: str, accept: Callable[[Any], bool]) -> tuple[list, list[int]]:
    """The lines of ``text`` that parse as JSON and ``accept``, and the numbers of the
    other non-blank lines."""
    records, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if accept(record):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


def _is_timeline_step(record: Any) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return False
    spans = record.get("spans")
    return isinstance(spans, list) and all(
        isinstance(span, list) and len(span) == 3 and isinstance(span[0], str)
        and _is_number(span[1]) and _is_number(span[2]) for span in spans)


def _records(run: RunData, name: str, inner: str) -> list[dict] | None:
    """A JSON list of records each holding a mapping under ``inner`` (``suites`` of eval
    results, ``conditions`` of bias probes); other entries are skipped with a note."""
    records = _read_json(run, name, list)
    if records is None:
        return None
    kept = [r for r in records if isinstance(r, dict) and isinstance(r.get(inner), dict)
            and all(isinstance(v, dict) for v in r[inner].values())]
    if len(kept) < len(records):
        run.notes.append(f"{name}: skipped {_count(len(records) - len(kept), 'entry')} "
                         f"without a {inner!r} mapping of metrics")
    return kept


def _pngs(path: Path) -> list[Path]:
    """The run directory's top-level PNGs, the usual plots first (a ``.tmp-`` file is a
    plot being written)."""
    found = [p for p in path.glob("*.png") if p.is_file() and not p.name.startswith(".")
             and p.name not in _REPLOTTED]
    order = {name: i for i, name in enumerate(_PNG_FIRST)}
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))


# --------------------------------------------------------------------------- the page


def default_report_path(run_dirs: Sequence[Path | str]) -> Path:
    """``RUN_DIR/report.html`` for one run, ``./plait_report.html`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report.html"
    return Path.cwd() / "plait_report.html"


def write_report(run_dirs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Write the report of ``run_dirs`` to ``out`` (a file, or a directory to hold
    ``report.html``; default :func:`default_report_path`) atomically; returns its path.
    Raises :class:`ReportError` when a path is not a run directory."""
    page = render_report(run_dirs)
    path = default_report_path(run_dirs) if out is None else Path(out)
    if path.is_dir():
        path = path / "report.html"
    from plait.telemetry.summary import write_text_atomic

    write_text_atomic(path, page)
    # the temporary file it was renamed from is private (0600); a page is for sharing
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)
    return path


def render_report(run_dirs: Sequence[Path | str]) -> str:
    """The HTML page about ``run_dirs`` (see the module's description)."""
    if not run_dirs:
        raise ReportError("plait report needs at least one run directory")
    names = _run_names([Path(p) for p in run_dirs])
    runs = [load_run(path, name) for path, name in zip(run_dirs, names, strict=True)]
    builders = {"summary": _summary_section, "config": _config_section,
                "curves": _curves_section, "timeline": _timeline_section,
                "eval-suites": _eval_section, "bias-probes": _bias_section,
                "plots": _plots_section}
    sections = []
    for section_id, heading in SECTIONS:
        try:
            body = builders[section_id](runs)
        except Exception as err:  # one bad file must not cost the rest of the page
            body = _note(f"this section could not be drawn: {type(err).__name__}: {err}")
        if body is not None:
            sections.append((section_id, heading, body))
    notes = _notes(runs)
    if notes:
        sections.insert(0, ("notes", "Notes", notes))
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    parts = [_head(f"plait report: {title}"), "<main>", _header(runs, title), _nav(sections)]
    parts += [f'<section id="{section_id}">\n<h2>{_e(heading)}</h2>\n{body}\n</section>'
              for section_id, heading, body in sections]
    parts.append(f"<footer>Written {_e(time.strftime('%Y-%m-%d %H:%M'))} by plait "
                 f"{_e(__version__)} (<code>plait report</code>).</footer>")
    parts.append("</main>\n</body>\n</html>\n")
    return "\n".join(parts)


def _run_names(paths: list[Path]) -> list[str]:
    """Each run's directory name; the parent's too where two share one, then a number."""
    names = [p.resolve().name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{name} #{i + 1}" for i, name in enumerate(names)]
    return names


def _head(title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>")


def _header(runs: list[RunData], title: str) -> str:
    rows = [[_e(run.name), f"<code>{_e(run.path.resolve())}</code>", _e(_algo(run)),
             _e(_task(run)), _nowrap(_started(run)), _cell(_steps(run)), _e(_status(run)),
             _e(run.version or "—")] for run in runs]
    table = _html_table(["run", "directory", "algo", "task", "started", "steps", "state",
                         "written by plait"], rows)
    return (f'<header id="header">\n<h1>plait report: {_e(title)}</h1>\n{table}\n'
            "</header>")


def _nav(sections: list[tuple[str, str, str]]) -> str:
    items = "".join(f'<li><a href="#{sid}">{_e(heading)}</a></li>'
                    for sid, heading, _ in sections)
    return f'<nav id="nav"><ul>{items}</ul></nav>'


def _notes(runs: list[RunData]) -> str:
    notes = [(run.name, note) for run in runs for note in run.notes]
    if not notes:
        return ""
    items = "".join(f"<li>{_e(name)}: {_e(note)}</li>" for name, note in notes)
    return f'<ul class="notes">{items}</ul>'


def _algo(run: RunData) -> str:
    """What trained: plait sft / rm / dpo (from their summary's or metrics' keys), else
    the RL algorithm of the config."""
    summary, config = run.summary or {}, run.config or {}
    keys = {key for record in run.metrics[:3] for key in record}
    if "sft_model_dir" in summary or "loss/sft" in keys:
        return "sft"
    if "reward_model_dir" in summary or "loss/pairwise" in keys:
        return f"reward model ({_lookup(config, 'rm.objective') or 'reward'})"
    if "dpo_model_dir" in summary or "loss/preference" in keys:
        return f"dpo ({_lookup(config, 'dpo.loss') or 'sigmoid'})"
    return str(summary.get("algo") or _lookup(config, "algo.name") or "—")


def _task(run: RunData) -> str:
    config = run.config or {}
    task, path = _lookup(config, "data.task"), _lookup(config, "data.train_path")
    return str(path or task or "—")


def _started(run: RunData) -> str:
    """The first metrics record's time, else when config.yaml was written."""
    stamp = next((r["time"] for r in run.metrics if _is_number(r.get("time"))), None)
    if stamp is None and (run.path / "config.yaml").is_file():
        stamp = (run.path / "config.yaml").stat().st_mtime
    return _date(stamp)


def _steps(run: RunData) -> Any:
    if run.summary and _is_number(run.summary.get("steps")):
        return run.summary["steps"]
    return max((r["step"] for r in run.metrics), default=None)


def _status(run: RunData) -> str:
    return "finished" if run.summary is not None else "no summary.json (running or stopped)"


# --------------------------------------------------------------------------- sections


def _summary_section(runs: list[RunData]) -> str:
    with_summary = [run for run in runs if run.summary is not None]
    if not with_summary:
        return _note("summary.json not recorded (the run is still going, or stopped early).")
    flat = [flatten(run.summary) if run.summary is not None else {} for run in runs]
    body = _comparison_table(runs, flat, "key")
    missing = [run.name for run in runs if run.summary is None]
    if missing:
        body += _note(f"no summary.json in {', '.join(missing)}.")
    return body


def _config_section(runs: list[RunData]) -> str:
    parts = []
    configs = [run for run in runs if run.config is not None]
    if len(runs) > 1:
        if len(configs) < 2:
            parts.append(_note("fewer than two runs have a readable config.yaml: no keys "
                               "to compare."))
        else:
            flat = [flatten(run.config) if run.config is not None else {} for run in runs]
            differing = _differing(flat)
            if differing:
                parts.append("<h3>Keys that differ</h3>")
                parts.append(_comparison_table(runs, [{k: f[k] for k in differing if k in f}
                                                      for f in flat], "key", mark=False))
            else:
                parts.append("<p>The runs' configs are identical.</p>")
    for run in runs:
        if run.config_text is None:
            parts.append(_note(f"{run.name}: config.yaml not recorded."))
            continue
        label = "config.yaml" if len(runs) == 1 else f"{run.name}: config.yaml"
        parts.append(f"<details><summary>{_e(label)}</summary><pre>{_e(run.config_text)}"
                     "</pre></details>")
    return "\n".join(parts)


def _curves_section(runs: list[RunData]) -> str:
    if not any(run.metrics for run in runs):
        return _note("metrics.jsonl not recorded.")
    keys = _numeric_keys(runs)
    groups: dict[str, list[str]] = {title: [] for title, _ in _CURVE_GROUPS}
    for key in keys:
        if _suite_key(key) is not None:
            continue
        title = next((t for t, belongs in _CURVE_GROUPS if belongs(key)), None)
        if title is not None:
            groups[title].append(key)
    figures = _curve_figures(runs, [(t, k) for t, k in groups.items() if k])
    if not figures:
        return _note("metrics.jsonl holds no reward, accuracy, KL, entropy, length or loss "
                     "metrics.")
    return _figures(figures, wide=False)


def _timeline_section(runs: list[RunData]) -> str | None:
    timed = [run for run in runs if run.timeline]
    if not timed:
        return None
    from plait.telemetry.plots import plot_stage_timeline

    parts = [_stage_table(timed)]
    figures = []
    for run in timed:
        shown = run.timeline[-_TIMELINE_STEPS:]
        title = (f"{run.name}: " if len(runs) > 1 else "") + \
            f"stage timeline (last {len(shown)} of {len(run.timeline)} steps)"
        buffer = io.BytesIO()
        plot_stage_timeline(shown, buffer, title=title)
        figures.append((title, buffer.getvalue()))
    parts.append(_figures(figures, wide=True))
    missing = [run.name for run in runs if not run.timeline]
    if missing:
        parts.append(_note(f"timeline.jsonl not recorded in {', '.join(missing)}."))
    return "\n".join(parts)


def _stage_table(runs: list[RunData]) -> str:
    """Mean seconds per step spent in each stage (spans summed; stages may overlap, so
    shares can add up past 100%)."""
    stages: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for run in runs:
        totals: dict[str, float] = {}
        wall = 0.0
        for record in run.timeline:
            wall += max((end for _, _, end in record["spans"]), default=0.0)
            for name, start, end in record["spans"]:
                totals[name] = totals.get(name, 0.0) + max(end - start, 0.0)
                if name not in stages:
                    stages.append(name)
        for name, total in totals.items():
            mean = total / len(run.timeline)
            share = f" ({100 * total / wall:.0f}%)" if wall > 0 else ""
            cells[run.name, name] = f"{_seconds(mean)}{share}"
    header = ["stage", *(f"{run.name}: per step" if len(runs) > 1 else "per step (share)"
                         for run in runs)]
    rows = [[_e(stage), *(_cell(cells.get((run.name, stage), "—"), num=True) for run in runs)]
            for stage in stages]
    return (f"<p class=\"muted\">Mean time per step in each stage over "
            f"{'each run' if len(runs) > 1 else 'the run'}'s recorded steps; stages overlap "
            "(rewards are scored while generation runs), so shares need not add up to 100%."
            f"</p>\n{_html_table(header, rows)}")


def _eval_section(runs: list[RunData]) -> str | None:
    keys = [key for key in _numeric_keys(runs) if _suite_key(key) is not None]
    has_results = any(run.evals for run in runs)
    if not keys and not has_results:
        return None
    parts = []
    for suite, table in _suite_tables(runs).items():
        parts.append(f"<h3>{_e(suite)}</h3>")
        parts.append(table)
    if not has_results:
        parts.append(_note("eval_results.json not recorded (plait eval writes it)."))
    suites: dict[str, list[str]] = {}
    for key in keys:
        suite, metric = _suite_key(key)
        if _SUITE_CURVE.match(metric):
            suites.setdefault(suite, []).append(key)
    if suites:
        parts.append("<h3>During training</h3>")
        ordered = [(f"eval set {suite}", sorted(ks, key=lambda k: _metric_order(k.split("/")[-1])))
                   for suite, ks in suites.items()]
        parts.append(_figures(_curve_figures(runs, ordered, label=_suite_label),
                              wide=False))
    return "\n".join(parts)


def _suite_tables(runs: list[RunData]) -> dict[str, str]:
    """One table per eval set: a row per record (model, step), a column per metric."""
    rows_of: dict[str, list[tuple[RunData, dict, dict]]] = {}
    for run in runs:
        for record in run.evals or ():
            for suite, metrics in record["suites"].items():
                rows_of.setdefault(str(suite), []).append((run, record, metrics))
    tables = {}
    for suite, rows in rows_of.items():
        metrics = sorted({k for _, _, m in rows for k, v in m.items() if _is_number(v)},
                         key=_metric_order)
        # the checkpoint column only where it says more than the model's path
        checkpoints = any(r.get("checkpoint") and not str(r.get("model", "")).startswith(
            str(r["checkpoint"])) for _, r, _ in rows)
        header = (["run"] if len(runs) > 1 else []) + ["model", "step"] \
            + (["checkpoint"] if checkpoints else []) + ["time", *metrics]
        body = [([_e(run.name)] if len(runs) > 1 else [])
                + [_path(_inside(run, record.get("model"))), _cell(record.get("step"))]
                + ([_path(_inside(run, record.get("checkpoint")))] if checkpoints else [])
                + [_nowrap(_date(record.get("time")))]
                + [_cell(values.get(metric), num=True, digits=4) for metric in metrics]
                for run, record, values in rows]
        tables[suite] = _html_table(header, body)
    return tables


def _bias_section(runs: list[RunData]) -> str | None:
    records = [(run, record) for run in runs for record in run.bias or ()]
    if not records:
        return None
    labels = _bias_labels(records, several_runs=len(runs) > 1)
    conditions: list[str] = []
    metrics: list[str] = []
    for _, record in records:
        for condition, values in record["conditions"].items():
            conditions += [condition] if condition not in conditions else []
            metrics += [k for k, v in values.items() if _is_number(v) and k not in metrics]
    # a record's label names its model (the model's path and the time show on hover)
    header = ["label", "condition", *metrics]
    rows = [[f'<span title="{_e(_inside(run, record.get("model")))}, '
             f'{_e(_date(record.get("time")))}">{_e(label)}</span>', _nowrap(condition),
             *(_cell(values.get(metric), num=True, digits=4) for metric in metrics)]
            for (run, record), label in zip(records, labels, strict=True)
            for condition, values in record["conditions"].items()]
    parts = [_html_table(header, rows)]
    scores = [m for m in metrics if "bias" in m or "correlation" in m] or \
        [m for m in metrics if m != "num_items"]
    if scores:
        png = _bias_chart(records, labels, conditions, scores)
        parts.append(_figures([("bias scores by condition", png)], wide=True))
    return "\n".join(parts)


def _bias_labels(records: list[tuple[RunData, dict]], *, several_runs: bool) -> list[str]:
    """A distinct name per record: its label (else model), the run's name with several
    runs, a number where two records still share one."""
    names = [str(record.get("label") or record.get("model") or "?") for _, record in records]
    if several_runs:
        names = [f"{run.name}: {name}" for (run, _), name in zip(records, names, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def _bias_chart(records: list[tuple[RunData, dict]], labels: list[str], conditions: list[str],
                scores: list[str]) -> bytes:
    """A panel per score: a group of bars per condition, a colour per model label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(len(scores), 3)
    rows = math.ceil(len(scores) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    width = 0.8 / max(len(labels), 1)
    for axis, score in zip(axes, scores, strict=False):
        for i, ((_, record), label) in enumerate(zip(records, labels, strict=True)):
            xs, heights = [], []
            for c, condition in enumerate(conditions):
                value = record["conditions"].get(condition, {}).get(score)
                if _is_number(value) and math.isfinite(value):
                    xs.append(c - 0.4 + width * (i + 0.5))
                    heights.append(float(value))
            axis.bar(xs, heights, width=width * 0.92, color=f"C{i % 10}", label=label)
        axis.axhline(0.0, color="0.4", linewidth=0.8)
        axis.set_xticks(range(len(conditions)), conditions)
        axis.set_title(score, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    for axis in axes[len(scores):]:
        axis.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4),
                  fontsize="small")
    return _png(figure)


def _plots_section(runs: list[RunData]) -> str | None:
    if not any(run.pngs for run in runs):
        return None
    parts = []
    for run in runs:
        if not run.pngs:
            continue
        if len(runs) > 1:
            parts.append(f"<h3>{_e(run.name)}</h3>")
        figures = []
        for path in run.pngs:
            data = _png_file(run, path)
            if data is not None:
                figures.append((path.name, data))
        parts.append(_figures(figures, wide=True, captions=True))
    return "\n".join(parts)


def _png_file(run: RunData, path: Path) -> bytes | None:
    try:
        if path.stat().st_size > _MAX_PNG_BYTES:
            run.notes.append(f"{path.name} is over {_MAX_PNG_BYTES >> 20} MiB; not embedded")
            return None
        data = path.read_bytes()
    except OSError as err:
        run.notes.append(f"{path.name} could not be read ({err})")
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        run.notes.append(f"{path.name} is not a PNG image; not embedded")
        return None
    return data


# --------------------------------------------------------------------------- curves


def _numeric_keys(runs: list[RunData]) -> list[str]:
    """Metric keys with at least one finite number in some run, in order of appearance."""
    keys: dict[str, None] = {}
    for run in runs:
        for record in run.metrics:
            for key, value in record.items():
                if key not in ("step", "time") and key not in keys and _is_number(value) \
                        and math.isfinite(value):
                    keys[key] = None
    return list(keys)


def _suite_key(key: str) -> tuple[str, str] | None:
    """``(set, metric)`` of an eval-set metric logged as ``eval/SET/METRIC``; None for
    other keys (held-out metrics per source look alike: ``eval/accuracy/SOURCE``)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "eval" and parts[1] not in _HELD_OUT_PREFIXES:
        return parts[1], parts[2]
    return None


def _suite_label(key: str) -> str:
    return key.split("/")[-1]


def _metric_order(metric: str) -> tuple:
    """Eval-set metrics in reading order: prompts, greedy, pass@K, maj@K by K, the rest."""
    fixed = {"num_prompts": 0, "greedy_accuracy": 1}
    if metric in fixed:
        return (fixed[metric], 0, metric)
    found = re.match(r"^(pass|maj)@(\d+)$", metric)
    if found:
        return (2 if found.group(1) == "pass" else 3, int(found.group(2)), metric)
    return (4, 0, metric)


def _curve_figures(runs: list[RunData], groups: list[tuple[str, list[str]]], *,
                   label: Callable[[str], str] = str) -> list[tuple[str, bytes]]:
    """A plot per group of metric keys with one run (a line per key), per key with several
    (a line per run, each run in the same colour throughout)."""
    from plait.telemetry.plots import _series

    panels = []
    if len(runs) == 1:
        for title, keys in groups:
            panels.append((title, [(label(key), *_series(runs[0].metrics, key), f"C{i % 10}")
                                   for i, key in enumerate(keys)]))
    else:
        for key in (key for _, keys in groups for key in keys):
            panels.append((key, [(run.name, *_series(run.metrics, key), f"C{i % 10}")
                                 for i, run in enumerate(runs)]))
    panels = [(title, [line for line in lines if line[1]]) for title, lines in panels]
    return [(title, _panel_png(title, lines)) for title, lines in panels if lines]


def _panel_png(title: str, lines: list[tuple]) -> bytes:
    """One panel of ``(label, steps, values, colour)`` lines against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.0, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    longest = max(len(steps) for _, steps, _, _ in lines)
    for name, steps, values, color in lines:
        _draw_line(axis, name, steps, values, color, longest)
    axis.set_title(title, fontsize=11)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="best")
    return _png(figure)


def _draw_line(axis: Any, name: str, steps: list[int], values: list[float], color: str,
               longest: int) -> None:
    """Short or sparse series (eval metrics) with markers; long noisy ones faint, with a
    trailing mean over them."""
    from plait.telemetry.plots import _moving_average

    if len(steps) <= _MARKER_MAX_POINTS or len(steps) < longest / 2:
        axis.plot(steps, values, label=name, color=color, marker="o", markersize=3.5,
                  linewidth=1.2)
        return
    window = max(5, len(steps) // 30)
    axis.plot(steps, values, color=color, linewidth=0.8, alpha=0.3)
    axis.plot(steps, _moving_average(values, window), color=color, linewidth=1.6,
              label=f"{name} (mean of {window})")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


# --------------------------------------------------------------------------- html


def _e(value: Any) -> str:
    """``value`` as text safe in HTML content and quoted attributes."""
    return html.escape(str(value), quote=True)


def _path(text: str) -> str:
    """A path, escaped, that may break after each ``/``."""
    return _e(text).replace("/", "/<wbr>")


def _nowrap(text: str) -> str:
    return f'<span class="nowrap">{_e(text)}</span>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _show(value: Any, digits: int = 6) -> str:
    """A value as the page shows it (not yet escaped); floats to ``digits`` significant
    digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


class _Num(str):
    """A table cell's escaped text that is a number (right-aligned)."""


def _cell(value: Any, *, num: bool | None = None, digits: int = 6) -> str:
    """A table cell's escaped text; a :class:`_Num` when ``value`` is a number (or ``num``)."""
    numeric = _is_number(value) if num is None else num
    text = _e(_show(value, digits))
    return _Num(text) if numeric else text


def _html_table(header: list[str], rows: Iterable[list[str]],
                row_classes: Sequence[str] | None = None) -> str:
    """A table of already-escaped cells (:class:`_Num` cells right-aligned)."""
    # long metric names may break after an underscore
    head = "".join(f"<th>{_e(h).replace('_', '_<wbr>')}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if isinstance(c, _Num) else f"<td>{c}</td>"
                        for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return (f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>")


def _comparison_table(runs: list[RunData], flat: list[dict[str, Any]], key_header: str, *,
                      mark: bool = True) -> str:
    """Keys down, one value column per run; with several runs, rows whose values differ
    are highlighted (``mark``)."""
    keys: dict[str, None] = {}
    for values in flat:
        keys.update(dict.fromkeys(values))
    header = [key_header] + (["value"] if len(runs) == 1 else [run.name for run in runs])
    rows, classes = [], []
    for key in keys:
        cells = [values.get(key, _MISSING) for values in flat]
        rows.append([f"<code>{_e(key)}</code>",
                     *(_e("(absent)") if c is _MISSING else _cell(c) for c in cells)])
        differs = len({_show(c) if c is not _MISSING else _MISSING for c in cells}) > 1
        classes.append("differs" if mark and len(runs) > 1 and differs else "")
    return _html_table(header, rows, classes)


_MISSING = object()


def _differing(flat: list[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every run (absent counts as a value)."""
    keys: dict[str, None] = {}
    for values in flat:
        keys.update(dict.fromkeys(values))
    return [key for key in keys
            if len({_show(v[key]) if key in v else "\x00absent" for v in flat}) > 1]


def _figures(figures: list[tuple[str, bytes]], *, wide: bool, captions: bool = False) -> str:
    """Images as data URIs, ``alt`` (and with ``captions`` a caption) from their names."""
    items = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
        f'alt="{_e(caption)}">'
        + (f"<figcaption>{_e(caption)}</figcaption>" if captions else "") + "</figure>"
        for caption, png in figures)
    return f'<div class="figures{" wide" if wide else ""}">{items}</div>'


# --------------------------------------------------------------------------- small helpers


def _inside(run: RunData, path: Any) -> str:
    """A path as written, or relative to the run directory when inside it."""
    if not path:
        return "—"
    for root in (run.path, run.path.resolve()):
        try:
            return str(Path(str(path)).relative_to(root))
        except ValueError:
            continue
    return str(path)


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _date(stamp: Any) -> str:
    if not _is_number(stamp) or not math.isfinite(stamp):
        return "—"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))
    except (OverflowError, OSError, ValueError):
        return "—"


def _seconds(value: float) -> str:
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"


def _count(n: int, noun: str) -> str:
    plural = {"entry": "entries"}.get(noun, f"{noun}s")
    return f"{n} {noun if n == 1 else plural}"


def _listed(numbers: list[int], most: int = 5) -> str:
    """``line 3`` / ``lines 3, 7 and 2 more``."""
    shown = ", ".join(str(n) for n in numbers[:most])
    more = f" and {len(numbers) - most} more" if len(numbers) > most else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
