"""The run directory: what plait may use as one, what it may delete, and whether a run
may resume with the config it is given. Import-light (no torch), so the launcher can
check a run directory before it starts anything.

A run directory is plait's when it holds the marker file :data:`RUN_MARKER` (written when
a run is created), or, for runs made before the marker, a plait ``config.yaml`` beside
``checkpoints/`` or ``metrics.jsonl``. ``run.overwrite`` deletes only such a directory, and
never the filesystem root, the home directory, the working directory or one holding it,
nor one holding anything plait does not write there (a user's file, another run) or an
input of the job (a model, data or reward file inside it), nor while a launcher runs a job
in it. Without it, plait starts in a new or empty directory, its own run, or one holding
only what plait writes; never among a user's files, nor beside a running job.

A launcher keeps its ranks' config and heartbeats in ``logs/.plait-job-<host>-<pid>/``:
named by host, so that on a shared filesystem a launcher judges only its own host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from dataclasses import fields
from pathlib import Path

import yaml

from plait import __version__
from plait.config import BiasConfig, Config, ConfigError, config_to_dict, describe

RUN_MARKER = ".plait-run"
JOB_DIR_PREFIX = ".plait-job-"  # logs/.plait-job-<host>-<launcher pid>: rank config, heartbeats
# what plait writes at the top of a run directory (the launcher adds logs/, the dynamic
# placement placement.jsonl; atomic writes leave ".tmp-*" files for an instant)
RUN_ENTRIES = frozenset({
    RUN_MARKER, "config.yaml", "metrics.jsonl", "metrics.png", "timeline.jsonl",
    "timeline.png", "summary.json", "placement.jsonl", "checkpoints", "tensorboard", "sft",
    "sft_model", "tiny_model", "logs", "reward_model", "reliability.png", "scores.png",
    "ema_model", "dpo_model", "eval_results.json", "bias_results.json", "bias.png",
    "eval_results.json.bad", "bias_results.json.bad", "report.html", "wandb", "mlruns",
    "trackers.json"})

# Settings a run may resume with after they changed: where and how fast the job runs,
# how long, how often it evaluates, saves and logs, not what it trains or how it
# updates. Every other key (model, data, rewards, algorithm, optimizer, sampling, seed,
# SFT, eval generation) must match the checkpoint's config, or the resume is refused.
RESUME_SAFE_KEYS = frozenset({
    # outputs and how they are shown
    "run.dir", "run.resume", "run.overwrite", "run.tensorboard", "run.report_to",
    "run.progress",
    # how long it runs; evaluation, checkpoint and failure cadence
    "train.steps", "train.eval_every", "train.save_every", "train.keep_last",
    "train.nan_policy", "train.max_nan_skips", "rm.steps", "rm.eval_every", "dpo.steps",
    "dpo.eval_every", "sft.steps", "sft.eval_every", "sft.packing",
    # what is evaluated besides training (eval sets, bias probes)
    "eval.suites", *(f"eval.bias.{f.name}" for f in fields(BiasConfig)),
    # devices, threads and kernels: the same computation (up to float rounding)
    "train.device", "train.threads", "train.deterministic", "train.compile",
    "model.attn_implementation", "optim.implementation", "rollout.batch_size", "rollout.release_kv_cache",
    "rollout.prefill_tokens", "rollout.sync_every", "rollout.compile", "rollout.fuse_forwards",
    "algo.micro_batch_size", "algo.micro_batch_tokens", "algo.share_prompt_forward",
    "algo.pack_group_tokens", "algo.skip_zero_advantage",
    # time limits and when a stuck reward stops the job
    "reward.timeout_s", "reward.import_timeout_s", "reward.max_consecutive_timeouts",
    # processes and placement: a checkpoint resumes on any rank count and layout
    "runtime.num_ranks", "runtime.launcher", "runtime.controller", "runtime.placement",
    "runtime.rollout_workers", "runtime.data_parallel", "runtime.stream_groups",
    "runtime.weight_bucket_mb", "runtime.backend", "runtime.heartbeat_timeout_s",
    "runtime.progress_timeout_s", "runtime.collective_timeout_s", "runtime.master_port",
    "runtime.ray_address", "runtime.cpus_per_rank", "runtime.gpus_per_rank",
})

# tiny_model/config.json names of the model.tiny settings its shape is built from
_TINY_SHAPE = {"arch": "model_type", "hidden_size": "hidden_size",
               "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
               "max_position_embeddings": "max_position_embeddings"}
_ABSENT = object()


def _read_yaml_mapping(path: Path) -> dict | None:
    """The mapping in a YAML file, or None when it is missing, unreadable or not one."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def recorded_config(run_dir: Path) -> dict | None:
    """The config a run directory's config.yaml records (a plain nested dict), or None
    when it holds none that looks like a plait config (every top-level key a config
    section, the run, model and algo sections among them)."""
    tree = _read_yaml_mapping(Path(run_dir) / "config.yaml")
    sections = {f.name for f in fields(Config)}
    if tree is None or not set(tree) <= sections or not {"run", "model", "algo"} <= set(tree):
        return None
    return tree


