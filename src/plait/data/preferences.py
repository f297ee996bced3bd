"""Preference pairs from local files: a prompt, a chosen and a rejected response.

Reads the same sources as prompt data (``.jsonl`` / ``.json`` / ``.parquet``, a
``save_to_disk`` directory, a directory of data files) in the two common forms:

- standard: ``prompt``, ``chosen`` and ``rejected`` strings;
- conversational: lists of ``{"role", "content"}`` messages. ``prompt`` holds the
  conversation so far and ``chosen`` / ``rejected`` the assistant's replies; without a
  ``prompt`` column, ``chosen`` and ``rejected`` are whole conversations that share every
  message but their last, which is the reply (the chat template is applied when the
  pairs are tokenised).

``fields`` maps plait's names to other columns, as for prompt data. A malformed row (a
missing field, an empty response, chosen identical to rejected, mixed forms) stops the
load naming its file and row, or, with ``bad_rows="drop"``, is left out and counted by
reason.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from plait.data.datasets import (
    DataError,
    _check_arguments,
    _existing_path,
    _nearest_hint,
    _read_located_rows,
)

__all__ = ["PreferenceData", "load_preference_rows"]

_NAMES = ("prompt", "chosen", "rejected")
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class PreferenceData:
    """Loaded pairs and what was left out.

    ``rows``: dicts with ``prompt``, ``chosen``, ``rejected`` (all strings, or all message
    lists with ``conversational`` true) and every other column under its own name.
    ``dropped``: reason -> rows left out (``bad_rows="drop"``); ``first_dropped``: where
    and why the first one was."""

    rows: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)
    first_dropped: str | None = None


class _BadRow(Exception):
    """A row that breaks a rule; ``reason`` is the short name it is counted by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_preference_rows(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
    bad_rows: Literal["error", "drop"] = "error",
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreferenceData:
    """Load preference pairs from a local file or directory.

    Args:
        source, split, limit, cache_dir: as for
            :func:`~plait.data.datasets.load_prompt_rows`.
        fields: maps ``prompt`` / ``chosen`` / ``rejected`` to the dataset's columns.
        bad_rows: ``"error"`` stops at the first malformed row; ``"drop"`` leaves such
            rows out and counts them (a load that keeps no row still fails).

    Raises:
        DataError: missing source, hub id, unsupported format, a malformed row (under
            ``"error"``), or no usable pair.
    """
    if bad_rows not in ("error", "drop"):
        raise DataError(f"bad_rows must be 'error' or 'drop', got {bad_rows!r}")
    mapping = _check_arguments(fields, limit)
    unknown = sorted(set(mapping) - set(_NAMES))
    if unknown:
        raise DataError(f"fields maps {unknown}, but preference pairs take only {list(_NAMES)}")
    path = _existing_path(source, "preference pairs")
    data = PreferenceData(rows=[])
    for where, raw in _read_located_rows(path, split, limit, cache_dir):
        try:
            data.rows.append(_to_pair(where, raw, mapping))
        except _BadRow as bad:
            if bad_rows == "error":
                raise DataError(str(bad)) from None
            data.dropped[bad.reason] += 1
            data.first_dropped = data.first_dropped or str(bad)
    if not data.rows:
        left = f"; {sum(data.dropped.values())} dropped, first: {data.first_dropped}" \
            if data.dropped else ""
        raise DataError(f"{path}: no preference pairs (split {split!r}){left}")
    return data


def _to_pair(where: str, raw: Any, mapping: dict[str, str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _BadRow("not_an_object",
                      f"{where}: expected a JSON object (a row), got {type(raw).__name__}")
    row = dict(raw)
    for name in _NAMES:
        column = mapping.get(name, name)
        if column in raw:
            row[name] = raw[column]
        elif name != "prompt":
            raise _BadRow(f"missing_{name}",
                          f"{where}: no {name} column {column!r}; the row has columns "
                          f"{sorted(raw)}{_nearest_hint(name, column, raw)}")
    conversational = isinstance(row["chosen"], list)
    if conversational:
        _conversational(where, row, has_prompt=mapping.get("prompt", "prompt") in raw)
    else:
        _standard(where, row)
    if row["chosen"] == row["rejected"]:
        raise _BadRow("identical", f"{where}: chosen and rejected are the same response")
    row["conversational"] = conversational
    return row


def _standard(where: str, row: dict[str, Any]) -> None:
    if "prompt" not in row:
        raise _BadRow("missing_prompt",
                      f"{where}: no prompt column; string pairs need one (conversational "
                      f"pairs may carry the prompt inside chosen and rejected)")
    for name in _NAMES:
        value = row[name]
        if not isinstance(value, str):
            kind = "a message list" if isinstance(value, list) else type(value).__name__
            raise _BadRow("mixed_forms" if isinstance(value, list) else f"bad_{name}",
                          f"{where}: {name} is {kind}; a pair is all strings or all message "
                          f"lists")
        if not value.strip():
            raise _BadRow(f"empty_{name}", f"{where}: {name} is empty")


def _conversational(where: str, row: dict[str, Any], *, has_prompt: bool) -> None:
    for name in _NAMES[1:] + (("prompt",) if has_prompt else ()):
        _check_messages(where, name, row[name])
    if not has_prompt:
        chosen, rejected = row["chosen"], row["rejected"]
        if len(chosen) < 2 or len(rejected) < 2 or chosen[:-1] != rejected[:-1]:
            raise _BadRow("no_shared_prompt",
                          f"{where}: without a prompt column, chosen and rejected must be "
                          f"whole conversations sharing every message but their last")
        row["prompt"], row["chosen"], row["rejected"] = \
            chosen[:-1], chosen[-1:], rejected[-1:]
    for name in _NAMES[1:]:
        if row[name][-1]["role"] != "assistant":
            raise _BadRow(f"bad_{name}",
                          f"{where}: {name} must end with an assistant message, not "
                          f"{row[name][-1]['role']!r}")


def _check_messages(where: str, name: str, messages: Any) -> None:
    if not isinstance(messages, list):
        raise _BadRow("mixed_forms", f"{where}: {name} is {type(messages).__name__}; a pair "
                                     f"is all strings or all message lists")
    if not messages:
        raise _BadRow(f"empty_{name}", f"{where}: {name} has no messages")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise _BadRow(f"bad_{name}", f"{where}: {name}[{position}] must be a "
                                         f"{{'role', 'content'}} message, got {message!r:.80}")
        if message["role"] not in _ROLES:
            raise _BadRow(f"bad_{name}", f"{where}: {name}[{position}] has role "
                                         f"{message['role']!r}; roles are {list(_ROLES)}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise _BadRow(f"empty_{name}",
                          f"{where}: {name}[{position}] has empty or non-text content")
