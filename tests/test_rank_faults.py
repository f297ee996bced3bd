"""A rank that freezes or dies mid-job, signalled from outside: the launcher ends the job
soon after, leads with the rank that caused it, says which checkpoint a rerun resumes
from, keeps the other ranks' consequent tracebacks off the terminal, and a launcher
that is itself killed leaves no job directory behind."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.config import load_config
from plait.train.checkpoint import checkpoint_step, latest_checkpoint

# the jobs' ranks are found through /proc (Linux, as the launcher's PR_SET_PDEATHSIG)
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").is_file(),
                                reason="finds rank processes through /proc")


def job_args(tiny_job, reward_spec, run_dir, *extra):
    base = [a for a in tiny_job if not a.startswith(("run.dir=", "train.threads="))]
    return [*base, f"run.dir={run_dir}", "train.threads=1", "train.steps=100000",
            "algo.reward_range=[0, 1]", "runtime.num_ranks=2",
            f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]", *extra]


class Job:
    """``plait train`` in the background, its output in files, its ranks found through
    /proc (a child of the launcher with ``RANK=r`` in its environment)."""

    def __init__(self, args, out_dir: Path):
        self.stderr_path = out_dir / "stderr.txt"
        with open(out_dir / "stdout.txt", "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "plait.cli", "train", *args],
                                         stdout=out, stderr=err,
                                         env={**os.environ, "PLAIT_PROGRESS": "0"})

    def rank_pid(self, rank: int) -> int | None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _parent(entry) == self.proc.pid and \
                    f"RANK={rank}".encode() in _environ(entry):
                return int(entry.name)
        return None

    def heartbeat_dir(self, rank: int) -> Path | None:
        """The heartbeat directory named in rank ``rank``'s environment."""
        pid = self.rank_pid(rank)
        for item in _environ(Path(f"/proc/{pid}")).split(b"\0") if pid else ():
            if item.startswith(b"PLAIT_HEARTBEAT_DIR="):
                return Path(item.split(b"=", 1)[1].decode())
        return None

    def beat(self, rank: int) -> dict:
        """Rank ``rank``'s latest heartbeat ({} before its first, or once it is gone)."""
        directory = self.heartbeat_dir(rank)
        try:
            return json.loads((directory / f"rank{rank}.json").read_text())
        except (TypeError, OSError, ValueError):
            return {}

    def wait_until(self, predicate, what: str, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the job ended early:\n{self.stderr()[-3000:]}"
            if predicate():
                return
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"timed out waiting for {what}")

    def finish(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _environ(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "environ").read_bytes()
    except OSError:
        return b""


def stepping(job: Job, rank: int, step: int = 2):
    def check():
        found = re.match(r"step (\d+)", job.beat(rank).get("message") or "")
        return found is not None and int(found.group(1)) >= step
    return check


def checkpoint_line(run_dir: Path) -> str:
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None, "the job wrote no checkpoint: the check would be empty"
    return f"the last complete checkpoint is {latest} (step {checkpoint_step(latest)})"


@pytest.fixture
def background_job(tmp_path):
    jobs = []

    def start(args):
        jobs.append(Job(args, tmp_path))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()


@needs_proc
def test_frozen_rank_ends_the_job_within_the_heartbeat_timeout(tiny_job, reward_spec, tmp_path,
                                                               background_job):
    """SIGSTOP on rank 1 while it steps: the job ends within runtime.heartbeat_timeout_s
    plus the margin its help promises, naming rank 1 and the checkpoint to resume from."""
    timeout_s, margin_s = 3.0, 2.0
    run_dir = tmp_path / "run"
    job = background_job(job_args(tiny_job, reward_spec, run_dir, "train.save_every=1",
                                  f"runtime.heartbeat_timeout_s={timeout_s:g}"))
    job.wait_until(stepping(job, 1), "rank 1 to start stepping")
    frozen = job.rank_pid(1)
    os.kill(frozen, signal.SIGSTOP)
    stopped_at = time.time()
    code = job.finish()
    elapsed = time.time() - stopped_at
    stderr = job.stderr()
    assert code == 1, stderr[-3000:]
    assert f"rank 1 (pid {frozen}) stopped responding" in stderr, stderr[-3000:]
    assert elapsed < timeout_s + margin_s, f"the job ended {elapsed:.1f} s after the freeze"
    assert checkpoint_line(run_dir) in stderr, stderr[-3000:]


@needs_proc
def test_dead_rank_leads_the_terminal_and_peers_tracebacks_go_to_their_logs(
        tiny_job, reward_spec, tmp_path, background_job):
    """Rank 1 is SIGKILLed while rank 0 waits for it in a collective (rank 1 frozen
    first), so rank 0's collective fails at once: the terminal shows the launcher's
    account (rank 1, its last status, no checkpoint yet), not rank 0's gloo traceback."""
    run_dir = tmp_path / "run"
    job = background_job(job_args(tiny_job, reward_spec, run_dir))
    job.wait_until(stepping(job, 1), "rank 1 to start stepping")
    dead = job.rank_pid(1)
    os.kill(dead, signal.SIGSTOP)
    job.wait_until(lambda: time.time() - job.beat(0).get("since", time.time()) > 3,
                   "rank 0 to wait for rank 1 (its status unchanged for 3 s)")
    last = job.beat(1)["message"]
    os.kill(dead, signal.SIGKILL)
    assert job.finish() == 1
    stderr = job.stderr()
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines()  # the first error is the launcher's
             if line.startswith("plait") and not line.startswith("plait: note:")]
    assert lines and lines[0].startswith(
        f"plait: error: rank 1 (pid {dead}) was killed by signal 9 (SIGKILL"), stderr[-3000:]
    assert f"its last message: {last!r}" in stderr
    assert "no checkpoint yet" in stderr and "intact" not in stderr, stderr[-3000:]
    assert latest_checkpoint(run_dir / "checkpoints") is None
    if "rank 0 failed after it" in stderr:  # it failed before it was stopped
        assert "Traceback" in (run_dir / "logs" / "rank0.log").read_text()


