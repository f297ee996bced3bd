"""Wall time per stage of one step, and on CUDA the peak memory allocated in each."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


def _cuda_tracked() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@dataclass
class StageTimer:
    """Accumulates seconds per named stage, and when each stage ran (for timelines).
    On CUDA it also keeps each stage's peak allocated memory in MB (``memory``), nested
    stages included in their parents' peaks. ``held_bytes``: the most bytes of batch
    data the process held at once (see :meth:`hold`)."""

    times: dict[str, float] = field(default_factory=dict)
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    held_bytes: int = 0
    _peaks: list[int] = field(default_factory=list)  # running peak of each open stage

    def hold(self, nbytes: int) -> None:
        """The process holds ``nbytes`` of batch data at once now."""
        self.held_bytes = max(self.held_bytes, nbytes)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        tracked = _cuda_tracked()
        if tracked:
            if self._peaks:  # the open stage's peak so far, before the counter restarts
                self._peaks[-1] = max(self._peaks[-1], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self._peaks.append(0)
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + end - start
            self.spans.append((name, start, end))
            if tracked:
                peak = max(self._peaks.pop(), torch.cuda.max_memory_allocated())
                if self._peaks:
                    self._peaks[-1] = max(self._peaks[-1], peak)
                self.memory[name] = max(self.memory.get(name, 0.0), peak / 2**20)
