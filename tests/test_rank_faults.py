"""A rank that freezes or dies mid-job, signalled from outside: the launcher ends the job
soon after, leads with the rank that caused it, says which checkpoint a rerun resumes
from, keeps the other ranks' consequent tracebacks off the terminal, and a launcher
that is itself killed leaves no job directory behind."""

import json
import os
import re
import signal
import socket
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
    assert job_dir.name == f".plait-job-{socket.gethostname()}-{job.proc.pid}"
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


def test_a_rank_own_error_naming_a_timeout_or_connection_is_no_symptom(tmp_path, capsys):
    """Whether a failure is a symptom of a lost peer is judged by its type: plait's own
    errors (a reward that timed out, a judge whose connection failed) are the cause even
    when their words read like a lost peer; the launcher picks them as the cause."""
    import torch.distributed as torch_dist

    from plait.parallel.heartbeat import Heartbeat, is_peer_failure
    from plait.rewards import RewardError
    from plait.runtime.launch import _first_cause

    timed_out = RewardError("reward function 'judge' timed out on 3 calls in a row",
                            function_name="judge", sample_index=None, detail="timed out")
    refused = RewardError("reward function 'judge' failed: ConnectionError: connection "
                          "refused", function_name="judge", sample_index=0,
                          detail="ConnectionError")
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:537] Connection reset by peer")
    assert not is_peer_failure(timed_out) and not is_peer_failure(refused)
    assert not is_peer_failure(ValueError("connection string malformed"))
    assert is_peer_failure(lost)
    assert is_peer_failure(torch_dist.DistBackendError("anything"))
    for rank, err in enumerate((lost, timed_out)):
        Heartbeat(tmp_path, rank).finish("error", str(err), peer=is_peer_failure(err))
    assert _first_cause([0, 1], [1, 1], tmp_path) == 1
    from plait.runtime.worker import report_failure

    log = tmp_path / "rank0.log"
    report_failure(timed_out, "0", str(log))
    assert "timed out on 3 calls" in capsys.readouterr().err
    report_failure(ConnectionError("connection refused by judge"), "0", str(log))
    assert "connection refused by judge" in capsys.readouterr().err and not log.exists()


def run_killing_rank1(tiny_job, reward_spec, run_dir, *extra):
    """A 2-rank ``plait train`` whose rank 1 is SIGKILLed at step 3 (checkpoints every step)."""
    base = [a for a in job_args(tiny_job, reward_spec, run_dir) if not a.startswith("reward.")]
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", *base, "train.steps=50",
         "train.save_every=1", *extra,
         f"reward.functions=[{{fn: '{reward_spec('kill_rank1')}'}}]"],
        capture_output=True, text=True, env={**os.environ, "PLAIT_PROGRESS": "0"}, timeout=300)


@pytest.mark.slow
def test_ray_launcher_names_the_checkpoint_to_resume_from(tiny_job, reward_spec, tmp_path):
    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    proc = run_killing_rank1(tiny_job, reward_spec, run_dir, "runtime.launcher=ray")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 1 (Ray actor) died" in proc.stderr, proc.stderr[-3000:]
    assert checkpoint_line(run_dir) in proc.stderr, proc.stderr[-3000:]


def test_failure_after_overwrite_says_to_rerun_without_it(tiny_job, reward_spec, tmp_path):
    """Rerunning a run.overwrite=true job as it was would delete the checkpoint the
    launcher names: its message says to rerun without it."""
    run_dir = tmp_path / "run"
    proc = run_killing_rank1(tiny_job, reward_spec, run_dir, "run.overwrite=true")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 1 (pid" in proc.stderr and "killed by signal 9" in proc.stderr, proc.stderr[-3000:]
    assert f"{checkpoint_line(run_dir)}: rerun without run.overwrite=true (which deletes it) " \
        "to resume from it" in proc.stderr, proc.stderr[-3000:]


def test_failure_note_follows_the_run_settings(tmp_path):
    from types import SimpleNamespace

    from plait.runtime.launch import _failure_message

    checkpoint = tmp_path / "checkpoints" / "step_000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("{}")
    procs = [SimpleNamespace(pid=100), SimpleNamespace(pid=101)]
    for settings, rerun in (([], "rerun the same command"),
                            (["run.resume=never"], "rerun with run.resume=auto")):
        run = load_config(None, [f"run.dir={tmp_path}", *settings]).run
        message = _failure_message(procs, [None, 1], tmp_path / "heartbeats", run, 1)
        assert f"{checkpoint} (step 3): {rerun}" in message, message


def test_only_job_directories_of_this_hosts_launchers_that_are_gone_are_removed(tmp_path):
    """On a shared filesystem another host's launcher may be alive: its job directory
    is never removed; one named by pid alone (before hosts were recorded) is this host's."""
    from plait.runtime.launch import remove_stale_job_dirs

    here = socket.gethostname()
    gone, live = _finished_pid(), os.getppid()
    names = {"gone": f".plait-job-{here}-{gone}", "legacy": f".plait-job-{gone}",
             "live": f".plait-job-{here}-{live}", "other host": f".plait-job-node-7.example-{gone}"}
    for name in names.values():
        (tmp_path / "logs" / name / "heartbeats").mkdir(parents=True)
    removed = remove_stale_job_dirs(tmp_path)
    assert sorted(removed) == sorted(tmp_path / "logs" / names[key] for key in ("gone", "legacy"))
    for key in ("live", "other host"):
        assert (tmp_path / "logs" / names[key]).is_dir(), key


@pytest.mark.parametrize("settings", [[], ["run.overwrite=true"]], ids=["start", "overwrite"])
def test_a_launch_is_refused_while_a_launcher_of_this_host_runs_there(tmp_path, settings):
    from plait.config import ConfigError
    from plait.runtime.launch import prepare_job

    here = socket.gethostname()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".plait-run").write_text(json.dumps({"plait_run": 1}))
    config = load_config(None, [f"run.dir={run_dir}", "runtime.num_ranks=2", *settings])
    launcher = subprocess.Popen(["sleep", "60"])
    try:
        work = run_dir / "logs" / f".plait-job-{here}-{launcher.pid}"
        (work / "heartbeats").mkdir(parents=True)
        (work / "config.yaml").write_text("run: {}\n")
        with pytest.raises(ConfigError, match=rf"^a plait job \(pid {launcher.pid} on "
                           rf"{re.escape(here)}\) is running in this run directory"):
            prepare_job(config)
        assert (work / "config.yaml").read_text() == "run: {}\n"
    finally:
        launcher.kill()
        launcher.wait()
    prepare_job(config)  # once that launcher is gone, its directory is stale
    assert not work.exists()


def test_overwrite_never_deletes_another_hosts_job_directory(tmp_path):
    from plait.config import ConfigError
    from plait.runtime.launch import prepare_job

    run_dir = tmp_path / "run"
    other = run_dir / "logs" / ".plait-job-node-7.example-4242" / "heartbeats"
    other.mkdir(parents=True)
    (run_dir / ".plait-run").write_text(json.dumps({"plait_run": 1}))
    with pytest.raises(ConfigError, match=r"launcher on another host \(node-7\.example, "
                       r"pid 4242\)"):
        prepare_job(load_config(None, [f"run.dir={run_dir}", "run.overwrite=true"]))
    assert other.is_dir()
    prepare_job(load_config(None, [f"run.dir={run_dir}"]))  # a start deletes nothing
    assert other.is_dir()


def _finished_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
