"""Dynamic placement: how many of a job's processes generate, revised at step boundaries.

With ``runtime.placement=dynamic`` every process holds every role. In a step
with split ``w``, processes ``N-w..N-1`` are rollout workers and ``0..N-w-1``
train; ``w = 0`` is the colocated placement. :class:`SplitController` reads the
stage times each step measured (the same reduced numbers on every process, so
every process decides the same) and moves ``w`` by one when one side idles:

- colocated (``w = 0``): when generation takes at least ``try_share`` of the step,
  try one rollout worker (its batch can then overlap the update);
- apart (``w > 0``): the trainers waited for batches for more than ``idle_share`` of
  the step time (means over the last ``dwell`` steps) -> one more worker; the workers
  waited for the trainers more than that -> one fewer, down to one worker (going
  back to colocated is decided by cost, below: one idle worker may still overlap
  more than it wastes);
- a move whose cost (step time per generated token over ``dwell`` steps) came
  out more than
  ``tolerance`` worse than the split it left is undone, and not retried for
  ``cooldown`` steps; a move away from idle workers is not reversed for
  ``cooldown`` steps either.

Each change is returned with its reason, for the run's log.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SplitController:
    processes: int
    dwell: int = 6
    idle_share: float = 0.2
    try_share: float = 0.3
    tolerance: float = 0.05
    cooldown: int = 20
    split: int = 0
    _since_change: int = 0
    _times: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    _previous: int | None = None
    _idle: list[tuple[float, float, float]] = field(default_factory=list)
    _blocked: dict[tuple[int, int], int] = field(default_factory=dict)

    def observe(self, step: int, metrics: dict[str, float]) -> tuple[int, str] | None:
        """Record step ``step``'s reduced metrics (run under the current split); return
        ``(new_split, reason)`` when the split should change, else None."""
        step_time = metrics.get("time/step", 0.0)
        # cost per generated token (summed time over summed tokens of the window): answer
        # lengths drift during training, so splits tried at different times are compared
        # per token, not per step
        self._times.setdefault(self.split, []).append((step_time, metrics.get("tokens", 1.0)))
        self._idle.append((step_time, metrics.get("time/rollout_wait", 0.0),
                           metrics.get("time/worker_idle", 0.0)))
        self._since_change += 1
        if self._since_change < self.dwell:
            return None
        recent = _cost(self._times[self.split][-self.dwell:])
        if self._previous is not None and self._previous in self._times:
            before = _cost(self._times[self._previous][-self.dwell:])
            if recent > before * (1 + self.tolerance):
                target, self._previous = self._previous, None
                self._blocked[(target, self.split)] = step + self.cooldown
                return self._change(target, step,
                                    f"undo: {1e3 * recent:.3f} ms/token with {self.split} "
                                    f"rollout worker(s) vs {1e3 * before:.3f} with {target}")
        self._previous = None
        if self.split == 0:
            generate = metrics.get("time/generate", 0.0)
            if self.processes > 1 and generate >= self.try_share * step_time:
                return self._try(1, step, f"generation is {generate / step_time:.0%} of the "
                                 "step: a rollout worker could overlap it")
            return None
        # idle shares over the window, not one step: single steps are noisy
        window = self._idle[-self.dwell:]
        step_time = sum(t for t, _, _ in window) / len(window)
        trainer_idle = sum(i for _, i, _ in window) / len(window)
        worker_idle = sum(i for _, _, i in window) / len(window)
        if trainer_idle > self.idle_share * step_time and self.split + 1 < self.processes:
            return self._try(self.split + 1, step, f"trainers idle {trainer_idle:.3f} s of "
                             f"{step_time:.3f} s waiting for batches")
        # (the last worker is not given up for being idle: without one nothing overlaps;
        # only a measured higher cost, the undo above, returns to colocated)
        if worker_idle > self.idle_share * step_time and self.split > 1:
            old = self.split
            change = self._try(old - 1, step, f"rollout workers idle {worker_idle:.3f} s "
                               f"of {step_time:.3f} s waiting for the trainers")
            if change is not None:  # measured, not guessed: do not come straight back
                self._blocked[(old - 1, old)] = step + self.cooldown
                self._previous = None
            return change
        return None

    def _try(self, split: int, step: int, reason: str) -> tuple[int, str] | None:
        if self._blocked.get((self.split, split), -1) > step:
            return None
        self._previous = self.split
        return self._change(split, step, reason)

    def _change(self, split: int, step: int, reason: str) -> tuple[int, str]:
        self.split = split
        self._since_change = 0
        self._idle = []
        self._times[split] = []
        return split, reason


def _cost(window: list[tuple[float, float]]) -> float:
    """Seconds per token over a window of (step seconds, tokens)."""
    return sum(t for t, _ in window) / max(sum(n for _, n in window), 1e-9)
