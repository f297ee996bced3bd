"""Who runs where: the ranks of a job and the roles they hold.

- ``colocated``: ranks ``0..N-1`` are all trainers, each with its own rollout
  engine and rewards, time-shared (on GPU the engine's KV cache is released
  while the rank trains: the hybrid engine).
- ``disaggregated``: ranks ``0..N-1`` train (actor, reference, critic) and ranks
  ``N..N+W-1`` are rollout workers (engine + rewards). Prompt batch ``s`` is
  split into W contiguous worker ranges; each worker generates and scores its
  range and sends each trainer the part of it that falls in the trainer's own
  range. Trainer 0 pushes weights to the workers after each update; a worker
  generates batch ``s`` with weights at least version ``s - max_staleness``.

Example:
    >>> layout = Layout(trainers=2, workers=1)
    >>> layout.worker_targets(0, prompts=8)    # [(0, 0, 4), (1, 4, 8)]
    >>> layout.trainer_sources(1, prompts=8)   # [(2, 4, 8)]: global rank 2 sends 4..8
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.parallel.dist import shard_bounds


@dataclass(frozen=True)
class Layout:
    trainers: int
    workers: int = 0
    worker_base: int | None = None  # global rank of worker 0 (default: right after trainers)

    @property
    def first_worker(self) -> int:
        return self.trainers if self.worker_base is None else self.worker_base

    @property
    def trainer_ranks(self) -> list[int]:
        return list(range(self.trainers))

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(self.first_worker, self.first_worker + self.workers))

    def is_worker(self, global_rank: int) -> bool:
        return global_rank in self.worker_ranks

    def worker_range(self, worker: int, prompts: int) -> tuple[int, int]:
        return shard_bounds(prompts, worker, self.workers)

    def trainer_range(self, trainer: int, prompts: int) -> tuple[int, int]:
        return shard_bounds(prompts, trainer, self.trainers)

    def worker_targets(self, worker: int, prompts: int) -> list[tuple[int, int, int]]:
        """``(trainer global rank, lo, hi)`` for each trainer that gets prompts ``lo..hi``
        (global indices) of worker ``worker``'s range."""
        mine = self.worker_range(worker, prompts)
        others = [self.trainer_range(t, prompts) for t in range(self.trainers)]
        return _overlaps(mine, others, first_rank=0)

    def trainer_sources(self, trainer: int, prompts: int) -> list[tuple[int, int, int]]:
        """``(worker global rank, lo, hi)`` for each worker sending this trainer prompts."""
        mine = self.trainer_range(trainer, prompts)
        others = [self.worker_range(w, prompts) for w in range(self.workers)]
        return _overlaps(mine, others, first_rank=self.first_worker)


def _overlaps(mine: tuple[int, int], others: list[tuple[int, int]], first_rank: int
              ) -> list[tuple[int, int, int]]:
    """``(first_rank + i, lo, hi)`` for each range ``others[i]`` that meets ``mine``."""
    out = []
    for i, (olo, ohi) in enumerate(others):
        lo, hi = max(mine[0], olo), min(mine[1], ohi)
        if lo < hi:
            out.append((first_rank + i, lo, hi))
    return out
