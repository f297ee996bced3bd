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

:class:`DynamicSource` is the batch source of such a job. A step with split ``w``:

- ``w = 0``: every process generates and trains its own shard of the step's prompts,
  exactly as the colocated placement with parallel controllers.
- ``w > 0``: processes ``0..N-w-1`` train on the batch the workers ``N-w..N-1`` made.
  If the workers already made it during the previous step (the previous split also
  had workers), it was generated with weights one update old and the decoupled
  objective corrects for that; otherwise the workers generate it now while the
  trainers wait. Then, while the trainers train, the workers generate the next step's
  batch (when the next split also has workers) and send each next-step trainer its
  part.

Every process joins the same gradient all-reduce (a worker's gradients are zeros,
from a zero-weight batch) and takes the same optimizer step, so weights and optimizer
states stay identical on every process and a role can change at any step boundary
with nothing to move. The split for step ``s + 2`` is decided after step ``s`` (the
workers of step ``s + 1`` must know whom they generate for); each change is printed
and logged to ``placement.jsonl``, and every step logs ``placement/rollout_workers``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plait.parallel.heartbeat import report
from plait.runtime.generation import sample_seeds, sampling_params
from plait.runtime.placement import Layout
from plait.runtime.remote import send_parts
from plait.runtime.sources import BatchSource, ColocatedSource, rollout_metrics
from plait.runtime.transfer import ObjectChannel
from plait.telemetry.timing import StageTimer
from plait.train.experience import Experience


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


