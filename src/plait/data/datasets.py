"""Prompt datasets from local files, and deterministic, resumable iteration.

:func:`load_prompt_rows` reads prompt rows from a local ``.jsonl`` / ``.json``
/ ``.parquet`` file, a directory written by ``datasets.save_to_disk``, or a
directory of data files, and returns plain dicts that each hold a non-empty
string ``"prompt"``, optionally an ``"answer"``, and every column under its own
name as an extra field (the trainer passes those to reward functions, so a
function written for the dataset's columns, as for TRL, finds them whatever
``fields`` maps). plait never downloads data: save a hub dataset to disk first.

:class:`PromptIterator` walks the rows epoch by epoch in a shuffled order that
depends only on ``(seed, epoch)``, and its small state dict lets a resumed run
continue with exactly the same prompts.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from plait.errors import PlaitError

__all__ = [
    "DataError",
    "PromptIterator",
    "load_prompt_rows",
    "split_rows",
]

_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_FILE_SUFFIXES = (*_JSON_LINES_SUFFIXES, ".json", ".parquet")
_SUPPORTED = ".jsonl, .json, .parquet, a save_to_disk directory or a directory of data files"
# Column names that commonly hold the prompt, used to suggest a field mapping.
_PROMPT_LIKE_COLUMNS = ("question", "query", "problem", "instruction", "input", "text", "content")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# The names reward functions take the batch itself by (plait.rewards); a mapped column of
# one of these names is kept under plait's name only, as a field of that name would clash.
_REWARD_ARGUMENTS = ("prompts", "completions")


class DataError(PlaitError, ValueError):
    """Prompt data cannot be produced: an unreadable dataset, a malformed row, or a bad task."""


# A raw row with the human-readable place it came from ("data.jsonl, line 3").
_Located = tuple[str, Any]


def load_prompt_rows(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Load prompt rows from a local file or directory.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file, a directory saved by
            ``datasets.Dataset(Dict).save_to_disk``, or a directory of data
            files that ``datasets.load_dataset`` can read.
        split: the split to take from a multi-split dataset (ignored for a
            single file or a single saved ``Dataset``).
        fields: maps plait's names to the dataset's columns, for example
            ``{"prompt": "question", "answer": "solution"}``; unmapped names
            are read from the column of the same name. A mapped column is
            kept under its own name too, and replaces a column that already
            has plait's name.
        limit: keep only the first ``limit`` rows.
        cache_dir: ``datasets`` cache for a directory of data files (default:
            the ``datasets`` default cache).

    Returns:
        One dict per row with a non-empty ``str`` under ``"prompt"``, the
        mapped ``"answer"`` if present (left as stored, not cast to ``str``),
        and every column unchanged under its own name (``"solution"`` as well
        as ``"answer"`` in the example above).

    Raises:
        DataError: missing source, hub id, unsupported format, malformed row.
    """
    mapping = _check_arguments(fields, limit)
    path = _existing_path(source)
    located = _read_located_rows(path, split, limit, cache_dir)
    rows = [_to_prompt_row(where, raw, mapping) for where, raw in located]
    if not rows:
        raise DataError(f"{path}: no rows (split {split!r}); a prompt dataset needs at least one")
    return rows


def load_text_rows(source: str | os.PathLike[str], *, split: str = "train",
                   fields: Mapping[str, str] | None = None) -> list[dict]:
    """Supervised rows (SFT, PTX data), each one of:

    - ``{"prompt", "answer"}`` strings: from ``prompt`` and one of ``answer``,
      ``completion``, ``response``; a ``text`` column is all answer (an empty prompt);
    - ``{"messages"}``: a conversation, a list of ``{"role", "content"}`` strings with at
      least one ``assistant`` turn (the turns a model learns to write).

    ``fields`` maps these names to the dataset's columns (``{answer: solution}``). A row
    that is none of these is named with its file and line."""
    path = _existing_path(source, "supervised data")
    mapping = _check_arguments(fields, None)
    rows = []
    for where, raw in _read_located_rows(path, split, None, None):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        raw = {**raw, **{name: raw[column] for name, column in mapping.items()
                         if column in raw}}
        if "messages" in raw:
            rows.append({"messages": _check_conversation(where, raw["messages"])})
            continue
        if isinstance(raw.get("text"), str) and raw["text"]:
            rows.append({"prompt": "", "answer": raw["text"]})
            continue
        answer = next((raw[k] for k in ("answer", "completion", "response")
                       if isinstance(raw.get(k), str) and raw[k]), None)
        if not isinstance(raw.get("prompt"), str) or answer is None:
            raise DataError(f"{where}: a supervised row needs a non-empty 'text', 'prompt' "
                            "and 'answer' (or 'completion' / 'response') strings, or "
                            f"'messages'; it has {sorted(raw)} (map columns with "
                            "data.fields={answer: COLUMN})")
        rows.append({"prompt": raw["prompt"], "answer": answer})
    if not rows:
        raise DataError(f"{path}: no rows (split {split!r})")
    return rows


