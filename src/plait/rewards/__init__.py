"""Rewards: built-in verifiers, user functions by spec, and their weighted combination.

Reward function convention (as in TRL)::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

``fields`` are the dataset's columns as lists, each under its own name and a column
mapped by ``data.fields`` under plait's name too (``answer=[...]``). All
arguments are passed by keyword (as in TRL), so ``def f(completions, answer,
**kwargs)`` works too; functions must accept ``**kwargs``.
"""

from plait.rewards.builtin import BUILTIN_REWARDS, TaskReward, exact_match
from plait.rewards.loading import RewardLoadError, load_reward_fn, parse_reward_spec
from plait.rewards.manager import RewardError, RewardManager, RewardResult

__all__ = [
    "BUILTIN_REWARDS",
    "RewardError",
    "RewardLoadError",
    "RewardManager",
    "RewardResult",
    "TaskReward",
    "exact_match",
    "load_reward_fn",
    "parse_reward_spec",
]