class DynamicSource(BatchSource):
    """The dynamic placement's batches (see module doc): the colocated source under
    split 0; a trainer's part from the workers, or a worker's zero-weight share, under a
    split with workers."""

    def __init__(self, config, dist, generator, prompts, receiver, updater, *,
                 reward_high: float, fuse, run_dir: Path, shape=None):
        self.config, self.dist, self.generator = config, dist, generator
        self.prompts, self.receiver = prompts, receiver
        self.updater, self.run_dir = updater, run_dir
        self.colocated = ColocatedSource(config, dist, generator, self.rows_for,
                                         reward_high=reward_high, fuse=fuse, shape=shape)
        self.channel = ObjectChannel(dist)
        self.controller = SplitController(dist.world_size)
        self.splits: dict[int, int] = {}
        self._rows: dict[int, list[dict]] = {}
        self._drawn_until = -1
        self._first_step = 0
        self._worker_since: float | None = None  # a worker's step: when its own work ended
        self._ahead_s = 0.0

    # ------------------------------------------------------------------ bookkeeping

    def split_at(self, step: int) -> int:
        return self.splits.get(step, 0)

    def layout(self, train_step: int, made_in: int) -> Layout:
        """Routing of batch ``train_step`` made by the workers of step ``made_in``."""
        n = self.dist.world_size
        workers = self.split_at(made_in)
        return Layout(n - self.split_at(train_step), workers, worker_base=n - workers)

    def pregenerated(self, step: int) -> bool:
        """Batch ``step`` was made during step ``step - 1`` (both splits have workers)."""
        return step > self._first_step and self.split_at(step - 1) > 0 and \
            self.split_at(step) > 0

    def rows_for(self, step: int) -> list[dict]:
        """The global prompt batch of ``step``: every process draws each step once, in
        order, whether it needs it a step early (as a worker) or on time."""
        while self._drawn_until < step:
            self._drawn_until += 1
            self._rows[self._drawn_until] = self.prompts.next_batch(
                self.config.algo.prompts_per_step)
        for old in [s for s in self._rows if s < step - 1]:
            del self._rows[old]
        return self._rows[step]

    def start(self, *, step: int, data: dict, reference_dir: str | None) -> None:
        self._first_step = step
        self._drawn_until = step - 1

    # ------------------------------------------------------------------ one step

    def collect(self, step: int, timer: StageTimer) -> tuple[Experience, dict]:
        split = self.split_at(step)
        self._worker_since = None
        if split == 0:
            self.generator.next_group_id = step * self.config.algo.prompts_per_step
            return self.colocated.collect(step, timer)
        if self.dist.rank >= self.dist.world_size - split:
            batch, metrics = self._serve(step, timer), {}
            self._worker_since, self._ahead_s = time.perf_counter(), 0.0
        else:
            made_in = step - 1 if self.pregenerated(step) else step
            batch, metrics = self.receiver.receive(self.layout(step, made_in),
                                                   len(self.rows_for(step)), self.channel,
                                                   timer, step)
        metrics.update(rollout_metrics(self.config, batch, self.dist))
        return batch, metrics

    def after_update(self, step: int, metrics: dict, timer: StageTimer) -> dict:
        if self._worker_since is not None:  # a worker's share of the update waited for
            # the trainers' (less the next batch it generated meanwhile)
            busy = self._ahead_s if self.updater.during_update is None else 0.0
            self.updater.during_update = None
            timer.times["worker_idle"] = max(0.0, time.perf_counter() - self._worker_since
                                             - busy)
            metrics = {k: v for k, v in metrics.items()
                       if k.startswith(("time/", "reward/", "response_length/"))}
        metrics = super().after_update(step, metrics, timer)
        metrics["placement/rollout_workers"] = float(self.split_at(step))
        return metrics

    def _generate_for(self, train_step: int, made_in: int, timer: StageTimer) -> None:
        """As a worker of step ``made_in``: generate batch ``train_step`` and send each of
        its trainers its part."""
        algo = self.config.algo
        layout = self.layout(train_step, made_in)
        worker = layout.worker_ranks.index(self.dist.global_rank)
        rows = self.rows_for(train_step)
        lo, hi = layout.worker_range(worker, len(rows))
        self.generator.next_group_id = train_step * algo.prompts_per_step
        batch = self.generator.rollout(
            rows[lo:hi], sampling_params(self.config), algo.group_size, timer, first_index=lo,
            total=len(rows), seeds=sample_seeds(self.config.train.seed, train_step, lo,
                                                hi - lo, 1))
        send_parts(batch, layout, worker, lo, len(rows), self.channel, made_in, timer)

    def _serve(self, step: int, timer: StageTimer) -> Experience:
        """A worker's step: this step's batch if nobody made it yet, then a zero-weight
        share of the update, inside which (after the last collective that precedes the
        trainers' backward, before the gradient sum) it makes the next step's batch."""
        if not self.pregenerated(step):
            report(f"step {step + 1}: generate for this step")
            self._generate_for(step, step, timer)
        nxt = step + 1
        if nxt < self.config.train.steps and self.split_at(nxt) > 0:
            def ahead():
                report(f"step {step + 1}: generate for step {nxt + 1}")
                began = time.perf_counter()
                self._generate_for(nxt, step, timer)
                self._ahead_s = time.perf_counter() - began
            self.updater.during_update = ahead
        return self._ghost()

    def _ghost(self) -> Experience:
        """A zero-weight batch, so a worker runs the trainers' collectives in step."""
        rows = max(self.config.algo.mini_batches, 1)
        pad = self.generator.tokenizer.pad_token_id
        ids = torch.full((rows, 1), pad, dtype=torch.long)
        return Experience(
            prompt_ids=ids.clone(), prompt_mask=torch.ones_like(ids), response_ids=ids.clone(),
            response_mask=torch.zeros(rows, 1), group_ids=torch.arange(rows),
            rewards=torch.zeros(rows), sampled_logprobs=torch.zeros(rows, 1),
            ghost=True).to(self.generator.device)

    # ------------------------------------------------------------------ decisions

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """After step ``step``: the split of step ``step + 2``. Steps between a decision
        and its effect, and the first step with workers (its batch generated while the
        trainers waited), are not the split's steady time and are not observed."""
        target = step + 2
        change = None
        split = self.split_at(step)
        settled = split == 0 or self.pregenerated(step)  # not the catch-up step of a switch
        if split == self.controller.split and settled and target < self.config.train.steps:
            change = self.controller.observe(step, metrics)
        self.splits[target] = self.controller.split
        if change is not None and self.dist.is_main:
            split, reason = change
            print(f"plait: placement: from step {target + 1}: {split} of "
                  f"{self.dist.world_size} processes generate ({reason})", flush=True)
            with open(self.run_dir / "placement.jsonl", "a") as handle:
                handle.write(json.dumps({"step": target + 1, "rollout_workers": split,
                                         "reason": reason}) + "\n")
