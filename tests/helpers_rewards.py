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