def _check_conversation(where: str, messages: Any) -> list[dict]:
    """``messages`` as a list of role/content dicts with an assistant turn, or the row named."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{role, content} objects")
    for turn, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {turn} must be an object with 'role' and "
                            f"'content' strings, got {message!r}"[:300])
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no 'assistant' turn to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_arguments(fields: Mapping[str, str] | None, limit: int | None) -> dict[str, str]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    mapping = dict(fields or {})
    for name, column in mapping.items():
        if not isinstance(name, str) or not isinstance(column, str):
            raise DataError(
                f"fields must map plait names to column names (both str), got {name!r}: {column!r}"
            )
    return mapping


def _existing_path(source: str | os.PathLike[str], what: str = "prompt data") -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    if _HUB_ID.match(text) and path.suffix.lower() not in _FILE_SUFFIXES:
        raise DataError(
            f"{text!r} is not a local path; it looks like a Hugging Face Hub dataset id. plait "
            f"loads data only from local paths and never downloads. Save it first, e.g. "
            f"`datasets.load_dataset({text!r}).save_to_disk('data/{path.name}')`, then pass "
            f"that directory."
        )
    raise DataError(f"{what} {text!r} not found (looked for {path.resolve()})")


def _read_located_rows(
    path: Path, split: str, limit: int | None, cache_dir: str | os.PathLike[str] | None
) -> list[_Located]:
    if path.is_dir():
        if any((path / marker).exists() for marker in _SAVE_TO_DISK_MARKERS):
            return _read_saved_dataset(path, split, limit)
        return _read_data_directory(path, split, limit, cache_dir)
    suffix = path.suffix.lower()
    if suffix in _JSON_LINES_SUFFIXES:
        located = _read_json_lines(path, _read_text(path))
    elif suffix == ".json":
        located = _read_json(path, split)
    elif suffix == ".parquet":
        located = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; plait reads {_SUPPORTED}")
    return located[:limit]


def _read_json_lines(path: Path, text: str) -> list[_Located]:
    located: list[_Located] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            located.append((f"{path}, line {line_number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {line_number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                f"each line must hold one JSON object"
            ) from exc
    return located


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8") from exc


def _read_json(path: Path, split: str) -> list[_Located]:
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: a JSON-lines file named .json
            return _read_json_lines(path, text)
        raise DataError(
            f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    if isinstance(document, dict):
        document = _pick_json_split(path, document, split)
    if not isinstance(document, list):
        raise DataError(
            f"{path}: expected a JSON list of row objects, got {type(document).__name__}"
        )
    return [(f"{path}, row {index}", row) for index, row in enumerate(document, start=1)]


def _pick_json_split(path: Path, document: dict[str, Any], split: str) -> Any:
    for key in (split, "data", "rows"):
        if isinstance(document.get(key), list):
            return document[key]
    raise DataError(
        f"{path}: the top-level JSON object has no list of rows under {split!r}, 'data' or "
        f"'rows' (keys: {sorted(document)}); store a list of row objects instead"
    )


def _read_parquet(path: Path) -> list[_Located]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read parquet file: {exc}") from exc
    return [(f"{path}, row {index}", row) for index, row in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path, split: str, limit: int | None) -> list[_Located]:
    import datasets

    try:
        with _hub_offline():
            loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load dataset saved with save_to_disk: {exc}") from exc
    return _located_from_hf(path, loaded, split, limit)


def _read_data_directory(
    path: Path, split: str, limit: int | None, cache_dir: str | os.PathLike[str] | None
) -> list[_Located]:
    import datasets

    try:
        with _hub_offline():
            loaded = datasets.load_dataset(
                str(path), cache_dir=None if cache_dir is None else str(cache_dir)
            )
    except Exception as exc:
        raise DataError(
            f"{path}: cannot load this directory as a dataset ({type(exc).__name__}: {exc}); "
            f"plait reads {_SUPPORTED}"
        ) from exc
    return _located_from_hf(path, loaded, split, limit)


def _located_from_hf(path: Path, loaded: Any, split: str, limit: int | None) -> list[_Located]:
    import datasets

    where = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r}; available splits: {sorted(loaded)}. "
                f"Pass split=... to choose one."
            )
        loaded, where = loaded[split], f"{path} (split {split!r})"
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return [(f"{where}, row {index}", row) for index, row in enumerate(loaded.to_list(), start=1)]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Keep ``datasets`` and ``huggingface_hub`` off the network inside the block."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    patched = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (hub_constants, "HF_HUB_OFFLINE"),
    ]
    saved_attributes = [(module, name, getattr(module, name)) for module, name in patched]
    saved_environment = {
        name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    try:
        for module, name in patched:
            setattr(module, name, True)
        os.environ.update(dict.fromkeys(saved_environment, "1"))
        yield
    finally:
        for module, name, value in saved_attributes:
            setattr(module, name, value)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _to_prompt_row(where: str, raw: Any, mapping: dict[str, str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object (a row), got {type(raw).__name__}")
    _require_prompt_column(where, raw, mapping.get("prompt", "prompt"))
    row = {key: value for key, value in raw.items()
           if key not in _REWARD_ARGUMENTS or key not in mapping.values()}
    for name, column in mapping.items():
        if column not in raw:
            raise DataError(
                f"{where}: fields maps {name!r} to column {column!r}, which this row lacks; "
                f"its columns are {sorted(raw)}{_nearest_hint(name, column, raw)}"
            )
        row[name] = raw[column]
    _check_prompt_value(where, row["prompt"])
    return row


def _require_prompt_column(where: str, raw: dict[str, Any], column: str) -> None:
    if column in raw:
        return
    hint = _nearest_hint("prompt", column, raw)
    if not hint:
        likely = [name for name in _PROMPT_LIKE_COLUMNS if name in raw]
        if likely:
            hint = f"; did you mean {likely[0]!r}? Map it with fields={{'prompt': {likely[0]!r}}}"
    raise DataError(
        f"{where}: no prompt column {column!r}; the row has columns {sorted(raw)}{hint}"
    )


def _nearest_hint(name: str, column: str, raw: Mapping[str, Any]) -> str:
    nearest = difflib.get_close_matches(column, [str(key) for key in raw], n=1, cutoff=0.6)
    if not nearest:
        return ""
    return f"; did you mean {nearest[0]!r}? Map it with fields={{{name!r}: {nearest[0]!r}}}"


def _check_prompt_value(where: str, prompt: Any) -> None:
    if not isinstance(prompt, str):
        chat_hint = (
            " (chat-style message lists are not accepted: store the plain text; the trainer "
            "applies the chat template)"
            if isinstance(prompt, list)
            else ""
        )
        raise DataError(f"{where}: prompt must be a str, got {type(prompt).__name__}{chat_hint}")
    if not prompt.strip():
        raise DataError(f"{where}: prompt is empty")


def split_rows(
    rows: Sequence[dict[str, Any]], eval_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle ``rows`` with ``seed`` and split off an evaluation set.

    Returns:
        ``(train_rows, eval_rows)`` with ``round(len(rows) * eval_fraction)``
        evaluation rows (at least one when ``eval_fraction > 0``); a pure
        function of ``(rows, eval_fraction, seed)``.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= len(rows):
        raise DataError(
            f"eval_fraction={eval_fraction} of {len(rows)} rows leaves no training rows"
        )
    return [rows[i] for i in order[num_eval:]], [rows[i] for i in order[:num_eval]]


class PromptIterator:
    """Deterministic, resumable, epoch-based shuffled iteration over rows.

    Epoch ``e`` visits every row once in the order
    ``random.Random(seed * 1_000_003 + e).shuffle(range(len(rows)))`` (or in
    file order when ``shuffle=False``); batches run across epoch boundaries.

    Example:
        >>> it = PromptIterator(rows, seed=1)
        >>> batch = it.next_batch(8)          # list of 8 row dicts
        >>> state = it.state_dict()           # {"seed", "epoch", "position", "num_rows"}
        >>> resumed = PromptIterator(rows, seed=1); resumed.load_state_dict(state)
    """

    def __init__(self, rows: Sequence[dict[str, Any]], *, seed: int = 0, shuffle: bool = True):
        if len(rows) == 0:
            raise DataError("PromptIterator needs at least one row")
        self._rows = list(rows)
        self._seed = int(seed)
        self._shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def epoch(self) -> int:
        """Index of the epoch the next row comes from (0-based)."""
        return self._epoch

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._rows)))
        if self._shuffle:
            random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> list[dict[str, Any]]:
        """Return the next ``batch_size`` rows (shallow copies)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch = []
        for _ in range(batch_size):
            if self._position == len(self._order):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._epoch_order(self._epoch)
            batch.append(dict(self._rows[self._order[self._position]]))
            self._position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Return the JSON-serialisable position: seed, epoch, position, num_rows."""
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_rows": len(self._rows),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a :meth:`state_dict` taken over the same rows."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise DataError(
                f"PromptIterator state lacks {sorted(missing)}; got keys {sorted(state)}"
            )
        num_rows = state.get("num_rows", len(self._rows))
        if num_rows != len(self._rows):
            raise DataError(
                f"PromptIterator state was saved over {num_rows} rows but this iterator has "
                f"{len(self._rows)}; resume with the same dataset (same source, split and limit)"
            )
        position = int(state["position"])
        if not 0 <= position <= len(self._rows):
            raise DataError(f"PromptIterator state has position {position} outside 0..{num_rows}")
        self._seed, self._epoch, self._position = int(state["seed"]), int(state["epoch"]), position
        self._order = self._epoch_order(self._epoch)
