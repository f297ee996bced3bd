"""Reward functions that hang or fail, at import or when called, never hang the job: one
time limit ends it (or, under fallback, a function stuck on every call), Ctrl-C ends it at
once, no reward worker outlives it, and every failure is one line naming the function."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import TESTS_DIR, TINY_JOB

from plait.cli import main
from plait.rewards import RewardError, RewardLoadError, RewardManager

PROMPTS = ["1+1=", "2+2=", "3+4=", "5+5="]
COMPLETIONS = ["2", "5", "boom", "10"]

USER_REWARDS = textwrap.dedent(
    """
    import math
    import os
    import time

    def hang(prompts, completions, **kwargs):
        time.sleep(60)

    def hangs_on_boom(prompts, completions, **kwargs):
        if "boom" in completions:
            time.sleep(60)
        return [1.0] * len(completions)

    def hangs_on_slow(prompts, completions, **kwargs):
        if any(c.startswith("slow") for c in completions):
            time.sleep(60)
        return [1.0] * len(completions)

    def raises_on_boom(prompts, completions, **kwargs):
        if "boom" in completions:
            raise ValueError("cannot score\\nthis one")
        return [1.0] * len(completions)

    def nan_on_boom(prompts, completions, **kwargs):
        return [math.nan if c == "boom" else 1.0 for c in completions]

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def not_numbers(prompts, completions, **kwargs):
        return ["high" if c == "boom" else 1.0 for c in completions]
    """
)


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def assert_ended(pids, within_s=3.0):
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)], "reward worker processes outlived the job"


# ----------------------------------------------------------------------------- imports


def test_import_that_hangs_is_announced_and_stopped_in_the_worker(tmp_path, capfd):
    path = tmp_path / "slow_import.py"
    marker = tmp_path / "imported_by"
    path.write_text(
        f"import os, time\nopen({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "time.sleep(30)\ndef score(prompts, completions, **kwargs):\n    return [0.0]\n"
    )
    started = time.monotonic()
    with pytest.raises(RewardLoadError) as info:
        RewardManager([f"{path}:score"], import_timeout_s=2.5)
    assert time.monotonic() - started < 6
    assert str(info.value).startswith(
        f"reward spec '{path}:score': importing slow_import.py did not finish within 2.5s"
    )
    assert "\n" not in str(info.value)
    err = capfd.readouterr().err
    assert "plait: importing reward module slow_import.py ... (time limit 2.5s)" in err
    importers = [int(line) for line in marker.read_text().split()]
    assert os.getpid() not in importers  # user code never ran in this process
    assert_ended(importers)


def test_import_limit_defaults_to_the_call_limit_and_applies_in_process(tmp_path):
    path = tmp_path / "slow_in_process.py"
    path.write_text("import time\ntime.sleep(30)\n"
                    "def score(prompts, completions, **kwargs):\n    return [0.0]\n")
    started = time.monotonic()
    with pytest.raises(RewardLoadError, match=r"slow_in_process.py did not finish within 1s"):
        RewardManager([f"{path}:score"], timeout_s=1.0, isolate=False)
    assert time.monotonic() - started < 4


def test_worker_reports_what_it_cannot_import(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import os\nos._exit(3)\n")
    with pytest.raises(RewardLoadError, match=r"exited while importing exits.py .*exit code 3"):
        RewardManager([f"{path}:score"])
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def scor(prompts, completions, **kwargs):\n    return [0.0]\n"
                     "def positional(a, b):\n    return [0.0]\n")
    with pytest.raises(RewardLoadError, match=r"has no attribute 'score'.*Did you mean 'scor'"):
        RewardManager([f"{wrong}:score"])
    with pytest.raises(RewardLoadError, match=r"'positional' has signature \(a, b\)"):
        RewardManager([f"{wrong}:positional"])


# ----------------------------------------------------------------------------- calls


def test_function_that_times_out_on_every_call_stops_under_fallback(rewards_file):
    manager = RewardManager([f"{rewards_file}:hang"], timeout_s=0.5, on_error="fallback",
                            max_consecutive_timeouts=3)
    started = time.monotonic()
    with manager, pytest.raises(RewardError) as info:
        manager.score(PROMPTS, COMPLETIONS)
    # the first three sample calls after the batch call: four limits, not one per sample
    assert time.monotonic() - started < 4.5
    assert str(info.value).startswith("reward function 'hang' timed out on 3 calls in a row "
                                      "(time limit 0.5s each")
    assert "reward.max_consecutive_timeouts=3" in str(info.value)


def test_a_batch_timeout_localised_by_sample_counts_once(rewards_file):
    """A batch call that times out is re-run sample by sample; only those calls count
    towards max_consecutive_timeouts, so two adjacent hung samples do not stop the job."""
    completions = ["slow one", "slow two", "5", "10"]  # hung right after the batch call
    with RewardManager([f"{rewards_file}:hangs_on_slow"], timeout_s=0.5, on_error="fallback",
                       max_consecutive_timeouts=3) as manager:
        result = manager.score(PROMPTS, completions)
    assert result.total.tolist() == [0.0, 0.0, 1.0, 1.0] and result.num_failures == 2


def test_timeouts_between_answered_calls_fall_back_and_continue(rewards_file):
    with RewardManager([f"{rewards_file}:hangs_on_boom"], timeout_s=0.5, on_error="fallback",
                       max_consecutive_timeouts=2) as manager:
        for _ in range(2):
            result = manager.score(PROMPTS, COMPLETIONS)
            assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0] and result.num_failures == 1


@pytest.mark.parametrize("isolate", [None, False])
def test_abort_ends_a_hung_call_at_once(rewards_file, isolate):
    manager = RewardManager([f"{rewards_file}:hang"], timeout_s=60.0, isolate=isolate)
    pid = manager.worker_pid
    errors = []

    def score():
        try:
            manager.score(PROMPTS, COMPLETIONS)
        except RewardError as err:
            errors.append(err)

    thread = threading.Thread(target=score)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    manager.abort()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert "reward scoring was stopped" in str(errors[0])
    with pytest.raises(RewardError, match="stopped"):
        manager.score(PROMPTS, COMPLETIONS)
    if pid is not None:
        assert_ended([pid])
    assert manager.worker_pid is None


@pytest.mark.parametrize(
    ("function", "says"),
    [
        ("raises_on_boom", "'raises_on_boom' failed on sample 2 (of 4 in the batch): "
                           "ValueError: cannot score | this one (prompt: '3+4=', "
                           "completion: 'boom')"),
        ("nan_on_boom", "'nan_on_boom' failed on sample 2 (of 4 in the batch): returned NaN"),
        ("wrong_length", "'wrong_length' returned 1 values for a batch of 4"),
        ("not_numbers", "'not_numbers' returned a str ('high') for sample 2"),
        ("hangs_on_boom", "'hangs_on_boom' exceeded time limit of 0.5s on a batch of 4"),
    ],
)
def test_each_failure_is_one_line_naming_function_and_sample(rewards_file, function, says):
    with RewardManager([f"{rewards_file}:{function}"], timeout_s=0.5) as manager:
        with pytest.raises(RewardError) as info:
            manager.score(PROMPTS, COMPLETIONS)
    message = str(info.value)
    assert message.startswith("reward function ") and says in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- plait train


def _start_train(tmp_path, *overrides):
    marker = tmp_path / "entered"
    env = {**os.environ, "PLAIT_TEST_MARKER": str(marker), "PLAIT_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1"}
    spec = f"{os.path.join(TESTS_DIR, 'helpers_rewards.py')}:enter_and_hang"
    command = [sys.executable, "-m", "plait.cli", "train", *TINY_JOB,
               f"run.dir={tmp_path / 'run'}", "train.steps=1",
               f"reward.functions=[{{fn: '{spec}'}}]", *overrides]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():  # the reward function has been entered: scoring hangs
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the job never reached reward scoring"
        time.sleep(0.05)
    return process, marker


def _finish(process, started, within_s=15.0):
    """Wait for ``process`` to exit (failing past ``within_s``); return its stderr lines, each
    with the seconds from ``started`` at which it was read, and its exit time."""
    lines = []

    def read():
        for line in process.stderr:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        process.kill()
        reader.join(5)
        text = "\n".join(line for _, line in lines)
        pytest.fail(f"plait train still ran {within_s}s later:\n{text[-2000:]}")
    exited = time.monotonic() - started
    reader.join(5)
    process.stdout.close()
    return lines, exited


def test_ctrl_c_stops_a_job_hung_in_a_reward_function_at_once(tmp_path):
    process, marker = _start_train(tmp_path, "reward.timeout_s=60")
    time.sleep(0.3)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    lines, exited = _finish(process, started)
    text = "\n".join(line for _, line in lines)
    said = [(at, line) for at, line in lines if line.startswith("plait: interrupted")]
    assert process.returncode == 130, text[-2000:]
    assert len(said) == 1 and said[0][0] < 3.0, text[-2000:]  # not after the 60 s limit
    assert exited < 8, text[-2000:]  # the interpreter's own teardown takes a second or two
    assert "Traceback" not in text
    assert_ended(int(pid) for pid in marker.read_text().split())


def test_first_reward_timeout_ends_the_job_under_raise(tmp_path):
    process, marker = _start_train(tmp_path, "reward.timeout_s=3")
    started = time.monotonic()  # the call began a moment before the function was entered
    lines, exited = _finish(process, started, within_s=40)
    text = "\n".join(line for _, line in lines)
    errors = [(at, line) for at, line in lines if line.startswith("plait: error:")]
    assert process.returncode == 1, text[-2000:]
    assert len(errors) == 1 and "Traceback" not in text, text[-2000:]
    at, line = errors[0]
    assert at < 4.5, text[-2000:]  # one limit (3 s), well under two; not one per queued group
    assert exited < 10, text[-2000:]
    assert "reward function 'enter_and_hang' exceeded time limit of 3s on a batch of 1" in line
    assert_ended(int(pid) for pid in marker.read_text().split())


def test_reward_failures_total_in_summary_and_last_line_survives_resume(tmp_path, capfd):
    spec = f"{os.path.join(TESTS_DIR, 'helpers_rewards.py')}:fail_on_odd_length"
    job = [*TINY_JOB, f"run.dir={tmp_path / 'run'}", f"reward.functions=[{{fn: '{spec}'}}]",
           "reward.on_error=fallback", "train.save_every=1", "data.num_eval=4"]
    assert main(["train", *job, "train.steps=2"]) == 0
    assert main(["train", *job, "train.steps=3"]) == 0  # resumes at step 2
    out = capfd.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    per_step = {r["step"]: r["reward_failures"] for r in records if "reward_failures" in r}
    assert sorted(per_step) == [1, 2, 3]
    total = int(sum(per_step.values()))
    assert sum(per_step[s] for s in (1, 2)) > 0  # failures before the resume count too
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["reward_failures"] == total
    last = out.strip().splitlines()[-1]
    assert last.endswith(f"; {total} reward failures got reward.fallback_reward"), last
