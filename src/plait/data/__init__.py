"""Data: prompt datasets from local files, resumable iteration, built-in synthetic tasks."""

from plait.data.datasets import DataError, PromptIterator, load_prompt_rows, split_rows
from plait.data.tasks import CHAR_VOCAB, TASKS, AdditionTask, RepeatTask, Task, make_task

__all__ = [
    "CHAR_VOCAB",
    "TASKS",
    "AdditionTask",
    "DataError",
    "PromptIterator",
    "RepeatTask",
    "Task",
    "load_prompt_rows",
    "make_task",
    "split_rows",
]