def is_plait_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run directory plait made: it holds plait's marker file,
    or (runs from before the marker) a plait config.yaml beside checkpoints/ or
    metrics.jsonl."""
    run_dir = Path(run_dir)
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and "plait_run" in marker:
        return True
    has_outputs = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()
    return has_outputs and recorded_config(run_dir) is not None


def _protected_reason(path: Path) -> str | None:
    """Why ``path`` must never be deleted (the filesystem root, the home directory, the
    working directory or one holding it), or None."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the filesystem root"
    with contextlib.suppress(RuntimeError):  # no home directory to protect
        if resolved == Path.home().resolve():
            return "the home directory"
    if resolved == cwd:
        return "the working directory"
    if resolved in cwd.parents:
        return "a directory holding the working directory"
    return None


def _foreign_entries(run_dir: Path) -> list[str]:
    """The names at the top of ``run_dir`` that plait does not write."""
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in RUN_ENTRIES and not p.name.startswith(".tmp-"))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _input_paths(config: Config) -> list[tuple[str, str]]:
    """``(key, path)`` of every file or directory the job reads: its models, data and
    reward files (``path/to/file.py:function``)."""
    model, data = config.model, config.data
    inputs = [("model.path", None if model.path == "tiny" else model.path),
              ("model.ref_path", model.ref_path), ("model.critic_path", model.critic_path),
              ("data.train_path", data.train_path), ("data.eval_path", data.eval_path)]
    for index, function in enumerate(config.reward.functions):
        if function.model is not None or function.judge is not None:
            kind = "model" if function.model is not None else "judge"
            inputs.append((f"reward.functions[{index}].{kind}", getattr(function, kind)))
            inputs.append((f"reward.functions[{index}].template", function.template))
            continue
        spec = function.spec
        target = spec.rsplit(":", 1)[0] if ":" in spec else ""
        if target.endswith(".py") or "/" in target or "\\" in target:
            inputs.append((f"reward.functions[{index}].fn", target))
    return [(key, path) for key, path in inputs if path]


def _inputs_inside(config: Config, run_dir: Path) -> list[str]:
    """``key 'path'`` for each input of the job that lies inside ``run_dir``."""
    root = run_dir.resolve()
    inside = []
    for key, path in _input_paths(config):
        resolved = Path(path).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            inside.append(f"{key} {path!r}")
    return inside


def _check_removable(config: Config, run_dir: Path) -> None:
    """Refuse ``run.overwrite`` on a directory that is not plait's own run, that must
    never be deleted, or that holds what plait did not write or an input of this job."""
    shown = repr(str(run_dir))
    if run_dir.is_symlink():
        raise ConfigError(f"run.overwrite=true: run.dir {shown} is a symbolic link; plait "
                          "does not delete through links: point run.dir at the directory itself")
    reason = _protected_reason(run_dir)
    if reason is not None:
        raise ConfigError(f"run.overwrite=true would delete run.dir {shown}, which is {reason}; "
                          "plait never deletes it: choose another run.dir")
    if any(run_dir.iterdir()) and not is_plait_run(run_dir):
        raise ConfigError(f"run.overwrite=true deletes only plait run directories, and run.dir "
                          f"{shown} is not one (no {RUN_MARKER} marker, nor a plait config.yaml "
                          "beside checkpoints/ or metrics.jsonl): delete it yourself if you "
                          "mean to, or choose another run.dir")
    kept = [f"files plait did not write ({_listed(names)})"
            for names in [_foreign_entries(run_dir)] if names]
    kept += [f"inputs of this job ({_listed(inputs)})"
             for inputs in [_inputs_inside(config, run_dir)] if inputs]
    if kept:
        raise ConfigError(f"run.overwrite=true would delete run.dir {shown}, which holds "
                          f"{' and '.join(kept)}: move them out of it, or choose another "
                          "run.dir")


# ------------------------------------------------------------------ launchers' job directories


def job_dir(run_dir: Path, pid: int | None = None) -> Path:
    """The job directory of the launcher ``pid`` (default: this process) on this host."""
    pid = os.getpid() if pid is None else pid
    return Path(run_dir) / "logs" / f"{JOB_DIR_PREFIX}{socket.gethostname()}-{pid}"


