"""Built-in reward functions: trusted, fast, and run in the trainer's process.

Every reward function follows one convention (as in TRL)::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

where ``fields`` holds the dataset's extra columns as lists aligned with the
batch (for example ``answer=[...]``). Every argument is passed by keyword, as
TRL does, so ``def f(completions, answer, **kwargs)`` works too. Functions
must accept ``**kwargs`` so that columns they do not use can be passed along.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from plait.data.tasks import Task

__all__ = ["BUILTIN_REWARDS", "TaskReward", "exact_match"]


class TaskReward:
    """Score completions with a task's verifier: ``task.verify(completion, answer)``.

    Needs an ``answer`` field; the manager checks that before calling.
    """

    __name__ = "task"

    def __init__(self, task: Task):
        self.task = task

    def __repr__(self) -> str:
        return f"TaskReward({self.task!r})"

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        answer: Sequence[Any],
        **fields: Any,
    ) -> list[float]:
        return [self.task.verify(c, str(a)) for c, a in zip(completions, answer, strict=True)]


def exact_match(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    answer: Sequence[Any],
    **fields: Any,
) -> list[float]:
    """1.0 where ``completion.strip() == str(answer).strip()``, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def _make_task_reward(task: Task | None) -> Callable[..., list[float]]:
    if task is None:
        raise ValueError(
            "the built-in reward 'task' scores with the active task's verifier, but no task "
            "was given; pass task=... (for example make_task('addition')) or use another reward"
        )
    return TaskReward(task)


def _make_exact_match(task: Task | None) -> Callable[..., list[float]]:
    return exact_match


#: Built-in reward factories by name; each takes the active task (or None).
BUILTIN_REWARDS: dict[str, Callable[[Task | None], Callable[..., list[float]]]] = {
    "task": _make_task_reward,
    "exact_match": _make_exact_match,
}
