"""RewardManager: weighted sums, fields, validation, failures, timeouts and the worker."""

import logging
import math
import os
import textwrap
import threading
import time

import pytest
import torch

from plait.data.tasks import AdditionTask
from plait.rewards import RewardError, RewardLoadError, RewardManager

PROMPTS = ["1+1=", "2+2=", "3+4=", "5+5="]
COMPLETIONS = ["2", "5", "boom", "10"]
ANSWERS = ["2", "4", "7", "10"]

USER_REWARDS = textwrap.dedent(
    """
    import time

    def flaky(prompts, completions, **kwargs):
        return [1.0 / (c != "boom") for c in completions]

    def hangs_on_boom(prompts, completions, **kwargs):
        for c in completions:
            if c == "boom":
                time.sleep(60)
        return [1.0] * len(completions)

    def bonus(prompts, completions, bonus, **kwargs):
        return list(bonus)

    def chatty(prompts, completions, **kwargs):
        print("hello from the reward worker")
        return [0.0] * len(completions)

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    def nan_on_boom(prompts, completions, **kwargs):
        return [float("nan") if c == "boom" else 1.0 for c in completions]
    """
)


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_weighted_combination_of_builtins_and_callables():
    with RewardManager(
        [("task", 1.0), ("exact_match", 0.5), (length_reward, 2.0)], task=AdditionTask()
    ) as manager:
        result = manager.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert manager.names == ["task", "exact_match", "length_reward"]
    assert result.per_function["task"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert result.per_function["exact_match"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert result.per_function["length_reward"].tolist() == [1.0, 1.0, 4.0, 2.0]
    assert result.total.dtype == torch.float32
    assert result.total.tolist() == [3.5, 2.0, 8.0, 5.5]
    assert result.num_failures == 0 and result.seconds >= 0
    assert manager.worker_pid is None  # nothing isolated: no subprocess


def test_duplicate_names_get_suffixes_and_bare_items_weigh_one():
    manager = RewardManager([length_reward, (length_reward, 3.0)])
    assert manager.weights == {"length_reward": 1.0, "length_reward_2": 3.0}


def test_extra_fields_reach_in_process_and_isolated_functions(rewards_file):
    seen = {}

    def spy(prompts, completions, **fields):
        seen.update(fields)
        return [0.0] * len(prompts)

    with RewardManager([spy, (f"{rewards_file}:bonus", 1.0)]) as manager:
        result = manager.score(
            PROMPTS, COMPLETIONS, {"bonus": (0.1, 0.2, 0.3, 0.4), "id": [1, 2, 3, 4]}
        )
        assert manager.worker_pid is not None
    assert seen == {"bonus": [0.1, 0.2, 0.3, 0.4], "id": [1, 2, 3, 4]}
    assert result.per_function["bonus"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("isolate", [None, False])
def test_raising_reward_names_function_and_sample(rewards_file, isolate):
    with RewardManager([(f"{rewards_file}:flaky", 1.0)], isolate=isolate) as manager:
        with pytest.raises(RewardError) as info:
            manager.score(PROMPTS, COMPLETIONS)
    error = info.value
    assert (error.function_name, error.sample_index) == ("flaky", 2)
    message = str(error)
    assert message == (
        "reward function 'flaky' failed on sample 2 (of 4 in the batch): ZeroDivisionError: "
        "float division by zero (prompt: '3+4=', completion: 'boom')"
    )
    assert "ZeroDivisionError" in str(error.__cause__) or isinstance(
        error.__cause__, ZeroDivisionError
    )


def test_fallback_scores_the_other_samples_and_counts_failures(rewards_file, caplog):
    manager = RewardManager(
        [(f"{rewards_file}:flaky", 2.0), (length_reward, 1.0)],
        on_error="fallback",
        fallback_reward=-1.0,
    )
    with manager, caplog.at_level(logging.WARNING, logger="plait.rewards.manager"):
        first = manager.score(PROMPTS, COMPLETIONS)
        second = manager.score(PROMPTS, COMPLETIONS)
    assert first.per_function["flaky"].tolist() == [1.0, 1.0, -1.0, 1.0]
    assert first.total.tolist() == [3.0, 3.0, 2.0, 4.0]
    assert first.num_failures == second.num_failures == 1
    warnings = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(warnings) == 1 and "sample 2" in warnings[0].getMessage()


def test_hanging_reward_times_out_and_its_worker_is_killed(rewards_file):
    """Under on_error=raise a timeout stops at once: one time limit, no per-sample re-runs."""
    manager = RewardManager([(f"{rewards_file}:hangs_on_boom", 1.0)], timeout_s=1.0)
    pid = manager.worker_pid
    assert pid is not None and is_running(pid)
    started = time.monotonic()
    with pytest.raises(
        RewardError,
        match=r"^reward function 'hangs_on_boom' exceeded time limit of 1s on a batch of 4 "
        r"\(first prompt: '1\+1='\); [^\n]*reward.timeout_s[^\n]*$",
    ):
        manager.score(PROMPTS, COMPLETIONS)
    assert time.monotonic() - started < 1.8
    assert not is_running(pid)
    assert manager.worker_pid is None
    # The manager stays usable: a fresh worker scores the next batch.
    assert manager.score(PROMPTS[:2], COMPLETIONS[:2]).total.tolist() == [1.0, 1.0]
    manager.close()


def test_timeout_with_fallback(rewards_file):
    with RewardManager(
        [(f"{rewards_file}:hangs_on_boom", 1.0)], timeout_s=1.0, on_error="fallback"
    ) as manager:
        result = manager.score(PROMPTS, COMPLETIONS)
    assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert result.num_failures == 1


def test_in_process_timeout_is_detected_and_the_call_abandoned():
    release = threading.Event()

    def blocks_on_boom(prompts, completions, **kwargs):
        if "boom" in completions:
            release.wait(60)
        return [1.0] * len(completions)

    manager = RewardManager([blocks_on_boom], timeout_s=0.3, isolate=False, on_error="fallback")
    try:
        result = manager.score(PROMPTS, COMPLETIONS)
    finally:
        release.set()
    assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0] and result.num_failures == 1


def test_close_and_context_manager_end_the_worker(rewards_file):
    with RewardManager([(f"{rewards_file}:flaky", 1.0)]) as manager:
        pid = manager.worker_pid
        assert is_running(pid)
    assert not is_running(pid) and manager.worker_pid is None


def test_garbage_collected_manager_ends_its_worker(rewards_file):
    manager = RewardManager([(f"{rewards_file}:flaky", 1.0)])
    pid = manager.worker_pid
    del manager
    import gc

    gc.collect()
    assert not is_running(pid)


def test_worker_output_reaches_the_parent_streams(rewards_file, capfd):
    with RewardManager([(f"{rewards_file}:chatty", 1.0)]) as manager:
        manager.score(PROMPTS, COMPLETIONS)
    assert "hello from the reward worker" in capfd.readouterr().out


def test_crashing_worker_is_reported_and_replaced(tmp_path):
    path = tmp_path / "crash.py"
    path.write_text(
        "import os\n"
        "def crash(prompts, completions, **kwargs):\n"
        "    if 'boom' in completions:\n"
        "        os._exit(3)\n"
        "    return [1.0] * len(completions)\n"
    )
    with RewardManager([(f"{path}:crash", 1.0)], on_error="fallback") as manager:
        result = manager.score(PROMPTS, COMPLETIONS)
        assert result.total.tolist() == [1.0, 1.0, 0.0, 1.0]
        with pytest.raises(RewardError, match=r"worker process died \(exit code 3\)"):
            RewardManager([(f"{path}:crash", 1.0)]).score(PROMPTS, COMPLETIONS)


def test_wrong_length_is_an_error_even_with_fallback(rewards_file):
    with RewardManager([(f"{rewards_file}:wrong_length", 1.0)], on_error="fallback") as manager:
        with pytest.raises(RewardError, match=r"'wrong_length' returned 1 values for a batch of 4"):
            manager.score(PROMPTS, COMPLETIONS)


def test_nan_names_the_sample(rewards_file):
    with RewardManager([(f"{rewards_file}:nan_on_boom", 1.0)]) as manager:
        with pytest.raises(
            RewardError,
            match=r"^reward function 'nan_on_boom' failed on sample 2 \(of 4 in the batch\): "
            r"returned NaN; rewards must be finite numbers \(prompt: '3\+4=', "
            r"completion: 'boom'\)$",
        ):
            manager.score(PROMPTS, COMPLETIONS)


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        ([1.0, None, 1.0, 1.0], r"returned a NoneType \(None\) for sample 1"),
        ("1111", r"returned a str"),
    ],
)
def test_non_numeric_results_are_rejected(returned, error):
    manager = RewardManager([lambda prompts, completions, **kwargs: returned])
    with pytest.raises(RewardError, match=error):
        manager.score(PROMPTS, COMPLETIONS)


