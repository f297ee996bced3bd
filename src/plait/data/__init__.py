"""Data: prompt and preference datasets from local files, resumable iteration, built-in
synthetic tasks."""

from plait.data.datasets import DataError, PromptIterator, load_prompt_rows, split_rows
from plait.data.preferences import PreferenceData, load_preference_rows
from plait.data.tasks import (
    CHAR_VOCAB,
    TASKS,
    AdditionTask,
    RepeatTask,
    ReverseTask,
    Task,
    make_task,
)

__all__ = [
    "CHAR_VOCAB",
    "TASKS",
    "AdditionTask",
    "DataError",
    "PreferenceData",
    "PromptIterator",
    "RepeatTask",
    "ReverseTask",
    "Task",
    "load_preference_rows",
    "load_prompt_rows",
    "make_task",
    "split_rows",
]
