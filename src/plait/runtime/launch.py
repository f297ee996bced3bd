"""The local launcher: ``plait train cfg.yaml runtime.num_ranks=N`` starts N rank
processes on this machine, watches them, and tears them all down.

- Each rank is ``python -m plait.runtime.worker`` in its own session (so its
  reward worker goes down with it), with ``PR_SET_PDEATHSIG`` so it dies with
  the launcher even when the launcher is SIGKILLed.
- Rank 0 shares the terminal (progress bar, messages); the other ranks write to
  ``<run.dir>/logs/rank<R>.log``, and so does rank 0 with a traceback that is only a
  symptom (a collective that lost a peer), so the terminal leads with the cause.
- The launcher polls exit codes and heartbeats. The first rank to exit with an
  error, or whose heartbeat is older than ``runtime.heartbeat_timeout_s``, ends
  the job: a hung rank is killed at once, the others are stopped (SIGTERM, then
  SIGKILL), and :class:`RankFailure` names the rank, why, its last message and the
  checkpoint a rerun resumes from (checkpoints are written atomically by rank 0).
- The rank config and heartbeats live in ``<run.dir>/logs/.plait-job-<host>-<launcher
  pid>/``, removed at the end; one left by a launcher of this host that was killed is
  removed by the next launch in that run directory, and a live one refuses that launch
  (on a shared filesystem, another host's are left alone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from plait.config import Config, RunConfig, dump_yaml
from plait.errors import PlaitError
from plait.parallel.heartbeat import ProgressWatch, read_heartbeat
from plait.runtime.run_dir import check_run_dir, job_dir, job_dirs, launcher_alive, mark_run_dir

STARTUP_GRACE_S = 60.0   # added to the heartbeat timeout before a rank's first beat
STOP_GRACE_S = 5.0       # SIGTERM -> SIGKILL
POLL_S = 0.2             # how often the launcher looks at exit codes and heartbeats


class RankFailure(PlaitError, RuntimeError):
    """A rank died, failed or hung; the job was stopped."""


def free_port() -> int:
    """A port free now for rank 0's rendezvous, drawn below the system's ephemeral range:
    between the check and the bind the port is open, and one the system hands out to any
    outgoing connection (Ray starts many) may be taken in that gap; Ray's own worker
    ports (10002-19999) are avoided too."""
    candidates = list(range(20000, min(_EPHEMERAL[0], 32768)))
    for port in random.Random().sample(candidates, min(64, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # any the system gives
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()


def prepare_job(config: Config) -> tuple[Config, Path]:
    """Settle the run directory once, before any rank starts: ``run.overwrite`` is done
    here (ranks must not delete each other's files) and turned off for the ranks; the
    directory is marked as plait's at once, so that a job that dies before its first
    step leaves one that ``run.overwrite`` may delete."""
    check_run_dir(config)  # run.overwrite deletes only plait's own run directories
    run_dir = Path(config.run.dir)
    if config.run.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_run_dir(run_dir)
    remove_stale_job_dirs(run_dir)
    rank_config = dataclasses.replace(config, run=dataclasses.replace(config.run,
                                                                      overwrite=False))
    return rank_config, run_dir


def remove_stale_job_dirs(run_dir: Path) -> list[Path]:
    """Delete the job directories in ``run_dir/logs`` of this host's launchers that are
    gone (one killed by SIGKILL cannot remove its own); a running launcher's is kept, and
    so is every one of another host (its launcher may be running). Returns those deleted."""
    stale = []
    for path, host, pid in job_dirs(run_dir):
        if host != socket.gethostname() or (pid != os.getpid() and launcher_alive(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        stale.append(path)
    return stale


def world_size(config: Config) -> int:
    """Processes in the job: the trainer ranks, plus the rollout workers when apart."""
    runtime = config.runtime
    apart = runtime.placement in ("disaggregated", "partial")
    workers = runtime.rollout_workers if apart else 0
    return runtime.num_ranks + workers


def launch_local(config: Config, job: str) -> dict:
    """Run ``config``'s ranks as local processes, each calling the job function ``job``
    (``MODULE:NAME``, see :func:`~plait.runtime.worker.job_reference`); the summary."""
    rank_config, run_dir = prepare_job(config)
    runtime = config.runtime
    work = job_dir(run_dir)
    work.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        config_path = work / "config.yaml"
        config_path.write_text(dump_yaml(rank_config))
        heartbeats = work / "heartbeats"
        heartbeats.mkdir()
        (run_dir / "logs" / "rank0.log").unlink(missing_ok=True)  # a previous run's
        port = runtime.master_port or free_port()
        world = world_size(config)
        if world > 1:  # a backend that cannot work here fails before any rank starts
            from plait.parallel.dist import resolve_backend

            resolve_backend(runtime.backend, config.train.device, world)
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "PLAIT_HEARTBEAT_DIR": str(heartbeats), "PLAIT_RANK_PROCESS": "1"}
            out = None
            if rank == 0:  # on the terminal; a traceback that is a symptom goes to its log
                env["PLAIT_RANK_LOG"] = str(run_dir / "logs" / "rank0.log")
            else:
                out = open(run_dir / "logs" / f"rank{rank}.log", "w")  # noqa: SIM115
                logs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "plait.runtime.worker", str(config_path), job], env=env,
                stdout=out, stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                start_new_session=True))
        with _stop_on_signals(procs):
            import_failure_reporting()
            _watch(procs, heartbeats, runtime.heartbeat_timeout_s, config.run,
                   ProgressWatch(runtime.progress_timeout_s))
    finally:
        stop_all(procs)
        for handle in logs:
            handle.close()
        shutil.rmtree(work, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.is_file() else {}


def import_failure_reporting() -> None:
    """Import, while the ranks start, what reporting a failure needs (the checkpoint
    module and the user-fixable error types pull in torch and transformers): otherwise
    those seconds would come between a rank failing and the job ending."""
    from plait.errors import known_errors

    known_errors()


def _watch(procs, heartbeats: Path, timeout_s: float, run: RunConfig,
           progress: ProgressWatch) -> None:
    """Poll until every rank exits 0; raise :class:`RankFailure` at the first that fails,
    stops beating, or beats without making progress. ``run``: the job's run settings as
    given (what a rerun must change to resume)."""
    started = time.time()
    finished = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            time.sleep(0.3)  # let near-simultaneous exits land, then pick the cause
            codes = [p.poll() for p in procs]
            failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
            raise RankFailure(_failure_message(procs, codes, heartbeats, run,
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
            raise RankFailure(_failure_message(procs, codes, heartbeats, run, rank,
                                               f"rank {rank} (pid {procs[rank].pid}) {why}"))
        hung = _hung(beats, now - started, now, timeout_s)
        if hung:
            rank, age = hung
            # a stopped or wedged rank would not act on SIGTERM: waiting for it to would
            # add the whole stop grace to the time it takes to end the job
            _signal_group(procs[rank], signal.SIGKILL)
            reason = (f"rank {rank} (pid {procs[rank].pid}) stopped responding: no "
                      f"heartbeat for {age:.0f} s (runtime.heartbeat_timeout_s={timeout_s:g})")
            raise RankFailure(_failure_message(procs, codes, heartbeats, run, rank,
                                               reason))
        time.sleep(POLL_S)


def _hung(beats: dict, running_s: float, now: float, timeout_s: float
          ) -> tuple[int, float] | None:
    """``(rank, seconds since its last beat)`` of a live rank past the heartbeat timeout
    (before its first beat: past the timeout plus the startup grace), or None."""
    for rank, beat in beats.items():
        age = now - beat["time"] if beat else running_s
        limit = timeout_s if beat else timeout_s + STARTUP_GRACE_S
        if age > limit:
            return rank, age
    return None


def _first_cause(failed: list[int], codes: list, heartbeats: Path) -> int:
    """Among failed ranks, prefer one killed by a signal, then one whose error is its own
    rather than a broken connection to a peer that failed first."""
    for rank in failed:
        if codes[rank] < 0:
            return rank
    for rank in failed:
        if not (read_heartbeat(heartbeats, rank) or {}).get("peer"):
            return rank
    return failed[0]


def _failure_message(procs, codes, heartbeats: Path, run: RunConfig, rank: int,
                     reason: str | None = None) -> str:
    """The cause first (the rank, why, its last status and error), then the ranks that
    failed because of it and where their output is, then the checkpoint to resume from."""
    run_dir = Path(run.dir)
    beat = read_heartbeat(heartbeats, rank) or {}
    if reason is None:
        reason = f"rank {rank} (pid {procs[rank].pid}) {_exit_description(codes[rank])}"
    lines = [reason, f"  its last message: {beat.get('message', '(none: it never started)')!r}"]
    if beat.get("error"):
        lines.append(f"  its error: {beat['error']}")
    if codes[rank] != -signal.SIGKILL:  # a SIGKILLed rank wrote no last words to its log
        lines.extend(_log_tail(run_dir, rank))
    lines.extend(_consequences(codes, heartbeats, run_dir, rank))
    lines.append(f"  {checkpoint_note(run_dir, run)}")
    return "\n".join(lines)


def _exit_description(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    if -code == signal.SIGKILL:
        name += ": sent by another process, or by the kernel when memory ran out"
    return f"was killed by signal {-code} ({name})"


def _log_tail(run_dir: Path, rank: int) -> list[str]:
    log = run_dir / "logs" / f"rank{rank}.log"
    if not log.is_file():  # rank 0's output goes to the terminal, its peer errors here
        return []
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return [f"  end of {log}:", *(f"    {line}" for line in tail)] if tail else []


def _consequences(codes, heartbeats: Path, run_dir: Path, cause: int) -> list[str]:
    """A line for each other rank that had already failed, with where its output is."""
    lines = []
    for rank, code in enumerate(codes):
        if rank == cause or code in (None, 0):
            continue
        peer = (read_heartbeat(heartbeats, rank) or {}).get("peer")
        why = "its collective lost a peer" if peer else "exit code " + str(code)
        log = run_dir / "logs" / f"rank{rank}.log"
        where = f"; see {log}" if log.is_file() else ""
        lines.append(f"  rank {rank} failed after it ({why}){where}")
    return lines


def checkpoint_note(run_dir: Path, run: RunConfig | None = None) -> str:
    """Which checkpoint a rerun of a stopped job resumes from (or that there is none), and
    what the rerun must change to do so; ``run``: the job's run settings as given (None:
    the defaults)."""
    from plait.train.checkpoint import resume_note

    run = run or RunConfig()
    note = resume_note(Path(run_dir) / "checkpoints", resume=run.resume,
                       overwrite=run.overwrite)
    return f"every rank was stopped; {note} (runtime.num_ranks may differ)"


def stop_all(procs) -> None:
    """SIGTERM every rank's process group, then SIGKILL what is left. SIGCONT follows the
    SIGTERM so a stopped process (SIGSTOP, a debugger) acts on it rather than waiting
    out the grace."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
            _signal_group(p, signal.SIGCONT)
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