def test_bools_arrays_and_tensors_are_accepted():
    manager = RewardManager(
        [
            lambda prompts, completions, **kwargs: [c == "2" for c in completions],
            lambda prompts, completions, **kwargs: torch.ones(len(completions)),
        ]
    )
    assert manager.score(PROMPTS, COMPLETIONS).total.tolist() == [2.0, 1.0, 1.0, 1.0]


def test_fields_are_passed_by_keyword_and_required_ones_checked():
    def accuracy(completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    manager = RewardManager([accuracy])
    assert manager.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS}).total.tolist() == [1, 0, 0, 1]
    with pytest.raises(
        RewardError,
        match=r"'accuracy' requires field\(s\) \['answer'\], but the batch has \['id'\]",
    ):
        manager.score(PROMPTS, COMPLETIONS, {"id": [1, 2, 3, 4]})


def test_builtin_without_answer_field_fails_before_any_call():
    manager = RewardManager(["task"], task=AdditionTask(), on_error="fallback")
    with pytest.raises(RewardError, match=r"'task' requires field\(s\) \['answer'\]"):
        manager.score(PROMPTS, COMPLETIONS, {"level": [1, 2, 3, 4]})


def test_empty_batch_calls_nothing():
    result = RewardManager([length_reward]).score([], [], {})
    assert result.total.shape == (0,) and result.per_function["length_reward"].shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"reward_specs": []}, "non-empty list"),
        ({"reward_specs": [("task", math.nan)]}, "weight must be a finite number"),
        ({"reward_specs": [length_reward], "on_error": "ignore"}, "on_error must be"),
        ({"reward_specs": [length_reward], "timeout_s": 0}, "timeout_s must be"),
        ({"reward_specs": ["task"]}, "no task was given"),
    ],
)
def test_invalid_configuration(kwargs, error):
    with pytest.raises(RewardLoadError, match=error):
        RewardManager(**kwargs)


def test_batch_shape_checks():
    manager = RewardManager([length_reward])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        manager.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="field 'answer' has 1 values for a batch of 2"):
        manager.score(["a", "b"], ["c", "d"], {"answer": ["x"]})