@needs_proc
def test_killed_launcher_leaves_no_job_directory(tiny_job, reward_spec, tmp_path,
                                                 background_job):
    """SIGKILL of ``plait train`` itself: its ranks die with it, and the job directory it
    made (rank config, heartbeats) is gone once the run directory is next prepared."""
    from plait.runtime.launch import prepare_job

    run_dir = tmp_path / "run"
    args = job_args(tiny_job, reward_spec, run_dir)
    job = background_job(args)
    job.wait_until(stepping(job, 1, step=1), "rank 1 to start stepping")
    job_dir = job.heartbeat_dir(1).parent
    ranks = [job.rank_pid(0), job.rank_pid(1)]
    assert job_dir.is_dir() and all(ranks)
    job.kill()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks):
        time.sleep(0.1)
    prepare_job(load_config(None, args))  # as the next launch in this run directory does
    assert not job_dir.exists(), f"{job_dir} was left behind"


def test_failure_names_the_last_complete_checkpoint(tmp_path):
    from plait.runtime.launch import checkpoint_note

    root = tmp_path / "checkpoints"
    assert "no checkpoint yet" in checkpoint_note(tmp_path)
    for step, complete in ((2, True), (4, True), (6, False)):
        (root / f"step_{step:06d}").mkdir(parents=True)
        if complete:
            (root / f"step_{step:06d}" / "COMPLETE").write_text("")
    note = checkpoint_note(tmp_path)
    assert f"the last complete checkpoint is {root / 'step_000004'} (step 4)" in note


def test_a_peers_failure_goes_to_the_log_and_a_rank_s_own_to_the_terminal(tmp_path, capsys):
    """On the terminal: a known error as one line, a rank's own bug as a traceback; a
    collective that lost its peer only in the rank's log."""
    from plait.config import ConfigError
    from plait.runtime.worker import report_failure

    def raised(err):
        try:
            raise err
        except Exception as caught:  # noqa: BLE001 - to give it a traceback
            return caught

    log = tmp_path / "rank0.log"
    lost = raised(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error "
                               "[127.0.0.1]:55001: Connection reset by peer"))
    report_failure(lost, "0", str(log))
    assert capsys.readouterr().err == ""
    assert "Traceback" in log.read_text() and "Connection reset by peer" in log.read_text()
    report_failure(raised(ValueError("a bug of its own")), "0", str(log))
    assert "Traceback" in capsys.readouterr().err
    report_failure(ConfigError("bad key"), "0", str(log))
    assert capsys.readouterr().err == "plait: rank 0: error: bad key\n"
    report_failure(lost, "1", None)  # a rank whose output is already its log
    assert "Connection reset by peer" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_launcher_names_the_checkpoint_to_resume_from(tiny_job, reward_spec, tmp_path):
    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    base = [a for a in job_args(tiny_job, reward_spec, run_dir) if not a.startswith("reward.")]
    proc = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", *base, "train.steps=50",
         "train.save_every=1", "runtime.launcher=ray",
         f"reward.functions=[{{fn: '{reward_spec('kill_rank1')}'}}]"],
        capture_output=True, text=True, env={**os.environ, "PLAIT_PROGRESS": "0"}, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 1 (Ray actor) died" in proc.stderr, proc.stderr[-3000:]
    assert checkpoint_line(run_dir) in proc.stderr, proc.stderr[-3000:]


def test_only_job_directories_of_launchers_that_are_gone_are_removed(tmp_path):
    from plait.runtime.launch import remove_stale_job_dirs

    gone = _finished_pid()
    live = os.getppid()
    for pid in (gone, live):
        (tmp_path / "logs" / f".plait-job-{pid}" / "heartbeats").mkdir(parents=True)
    assert remove_stale_job_dirs(tmp_path) == [tmp_path / "logs" / f".plait-job-{gone}"]
    assert (tmp_path / "logs" / f".plait-job-{live}").is_dir()


def _finished_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
