"""Reward functions loaded by spec ('tests/helpers_rewards.py:NAME') in the tests."""

import math
import time


def digit_fraction(prompts, completions, **kwargs):
    """Share of characters that are digits: easy to learn from a random model."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def nan_reward(prompts, completions, **kwargs):
    return [math.nan for _ in completions]


def raise_on_third(prompts, completions, **kwargs):
    if len(completions) > 2:
        raise ValueError("cannot score this one")
    return [0.0 for _ in completions]


def hang(prompts, completions, **kwargs):
    time.sleep(60)
    return [0.0 for _ in completions]


_calls = {"n": 0}


def _on_rank1_call(number, action):
    """Run ``action(pid of the rank process)`` on rank 1's ``number``-th reward call
    (reward functions run in a worker forked from the rank, so its parent is the rank)."""
    import os

    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == number:
        action(os.getppid())


def kill_rank1(prompts, completions, **kwargs):
    """digit_fraction, but SIGKILLs rank 1 on its 14th call (8 in the first evaluation, 2 per step)."""
    import os
    import signal

    _on_rank1_call(14, lambda pid: os.kill(pid, signal.SIGKILL))
    return digit_fraction(prompts, completions)


def freeze_rank1(prompts, completions, **kwargs):
    """digit_fraction, but SIGSTOPs rank 1 (a hang: no heartbeat) on its 14th call (8 in the first evaluation, 2 per step)."""
    import os
    import signal

    _on_rank1_call(14, lambda pid: os.kill(pid, signal.SIGSTOP))
    return digit_fraction(prompts, completions)


def stall_rank1(prompts, completions, **kwargs):
    """digit_fraction, but rank 1's 14th call never returns (the rank stays alive and keeps
    its heartbeat: a stall that only a progress watch can see)."""
    _on_rank1_call(14, lambda pid: time.sleep(3600))
    return digit_fraction(prompts, completions)


def digits_on_even_prompts(prompts, completions, **kwargs):
    """digit_fraction for prompts of even length, 0 for the others: their whole groups tie
    (zero advantage) while the rest still learn."""
    return [0.0 if len(p) % 2 else score
            for p, score in zip(prompts, digit_fraction(prompts, completions), strict=True)]


def zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def enter_and_hang(prompts, completions, **kwargs):
    """Append this process's pid to the file named by $PLAIT_TEST_MARKER, then never return."""
    import os

    marker = os.environ.get("PLAIT_TEST_MARKER")
    if marker:
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
    time.sleep(10**6)
    return [0.0 for _ in completions]


def fail_on_odd_length(prompts, completions, **kwargs):
    """digit_fraction, but raises on a completion of odd length (some samples of each step)."""
    if any(len(text) % 2 for text in completions):
        raise ValueError("odd length")
    return digit_fraction(prompts, completions)


def starts_with_digit(prompts, completions, **kwargs):
    """1 for a completion whose first character is a digit, else 0."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]
