"""The dynamic placement: every process holds every role; how many generate is revised
at step boundaries from the measured stage times (see :mod:`plait.runtime.dynamic`).

A step with split ``w`` (``N`` processes):

- ``w = 0`` (colocated): every process generates and trains its own shard of the step's
  prompts, exactly as :class:`~plait.recipes.rl.RLTrainer` with parallel controllers.
- ``w > 0``: processes ``0..N-w-1`` train on the batch the workers ``N-w..N-1`` made.
  If the workers already made it during the previous step (the previous split also had
  workers), it was generated with weights one update old and the decoupled objective
  corrects for that; otherwise the workers generate it now while the trainers wait.
  Then, while the trainers train, the workers generate the next step's batch (when
  the next split also has workers) and send each next-step trainer its part.

Every process then joins the same gradient all-reduce (a worker's gradients are zeros)
and takes the same optimizer step, so weights and optimizer states stay identical on
every process and a role can change at any step boundary with nothing to move. The
split for step ``s + 2`` is decided after step ``s`` (the workers of step ``s + 1`` must
know whom they generate for); each change is printed and logged to
``placement.jsonl``, and every step logs ``placement/rollout_workers``.
"""

from __future__ import annotations

import json
import time

import torch

from plait.parallel.heartbeat import report
from plait.recipes.rl import RLTrainer
from plait.runtime.dynamic import SplitController
from plait.runtime.placement import Layout
from plait.runtime.transfer import ObjectChannel
from plait.telemetry.timing import StageTimer
from plait.train.experience import Experience


class DynamicTrainer(RLTrainer):
    """Data-parallel trainer whose processes switch between generating and training.
    Every process joins the DDP gradient all-reduce, trainer or not (a worker with a
    zero-weight ghost batch, after generating the next batch)."""

    def __init__(self, config, callbacks=(), *, dist=None, **kwargs):
        super().__init__(config, callbacks, dist=dist, **kwargs)
        self.channel = ObjectChannel(self.dist)
        self.controller = SplitController(self.dist.world_size)
        self.splits: dict[int, int] = {}
        self._rows: dict[int, list[dict]] = {}
        self._drawn_until = -1

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
            self._rows[self._drawn_until] = self.train_iter.next_batch(
                self.config.algo.prompts_per_step)
        for old in [s for s in self._rows if s < step - 1]:
            del self._rows[old]
        return self._rows[step]

    def on_start(self) -> None:
        self._first_step = self.global_step
        self._drawn_until = self.global_step - 1

    # ------------------------------------------------------------------ one step

    def step(self, step: int) -> dict[str, float]:
        timer, start, traffic_before = self.begin_step()
        split = self.split_at(step)
        trainers = self.dist.world_size - split
        is_worker = self.dist.rank >= trainers
        if split == 0:
            self._next_group_id = step * self.config.algo.prompts_per_step
            batch, metrics = self.collect(timer)
        elif is_worker:
            batch, metrics = self._serve(step, timer)
        else:
            batch, metrics = self._receive(step, timer)
        idle_start = time.perf_counter()
        self._ahead_s = 0.0
        metrics.update(self.rollout_metrics(batch))
        metrics.update(self.score_forwards(batch, timer))
        metrics.update(self.compute_advantages(batch))
        self._held_bytes = max(self._held_bytes, batch.nbytes)
        with timer.stage("update"):
            metrics.update(self.update(batch, step))
        if is_worker:  # a worker's share of the update is waiting for the trainers'
            busy = self._ahead_s if self.during_update is None else 0.0
            self.during_update = None
            timer.times["worker_idle"] = max(0.0, time.perf_counter() - idle_start - busy)
            metrics = {k: v for k, v in metrics.items()
                       if k.startswith(("time/", "reward/", "response_length/"))}
        with timer.stage("weight_sync"):
            self.engine.update_weights(None, step + 1)
        metrics.update(self._controller_load(traffic_before))
        metrics["placement/rollout_workers"] = float(split)
        metrics = self._timing(metrics, timer, start)
        self._revise(step, metrics)
        return metrics

    def draw_rows(self) -> list[dict]:
        return self.rows_for(self.global_step)

    def _generate_for(self, train_step: int, made_in: int, timer: StageTimer) -> None:
        """As a worker of step ``made_in``: generate batch ``train_step`` and send each of
        its trainers its part."""
        algo = self.config.algo
        layout = self.layout(train_step, made_in)
        worker = layout.worker_ranks.index(self.dist.global_rank)
        rows = self.rows_for(train_step)
        lo, hi = layout.worker_range(worker, len(rows))
        saved_step, self.global_step = self.global_step, train_step  # that step's seeds
        self._next_group_id = train_step * algo.prompts_per_step
        try:
            batch = self.rollout(rows[lo:hi], self.sampling_params(), algo.group_size, timer,
                                 first_index=lo, total=len(rows),
                                 seeds=self.sample_seeds(lo, hi - lo, 1))
        finally:
            self.global_step = saved_step
        self.send_parts(batch, layout, worker, lo, len(rows), self.channel, made_in, timer)

    def _serve(self, step: int, timer: StageTimer):
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
            self.during_update = ahead
        return self._ghost(), {}

    def _receive(self, step: int, timer: StageTimer):
        """A trainer's step under a split with workers: its part of the step's batch."""
        made_in = step - 1 if self.pregenerated(step) else step
        rows = self.rows_for(step)
        return self.receive_parts(self.layout(step, made_in), len(rows), self.channel, timer)

    def _ghost(self) -> Experience:
        """A zero-weight batch, so a worker runs the trainers' collectives in step."""
        algo = self.config.algo
        rows = max(algo.mini_batches, 1)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((rows, 1), pad, dtype=torch.long)
        return Experience(
            prompt_ids=ids.clone(), prompt_mask=torch.ones_like(ids), response_ids=ids.clone(),
            response_mask=torch.zeros(rows, 1), group_ids=torch.arange(rows),
            rewards=torch.zeros(rows), sampled_logprobs=torch.zeros(rows, 1),
            ghost=True).to(self.device)

    # ------------------------------------------------------------------ decisions

    def _revise(self, step: int, metrics: dict[str, float]) -> None:
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
