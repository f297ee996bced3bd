"""JSON run artefacts written atomically: ``summary.json``, trainer state, manifests.

A reader (a dashboard, a resumed run, a human with ``cat``) must never see a
half-written file, so every write goes to a temporary file in the same
directory, is flushed and fsynced, and is then renamed over the target with
``os.replace`` (atomic on POSIX and Windows when both paths share a file system).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["fsync_dir", "json_safe", "write_json_atomic", "write_text_atomic"]


def json_safe(value: Any, *, where: str = "value") -> Any:
    """Convert ``value`` into plain JSON types, recursively.

    * ``float`` NaN / +-inf become ``None`` (JSON has no NaN);
    * 0-d or one-element tensors and numpy scalars become Python numbers;
      larger tensors and arrays become (nested) lists;
    * tuples become lists, ``Path`` becomes ``str``;
    * mapping keys must be strings (``json`` would silently turn ``3`` into
      ``"3"``, which does not round-trip).

    ``where`` names the value in error messages, e.g. ``"trainer_state"``.

    Raises:
        TypeError: for a value of any other type, naming where it was found.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _json_safe_array(value, where)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return _json_safe_mapping(value, where)
    if isinstance(value, (list, tuple)):
        return [json_safe(item, where=f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where} has type {type(value).__name__}, which cannot be written as JSON; "
        "use numbers, strings, bools, None, lists, dicts with string keys, or tensors"
    )


def _json_safe_array(value: torch.Tensor | np.ndarray | np.generic, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        plain = value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    else:
        plain = value.item() if np.ndim(value) == 0 else value.tolist()
    return json_safe(plain, where=where)


def _json_safe_mapping(value: Mapping, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{where} has a key {key!r} of type {type(key).__name__}; JSON object keys "
                "must be strings (convert the key with str() before saving)"
            )
        out[key] = json_safe(item, where=f"{where}[{key!r}]")
    return out


def fsync_dir(directory: Path | str) -> None:
    """Flush a directory entry table to disk so that renames inside it survive a crash.

    A no-op where directories cannot be opened (Windows).
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; create parent directories. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: Path | str, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, ``os.replace``).

    ``obj`` goes through :func:`json_safe` first, so tensors and numpy scalars
    are accepted and NaN/inf are written as ``null``. Returns the path.

    Raises:
        TypeError: if ``obj`` holds something JSON cannot represent.
    """
    text = json.dumps(json_safe(obj, where=Path(path).name), indent=indent, allow_nan=False)
    return write_text_atomic(path, text + "\n")
