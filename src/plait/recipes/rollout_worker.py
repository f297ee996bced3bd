"""A rollout worker of the disaggregated and partial placements: generate, score, send.

The worker holds the policy weights for its engine, the rewards and the prompt
stream; it has no optimizer. For step ``s`` it makes sure its weights are at
least version ``s - max_staleness`` (receiving pushed versions in order, and
blocking only when it would otherwise be too far ahead), draws the same global
prompt batch every process draws for step ``s``, generates and scores its
contiguous range of it with the same per-prompt seeds a colocated job uses,
and posts each trainer its part without waiting for the trainer to take it.
Under the partial placement it also holds the reference model and sends the
reference log-probs with the batch (computed on finished groups while the rest
still generate).
"""

from __future__ import annotations

import time

import torch

from plait.recipes.rl import RLTrainer
from plait.runtime.heartbeat import report
from plait.telemetry.timing import StageTimer


class RolloutWorker(RLTrainer):
    """Serves batches to the trainer ranks (see module doc); built like a trainer, never
    trains."""

    @property
    def sharded(self) -> bool:
        """A worker holds whole models to generate with, whatever the trainers do."""
        return False

    def serve(self, remote) -> None:
        """``remote``: the job's :class:`~plait.runtime.job.Remote` (layout, channel,
        weight broadcast)."""
        cfg = self.config
        algo, k = cfg.algo, cfg.runtime.max_staleness
        worker = remote.layout.worker_ranks.index(self.dist.global_rank)
        start = remote.channel.recv(0, kind="control")
        self.train_iter.load_state_dict(start["data"])
        self._next_group_id = start["next_group_id"]
        if cfg.runtime.placement == "partial" and self.uses_reference:
            # the reference role lives here: the warm-started model, model.ref_path, or
            # (neither) the starting model this worker loaded, before any weights arrive
            self.build_reference(start["reference_dir"])
        version = self._receive(remote)
        posted, send_s = None, 0.0  # when posting the previous batch began, how long it took
        for step in range(start["step"], cfg.train.steps):
            timer = StageTimer()
            with timer.stage("weights_wait"):
                while version < step - k:
                    report(f"step {step + 1}: waiting for weights v{step - k}")
                    version = self._receive(remote)
            report(f"step {step + 1}: generate (weights v{version})")
            self.global_step = step  # the seeds are those of this step
            rows = self.draw_rows()
            lo, hi = remote.layout.worker_range(worker, len(rows))
            batch = self.rollout(rows[lo:hi], self.sampling_params(), algo.group_size, timer,
                                 fuse=self.fuse_forwards, first_index=lo, total=len(rows),
                                 seeds=self.sample_seeds(lo, hi - lo, 1))
            if self.reference is not None and batch.ref_logprobs is None:
                with timer.stage("reference"):
                    batch.ref_logprobs = self._per_token(batch, lambda m: self._logprobs(
                        self.reference, m))
            now = time.perf_counter()
            if posted is not None:  # from posting the previous batch to posting this one,
                # and how long posting the previous one took (this one's is not over yet)
                timer.times["cycle"] = now - posted
                timer.times["send"] = send_s
            self.send_parts(batch, remote.layout, worker, lo, len(rows), remote.channel,
                            version, timer)
            posted, send_s = now, time.perf_counter() - now
        remote.channel.wait()
        report("done serving")

    def _receive(self, remote) -> int:
        version = remote.weights.receive()
        self.engine.update_weights(None, version)
        return version

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, float]:  # pragma: no cover - trainers evaluate
        raise RuntimeError("rollout workers do not evaluate")
