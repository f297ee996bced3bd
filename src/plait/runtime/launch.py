"""The local launcher: ``plait train cfg.yaml runtime.num_ranks=N`` starts N rank
processes on this machine, watches them, and tears them all down.

- Each rank is ``python -m plait.runtime.worker`` in its own session (so its
  reward worker goes down with it), with ``PR_SET_PDEATHSIG`` so it dies with
  the launcher even when the launcher is SIGKILLed.
- Rank 0 shares the terminal (progress bar, messages); the other ranks write to
  ``<run.dir>/logs/rank<R>.log``.
- The launcher polls exit codes and heartbeats. The first rank to exit with an
  error, or whose heartbeat is older than ``runtime.heartbeat_timeout_s``, ends
  the job: every rank is stopped (SIGTERM, then SIGKILL), and
  :class:`RankFailure` names the rank, why, and its last message. Checkpoints
  are written atomically by rank 0, so the last one is intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plait.config import Config, dump_yaml
from plait.runtime.heartbeat import ProgressWatch, read_heartbeat

STARTUP_GRACE_S = 60.0   # added to the heartbeat timeout before a rank's first beat
STOP_GRACE_S = 5.0       # SIGTERM -> SIGKILL
# words of an error that is a symptom (a peer went away), not a rank's own failure
PEER_WORDS = ("connection", "closed by peer", "timed out", "gloo", "nccl", "broken pipe")


class RankFailure(RuntimeError):
    """A rank died, failed or hung; the job was stopped."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_job(config: Config) -> tuple[Config, Path]:
    """Settle the run directory once, before any rank starts: ``run.overwrite`` is done
    here (ranks must not delete each other's files) and turned off for the ranks."""
    run_dir = Path(config.run.dir)
    if config.run.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank_config = dataclasses.replace(config, run=dataclasses.replace(config.run,
                                                                      overwrite=False))
    return rank_config, run_dir


def world_size(config: Config) -> int:
    """Processes in the job: the trainer ranks, plus the rollout workers when apart."""
    runtime = config.runtime
    apart = runtime.placement in ("disaggregated", "partial")
    workers = runtime.rollout_workers if apart else 0
    return runtime.num_ranks + workers


def launch(config: Config) -> dict:
    """Run ``config`` on ``runtime.num_ranks`` ranks with its launcher; the summary."""
    if config.runtime.launcher == "ray":
        from plait.runtime.ray_launcher import launch_ray

        return launch_ray(config)
    return launch_local(config)


def launch_local(config: Config) -> dict:
    rank_config, run_dir = prepare_job(config)
    runtime = config.runtime
    work = Path(tempfile.mkdtemp(prefix="plait-job-"))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        config_path = work / "config.yaml"
        config_path.write_text(dump_yaml(rank_config))
        heartbeats = work / "heartbeats"
        heartbeats.mkdir()
        (run_dir / "logs").mkdir(exist_ok=True)
        port = runtime.master_port or free_port()
        world = world_size(config)
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "PLAIT_HEARTBEAT_DIR": str(heartbeats), "PLAIT_RANK_PROCESS": "1"}
            out = None
            if rank > 0:
                out = open(run_dir / "logs" / f"rank{rank}.log", "w")  # noqa: SIM115
                logs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "plait.runtime.worker", str(config_path)], env=env,
                stdout=out, stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                start_new_session=True))
        with _stop_on_signals(procs):
            _watch(procs, heartbeats, runtime.heartbeat_timeout_s, run_dir,
                   ProgressWatch(runtime.progress_timeout_s))
    finally:
        stop_all(procs)
        for handle in logs:
            handle.close()
        shutil.rmtree(work, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.is_file() else {}


def _watch(procs, heartbeats: Path, timeout_s: float, run_dir: Path,
           progress: ProgressWatch) -> None:
    """Poll until every rank exits 0; raise :class:`RankFailure` at the first that fails,
    stops beating, or beats without making progress."""
    started = time.time()
    finished = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            time.sleep(0.3)  # let near-simultaneous exits land, then pick the cause
            codes = [p.poll() for p in procs]
            failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
            raise RankFailure(_failure_message(procs, codes, heartbeats, run_dir,
                                               _first_cause(failed, codes, heartbeats)))
        if all(code == 0 for code in codes):
            return
        now = time.time()
        if codes[0] == 0:  # rank 0 wrote the results: the others only have to exit
            finished = finished or now
            if now - finished > timeout_s:
                late = [r for r, code in enumerate(codes) if code is None]
                print(f"plait: warning: rank 0 finished but rank(s) {late} did not exit within "
                      f"{timeout_s:g} s; stopping them (the results are complete)",
                      file=sys.stderr, flush=True)
                return
        beats = {rank: read_heartbeat(heartbeats, rank) for rank, code in enumerate(codes)
                 if code is None}
        stuck = progress.stuck({r: b for r, b in beats.items() if b}, now)
        if stuck:
            rank, why = stuck
            raise RankFailure(_failure_message(procs, codes, heartbeats, run_dir, rank,
                                               f"rank {rank} (pid {procs[rank].pid}) {why}"))
        for rank, code in enumerate(codes):
            if code is not None:
                continue
            beat = beats[rank]
            age = now - beat["time"] if beat else now - started
            limit = timeout_s if beat else timeout_s + STARTUP_GRACE_S
            if age > limit:
                reason = (f"rank {rank} (pid {procs[rank].pid}) stopped responding: no "
                          f"heartbeat for {age:.0f} s (runtime.heartbeat_timeout_s="
                          f"{timeout_s:g})")
                raise RankFailure(_failure_message(procs, codes, heartbeats, run_dir,
                                                   rank, reason))
        time.sleep(0.2)


def _first_cause(failed: list[int], codes: list, heartbeats: Path) -> int:
    """Among failed ranks, prefer one killed by a signal, then one whose error is its own
    rather than a broken connection to a peer that failed first."""
    for rank in failed:
        if codes[rank] < 0:
            return rank
    for rank in failed:
        beat = read_heartbeat(heartbeats, rank) or {}
        error = (beat.get("error") or "").lower()
        if not any(word in error for word in PEER_WORDS):
            return rank
    return failed[0]


def _failure_message(procs, codes, heartbeats: Path, run_dir: Path, rank: int,
                     reason: str | None = None) -> str:
    beat = read_heartbeat(heartbeats, rank) or {}
    if reason is None:
        code = codes[rank]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        reason = f"rank {rank} (pid {procs[rank].pid}) {how}"
    lines = [reason, f"  its last message: {beat.get('message', '(none: it never started)')!r}"]
    if beat.get("error"):
        lines.append(f"  its error: {beat['error']}")
    log = run_dir / "logs" / f"rank{rank}.log"
    if rank > 0 and log.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        if tail:
            lines.append(f"  end of {log}:")
            lines.extend(f"    {line}" for line in tail)
    checkpoints = run_dir / "checkpoints"
    lines.append(f"  every rank was stopped; the last complete checkpoint in {checkpoints} is "
                 "intact: rerun the same command to resume (runtime.num_ranks may differ)")
    return "\n".join(lines)


def stop_all(procs) -> None:
    """SIGTERM every rank's process group, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # also whatever the rank left in its group
        if p.poll() is None:
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _stop_on_signals:
    """SIGINT/SIGTERM to the launcher stop every rank, then surface as KeyboardInterrupt."""

    def __init__(self, procs):
        self.procs = procs
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        stop_all(self.procs)
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