def job_dirs(run_dir: Path) -> list[tuple[Path, str, int]]:
    """``(path, host, launcher pid)`` of each job directory under ``run_dir/logs``; one
    named by pid alone (made before the host was recorded) counts as this host's."""
    found = []
    for path in sorted((Path(run_dir) / "logs").glob(JOB_DIR_PREFIX + "*")):
        host, _, pid = path.name[len(JOB_DIR_PREFIX):].rpartition("-")
        if pid.isdigit() and path.is_dir():
            found.append((path, host or socket.gethostname(), int(pid)))
    return found


def launcher_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_job_dir() -> Path | None:
    """The job directory of the launcher that started this process (a rank), if any."""
    heartbeats = os.environ.get("PLAIT_HEARTBEAT_DIR")
    return Path(heartbeats).resolve().parent if heartbeats else None


def _check_no_running_job(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start while a launcher of this host runs a job in ``run_dir`` (not the
    one that started this process); with ``run.overwrite``, also while one of another
    host may (this host cannot tell whether it is finished)."""
    here, own = socket.gethostname(), _own_job_dir()
    for path, host, pid in job_dirs(run_dir):
        if path.resolve() == own or (pid == os.getpid() and host == here):
            continue
        if host == here and launcher_alive(pid):
            raise ConfigError(f"a plait job (pid {pid} on {host}) is running in this run "
                              f"directory {str(run_dir)!r}: wait for it, stop it, or choose "
                              f"another run.dir (if no plait job runs there, delete {path})")
        if host != here and overwrite:
            raise ConfigError(f"run.overwrite=true would delete the job directory {path} of a "
                              f"plait launcher on another host ({host}, pid {pid}), which this "
                              "host cannot tell is finished: once it is, delete that directory, "
                              "or choose another run.dir")


def check_run_dir(config: Config) -> None:
    """Refuse a ``run.dir`` plait must not use, before anything touches it: a file; one
    in which a launcher still runs a job; with ``run.overwrite``, a directory that is not
    a plait run (see :func:`is_plait_run`), that must never be deleted, or that holds
    what plait did not write or an input of this job; without it, a directory that is not
    a plait run and holds files plait does not write (plait's files would land among the
    user's). Raises :class:`ConfigError`."""
    run_dir = Path(config.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {str(run_dir)!r} is a file, not a directory: choose a "
                          "directory for the run's outputs")
    if not run_dir.is_dir():
        return
    try:
        _check_no_running_job(run_dir, config.run.overwrite)
        if config.run.overwrite:
            _check_removable(config, run_dir)
            return
        foreign = _foreign_entries(run_dir)
    except PermissionError as err:
        raise ConfigError(f"run.dir {str(run_dir)!r} cannot be read ({err.strerror}): fix its "
                          "permissions or choose another run.dir") from None
    if foreign and not is_plait_run(run_dir):
        raise ConfigError(f"run.dir {str(run_dir)!r} is not a plait run directory and already "
                          f"holds other files ({_listed(foreign)}): choose a new or empty "
                          "run.dir")


def mark_run_dir(run_dir: Path) -> None:
    """Mark ``run_dir`` (existing) as a plait run, what lets ``run.overwrite`` delete it
    later: once, when it starts (by the launcher before any rank, or by the single
    process); a marked directory is left as it is. Written atomically."""
    marker = Path(run_dir) / RUN_MARKER
    if marker.exists():
        return
    text = json.dumps({"plait_run": 1, "version": __version__})
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, marker)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lookup(tree, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def config_changes(recorded: dict, config: Config) -> list[tuple[str, object, object]]:
    """``(key, recorded value, value now)`` for every config key whose value differs;
    keys the record lacks (made before they existed) count as their defaults."""
    now, defaults = config_to_dict(config), config_to_dict(Config())
    changes = []
    for key, *_ in describe():
        before = _lookup(recorded, key)
        if before is _ABSENT:
            before = _lookup(defaults, key)
        after = _lookup(now, key)
        if before != after:
            changes.append((key, before, after))
    return changes


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def describe_changes(changes) -> str:
    """``key old -> new`` for each change, comma separated."""
    return ", ".join(f"{key} {_show(before)} -> {_show(after)}" for key, before, after in changes)


def built_tiny_model(run_dir: Path) -> dict | None:
    """The ``model.tiny`` settings the tiny model under ``run_dir`` was built with: its
    shape from its config.json, its seed from the run's config.yaml (when recorded);
    None when no tiny model was built there."""
    try:
        built = json.loads((Path(run_dir) / "tiny_model" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(built, dict):
        return None
    settings = {key: built.get(name) for key, name in _TINY_SHAPE.items()}
    recorded = recorded_config(run_dir)
    seed = _lookup(recorded, "model.tiny.seed") if recorded is not None else _ABSENT
    if seed is not _ABSENT and _lookup(recorded, "model.path") == "tiny":
        settings["seed"] = seed
    return settings
