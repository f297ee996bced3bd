"""A rollout worker of the disaggregated and partial placements: generate, score, send.

The worker holds the policy weights for its engine, the rewards and the prompt
stream; it has no optimizer. For step ``s`` it makes sure its weights are at
least version ``s - max_staleness`` (receiving pushed versions in order, and
blocking only when it would otherwise be too far ahead), draws the same global
prompt batch every process draws for step ``s``, generates and scores its
contiguous range of it with the same per-prompt seeds a colocated job uses,
and posts each trainer its part without waiting for the trainer to take it. With
``runtime.stream_groups`` (where it applies, see
:attr:`~plait.recipes.rl.RLTrainer.streams_groups`) each group is posted as soon as it
is generated and scored, and the trainer runs its forward and backward passes while the
rest of the batch generates; the batch's last message carries the worker's stage times.
Under the partial placement it also holds the reference model and sends the
reference log-probs with the batch (computed on finished groups while the rest
still generate).

With ``runtime.partial_rollout`` the engine is never drained between batches: a
pushed version is taken between decode steps (the unfinished rows are re-prefilled
and go on under it), and batch ``s + 1`` is submitted as soon as the weights reach
version ``s + 1 - max_staleness``, so its rows fill the slots that batch ``s``'s
finished rows free while its long tail still runs. Batches are posted in order, each
the moment its last group is done. Its stage times then mean: ``generate``, from the
batch's submission to its last group (other batches' rows ran alongside);
``weights_wait``, blocked on a version with nothing to generate; ``weights_load``,
taking versions mid-generation; both since the previous post. Rewards are scored in
the order groups finish, so a batch's last rewards may wait behind groups of the next
batch that finished before them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from plait.parallel.heartbeat import report
from plait.recipes.rl import RLTrainer
from plait.recipes.session import PendingBatch
from plait.telemetry.timing import StageTimer


@dataclass
class _Submitted:
    """A batch of the partial rollout loop: submitted to the engine, not yet posted."""

    step: int
    pending: PendingBatch
    first: int  # its global prompt range starts here (this worker's share)
    total: int  # prompts in the global batch
    version: int  # the weights it was submitted under (its rows start no older)
    timer: StageTimer
    submitted: float


class RolloutWorker(RLTrainer):
    """Serves batches to the trainer ranks (see module doc); built like a trainer, never
    trains."""

    @property
    def sharded(self) -> bool:
        """A worker holds whole models to generate with, whatever the trainers do."""
        return False

    @property
    def releases_kv_cache(self) -> bool:
        """Nothing trains in a worker's process: its KV cache stays allocated."""
        return False

    def serve(self, remote) -> None:
        """``remote``: the job's :class:`~plait.runtime.job.Remote` (layout, channel,
        weight broadcast)."""
        cfg = self.config
        worker = remote.layout.worker_ranks.index(self.dist.global_rank)
        start = remote.channel.recv(0, kind="control")
        self.train_iter.load_state_dict(start["data"])
        self._next_group_id = start["next_group_id"]
        if cfg.runtime.placement == "partial" and self.uses_reference:
            # the reference role lives here: the warm-started model, model.ref_path, or
            # (neither) the starting model this worker loaded, before any weights arrive
            self.build_reference(start["reference_dir"])
        version = self._receive(remote)
        serve = self._serve_partial if cfg.runtime.partial_rollout else self._serve_in_turn
        serve(remote, worker, start["step"], version)
        remote.channel.wait()
        report("done serving")

    def _serve_in_turn(self, remote, worker: int, first_step: int, version: int) -> None:
        """One batch after the other, each generated from start to end (see module doc)."""
        cfg = self.config
        algo, k = cfg.algo, cfg.runtime.max_staleness
        posted, send_s = None, 0.0  # when posting the previous batch began, how long it took
        for step in range(first_step, cfg.train.steps):
            timer = StageTimer()
            with timer.stage("weights_wait"):
                while version < step - k:
                    report(f"step {step + 1}: waiting for weights v{step - k}")
                    version = self._receive(remote)
            report(f"step {step + 1}: generate (weights v{version})")
            self.global_step = step  # the seeds are those of this step
            rows = self.draw_rows()
            lo, hi = remote.layout.worker_range(worker, len(rows))
            if self.streams_groups and hasattr(self.engine, "stream"):
                posted, send_s = self._stream_batch(rows[lo:hi], lo, len(rows), remote, worker,
                                                    version, timer, posted, send_s)
                continue
            batch = self.rollout(rows[lo:hi], self.sampling_params(), algo.group_size, timer,
                                 fuse=self.fuse_forwards, first_index=lo, total=len(rows),
                                 seeds=self.sample_seeds(lo, hi - lo, 1))
            posted, send_s = self._post(batch, remote, worker, lo, len(rows), version, timer,
                                        posted, send_s)

    def _serve_partial(self, remote, worker: int, first_step: int, version: int) -> None:
        """The ``runtime.partial_rollout`` loop (see the module doc)."""
        cfg = self.config
        k, last, n = cfg.runtime.max_staleness, cfg.train.steps, cfg.algo.group_size
        params, weights = self.sampling_params(), remote.weights
        queue: deque[_Submitted] = deque()
        owner: dict[int, tuple[_Submitted, int]] = {}  # engine prompt index -> batch, row
        next_step, next_index = first_step, 0
        posted, send_s, waited, loaded = None, 0.0, 0.0, 0.0

        def due() -> bool:  # the next version will be pushed
            return remote.pushed(version + 1)

        def submit(step: int) -> None:
            nonlocal next_index
            self.global_step = step  # the seeds are those of this step
            rows = self.draw_rows()
            lo, hi = remote.layout.worker_range(worker, len(rows))
            pending = self.pending_batch(rows[lo:hi], fuse=self.fuse_forwards)
            batch = _Submitted(step, pending, lo, len(rows), version, StageTimer(),
                               time.perf_counter())
            self.engine.submit(pending.prompts, params, n, seeds=self.sample_seeds(lo, hi - lo, 1),
                               first_index=next_index)
            for row in range(hi - lo):
                owner[next_index + row] = batch, row
            next_index += hi - lo
            queue.append(batch)
            report(f"step {step + 1}: generate (weights v{version})")

        def post(batch: _Submitted) -> None:
            nonlocal posted, send_s, waited, loaded
            timer = batch.timer
            timer.times["generate"] = time.perf_counter() - batch.submitted
            timer.times["weights_wait"], timer.times["weights_load"] = waited, loaded
            waited = loaded = 0.0
            experience = self.finish_batch(batch.pending, timer, first_index=batch.first,
                                           total=batch.total).to(self.device)
            posted, send_s = self._post(experience, remote, worker, batch.first, batch.total,
                                        batch.version, timer, posted, send_s)

        with self._diverged_generation(), self.autocast():
            while queue or next_step < last:
                while next_step < last and version >= next_step - k:
                    submit(next_step)
                    next_step += 1
                if not self.engine.busy:  # every submitted batch is posted: wait for weights
                    report(f"step {next_step + 1}: waiting for weights v{next_step - k}")
                    began = time.perf_counter()
                    version = self._receive(remote)
                    waited += time.perf_counter() - began
                    continue
                for index, group in self.engine.stream(lambda: due() and weights.poll()):
                    batch, row = owner.pop(index)
                    self.take_group(batch.pending, row, group, batch.timer)
                    while queue and queue[0].pending.complete:
                        post(queue.popleft())
                if due() and weights.poll():  # paused for a new version: take it now
                    began = time.perf_counter()
                    version = self._receive(remote)
                    loaded += time.perf_counter() - began

    def _stream_batch(self, rows: list[dict], first: int, total: int, remote, worker: int,
                      version: int, timer: StageTimer, posted: float | None, send_s: float
                      ) -> tuple[float, float]:
        """Generate ``rows`` (prompts ``first..`` of a global batch of ``total``) and send
        each finished group to its trainer once its rewards are in (``runtime.
        stream_groups``): the engine pauses between decode runs when a reward has come in,
        the groups scored so far go out, and generation goes on. The final message to each
        trainer carries the rest and the batch's stage times. Returns as :meth:`_post`."""
        cfg = self.config
        pending = self.pending_batch(rows, fuse=self.fuse_forwards)
        first_id = self._next_group_id + first
        self._next_group_id += total
        unsent: list[int] = []
        sending = 0.0  # time spent sending parts, out of the generation time

        def scored() -> bool:
            return any(pending.futures[i].done() for i in unsent)

        def send_scored() -> None:
            nonlocal sending
            ready = [i for i in unsent if pending.futures[i].done()]
            if not ready:
                return
            began = time.perf_counter()
            for i in ready:
                unsent.remove(i)
            part = self._with_reference(self.finish_groups(pending, ready, timer, first_id),
                                        timer)
            self.send_parts(part, remote.layout, worker, first, total, remote.channel, version,
                            timer, final=False, first_id=first_id)
            sending += time.perf_counter() - began

        began = time.perf_counter()
        with self._diverged_generation(), self.gathered(self.policy), self.autocast():
            self.engine.reset()
            self.engine.submit(pending.prompts, self.sampling_params(), cfg.algo.group_size,
                               seeds=self.sample_seeds(first, len(rows), 1))
            while True:
                for index, group in self.engine.stream(scored):
                    self.take_group(pending, index, group, timer)
                    unsent.append(index)
                    send_scored()
                if not self.engine.busy:
                    break
                send_scored()
        timer.times["generate"] = time.perf_counter() - began - sending
        rest = self.finish_groups(pending, unsent, timer, first_id) if unsent else None
        return self._post(rest, remote, worker, first, total, version, timer, posted, send_s,
                          first_id=first_id)

    def _with_reference(self, batch, timer: StageTimer):
        """``batch`` with the reference log-probs the generation did not fuse."""
        if batch is not None and self.reference is not None and batch.ref_logprobs is None:
            with timer.stage("reference"):
                batch.ref_logprobs = self._per_token(batch, lambda m: self._logprobs(
                    self.reference, m))
        return batch

    def _post(self, batch, remote, worker: int, first: int, total: int, version: int,
              timer: StageTimer, posted: float | None, send_s: float, *,
              first_id: int | None = None) -> tuple[float, float]:
        """Add the reference log-probs the generation did not fuse, and send each trainer
        its part (the final message of the batch; ``batch`` None when the rest was sent
        group by group; ``first_id`` as for :meth:`send_parts`). ``posted``/``send_s``: when
        posting the previous batch began and how long it took (this batch's cycle runs post
        to post); returns this post's pair."""
        batch = self._with_reference(batch, timer)
        now = time.perf_counter()
        if posted is not None:
            timer.times["cycle"] = now - posted
            timer.times["send"] = send_s
        self.send_parts(batch, remote.layout, worker, first, total, remote.channel, version,
                        timer, first_id=first_id)
        return now, time.perf_counter() - now

    def _receive(self, remote) -> int:
        """Take the next pushed version, and post the receive of the one after it (if the
        trainer will push it: the version a batch still needs) so that it arrives while
        this worker generates."""
        version = remote.weights.receive()
        self.engine.update_weights(None, version)
        if remote.pushed(version + 1):
            remote.weights.prefetch()
        return version

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, float]:  # pragma: no cover - trainers evaluate
        raise RuntimeError("rollout workers do not evaluate")
