"""Progress display: a tqdm bar on a terminal, periodic one-line status in logs.

On a terminal the bar redraws in place. Where stderr is not a terminal (CI,
``nohup``, a Ray worker's log file) a redrawing bar would be either invisible
or a wall of carriage returns, so the bar is replaced by one compact status
line at roughly every 10% of the steps and at the end::

    grpo: 30/100 (30%) [00:12<00:28, 2.41 step/s] reward=0.512 acc=0.75

``PLAIT_PROGRESS=1`` forces the bar on and ``PLAIT_PROGRESS=0`` forces the
status lines, whatever stderr is.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["PROGRESS_ENV", "ProgressBar", "format_postfix"]

PROGRESS_ENV = "PLAIT_PROGRESS"
STATUS_LINES = 10  # status lines per full run when the bar is disabled


class ProgressBar:
    """A step counter shown as a tqdm bar or as periodic status lines.

    Args:
        total: number of steps in the whole run (``>= 0``).
        desc: a short label, e.g. the recipe name.
        initial: steps already done (when resuming).
        disable: ``True`` prints status lines instead of a bar, ``False`` always
            draws the bar, ``None`` decides from the stream and ``PLAIT_PROGRESS``.
        file: where to write (default ``sys.stderr``).
        unit: what one step is called in rates (``"step"``, ``"sample"``...).
        silent: print nothing at all (ranks other than 0 of a multi-process job).

    ``update(n, **postfix)`` advances by ``n`` and shows the postfix values
    (merged with earlier ones, so rarely updated values such as eval accuracy
    stay visible). Keys that are not identifiers can be passed as
    ``update(**{"tok/s": 1234.5})``.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        initial: int = 0,
        disable: bool | None = None,
        file: TextIO | None = None,
        unit: str = "step",
        silent: bool = False,
    ) -> None:
        if total < 0 or initial < 0:
            raise ValueError(
                f"need total >= 0 and initial >= 0, got total={total}, initial={initial}"
            )
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.disabled = True if silent else (_auto_disable(file) if disable is None else disable)
        self.silent = silent
        self._file = file
        self._postfix: dict[str, Any] = {}
        self._initial = initial
        self._start = time.monotonic()
        self._every = max(1, math.ceil(total / STATUS_LINES))
        self._next_report = self._next_multiple(initial)
        self._reported_n = initial
        self._closed = False
        self._bar = None if self.disabled else self._make_bar()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps and show ``postfix`` values (e.g. ``reward=0.5``)."""
        self._postfix.update(postfix)
        self.n += n
        if self.silent:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(format_postfix(self._postfix), refresh=False)
            self._bar.update(n)
        elif self.n >= self._next_report or self.n >= self.total:
            self._print_status()

    def close(self) -> None:
        """Finish the bar; in status-line mode print a last line if steps went unreported."""
        if self._closed:
            return
        self._closed = True
        if self.silent:
            return
        if self._bar is not None:
            self._bar.close()
        elif self.n != self._reported_n:
            self._print_status()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def status_line(self) -> str:
        """The one-line status printed in status-line mode, for the current step."""
        elapsed = time.monotonic() - self._start
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.n) / rate if rate > 0 else None
        pct = 100.0 * self.n / self.total if self.total else 100.0
        timing = f"{tqdm.format_interval(elapsed)}<" + (
            tqdm.format_interval(remaining) if remaining is not None else "?"
        )
        prefix = f"{self.desc}: " if self.desc else ""
        line = f"{prefix}{self.n}/{self.total} ({pct:.0f}%) [{timing}, {_format_rate(rate, self.unit)}]"
        postfix = format_postfix(self._postfix)
        return f"{line} {postfix}" if postfix else line

    def _make_bar(self) -> tqdm:
        return tqdm(
            total=self.total,
            desc=self.desc or None,
            initial=self._initial,
            file=self._file,
            unit=self.unit,
            dynamic_ncols=True,
        )

    def _print_status(self) -> None:
        stream = self._file if self._file is not None else sys.stderr
        print(self.status_line(), file=stream, flush=True)
        self._reported_n = self.n
        self._next_report = self._next_multiple(self.n)

    def _next_multiple(self, n: int) -> int:
        return (n // self._every + 1) * self._every


def format_postfix(values: Mapping[str, Any]) -> str:
    """Format ``{"reward": 0.51234, "acc": 0.75}`` as ``"reward=0.512 acc=0.75"``.

    Floats get 3 significant digits (large ones in plain integer form, so
    ``tok/s=12345``), tensors are turned into numbers, anything else is ``str``-ed.
    """
    return " ".join(f"{key}={_format_value(value)}" for key, value in values.items())


def _format_value(value: Any) -> str:
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _format_rate(rate: float, unit: str) -> str:
    if rate <= 0:
        return f"? {unit}/s"
    if rate < 1:
        return f"{1 / rate:.3g} s/{unit}"
    return f"{rate:.3g} {unit}/s"


def _auto_disable(file: TextIO | None) -> bool:
    forced = os.environ.get(PROGRESS_ENV)
    if forced == "1":
        return False
    if forced == "0":
        return True
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())
