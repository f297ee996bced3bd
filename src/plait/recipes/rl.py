"""Online RL: GRPO (and its descendants) and PPO with a critic.

One step, under every placement, is the dataflow of :meth:`RLTrainer.step`:

    1-3. prompts, generation, rewards     (the batch source: the placement decides how)
    4.   reference / old log-probs, values (teacher-forced forward passes)
    5.   advantages                        (GRPOVI adjustment, KL penalty, the estimator)
    6.   update                            (epochs x mini-batches x micro-batches; PTX and
                                            selective rehearsal mixed into each step)
    7.   weight sync                       (the generators get the new weights)

then the run loop logs, evaluates and checkpoints (:class:`~plait.recipes.session.Session`).
With several ranks (parallel controllers) every rank runs this same step on its own
contiguous shard of the global prompt batch; the ranks meet only in collectives (loss
normalisers, whitening statistics, the gradient all-reduce, the non-finite check and
the metric reduction), so the update equals the one-rank update.
"""

from __future__ import annotations

import time

from plait.config import Config
from plait.data.datasets import load_text_rows
from plait.parallel.dist import Dist
from plait.recipes.session import Session
from plait.recipes.sft import check_sft_rows
from plait.runtime import job
from plait.runtime.dynamic import DynamicSource
from plait.runtime.remote import Receiver, Remote, RemoteSource, StreamedSource
from plait.runtime.sources import (
    BatchSource,
    ColocatedSource,
    SingleControllerSource,
    controller_load,
    step_metrics,
    traffic_mark,
)
from plait.telemetry.timing import StageTimer
from plait.train.rehearsal import Rehearsal
from plait.train.scoring import Advantages, KLCoefficient, RewardShaper, Scorer
from plait.train.supervised import PtxLoss
from plait.train.update import Updater


class RLTrainer(Session):
    """GRPO / PPO training: one process, or one trainer rank of a job (``remote``: the
    links to the rollout workers when they run apart)."""

    def __init__(self, config: Config, callbacks=(), *, dist: Dist | None = None,
                 remote: Remote | None = None, **kwargs):
        super().__init__(config, callbacks, dist=dist, **kwargs)
        models = self.models
        self.kl_coef = KLCoefficient(config.algo, state=lambda: self.state)
        self.shape = RewardShaper(config, state=lambda: self.state)
        self.scorer = Scorer(config, self.settings, policy=models.policy,
                             autocast=models.autocast, gathered=models.gathered)
        self.advantages = Advantages(config, self.settings, self.dist,
                                     (self.reward_low, self.reward_high), self.kl_coef)
        self.updater = Updater(config, self.settings, self.dist, models, skips=self.skips,
                               checkpoint_root=self.checkpoint_root, kl_coef=self.kl_coef)
        if config.algo.ptx_coef > 0:
            self.updater.mixed.append(PtxLoss(config, self._ptx_rows(), self.encode_prompt,
                                              self.tokenizer, self.dist, self.device))
        self.rehearsal = None
        if config.rehearsal.coef > 0:
            self.rehearsal = Rehearsal(config, self.tokenizer.pad_token_id, self.dist,
                                       self.device, state=lambda: self.state)
            self.updater.mixed.append(self.rehearsal)
        self.source = self._source(remote)

    def step(self, step: int) -> dict[str, float]:
        """One RL step (the numbered stages of the module doc)."""
        timer, start, traffic = StageTimer(), time.perf_counter(), traffic_mark(self.dist)
        batch, metrics = self.source.collect(step, timer)                       # 1-3
        metrics.update(self.shape.step_sums())
        if self.rehearsal is not None:  # the samples join the rehearsal pool
            with timer.stage("rehearsal"):  # (steps counted from 1, as logged)
                self.rehearsal.observe(batch, step + 1)
                if self.rehearsal.due(step + 1):
                    metrics.update(self.rehearsal.select(self.models.policy, step + 1))
        if batch is None:  # dynamic sampling found no group to learn from, on any rank
            metrics["skipped_no_signal"] = 1.0
            metrics = step_metrics(self.dist, metrics, timer, start, self.skips.total)
            metrics.update(self.shape.update(metrics))
            return metrics
        metrics.update(self.scorer.score_forwards(batch, timer))               # 4
        metrics.update(self.advantages(batch))                                 # 5
        timer.hold(batch.nbytes)
        with timer.stage("update"):
            metrics.update(self.updater.update(batch, step))                   # 6
        metrics = self.source.after_update(step, metrics, timer)               # 7
        metrics.update(controller_load(self.dist, timer, traffic))
        metrics = step_metrics(self.dist, metrics, timer, start, self.skips.total)
        metrics.update(self.kl_coef.update(metrics))                            # adaptive KL
        metrics.update(self.shape.update(metrics))                              # reward stats
        self.source.observe(step, metrics)
        return metrics

    def setup_training(self, *, resuming: bool = False, load_weights=None) -> None:
        super().setup_training(resuming=resuming, load_weights=load_weights)
        self.scorer.reference, self.scorer.critic = self.models.reference, self.models.critic

    def on_start(self) -> None:
        self.source.start(step=self.global_step, data=self.train_iter.state_dict(),
                          reference_dir=self.state.get("reference_dir"))

    def fused_forwards(self, chunk):
        return self.scorer.fused_forwards(chunk)

    def fuse(self) -> bool:
        """Forward passes on finished groups during generation: not with sharded models,
        whose gathering every rank must do at the same point."""
        models = self.models
        has_passes = models.reference is not None or models.critic is not None
        return self.config.rollout.fuse_forwards and has_passes and not models.sharded

    def draw(self, step: int) -> list[dict]:
        """The next global prompt batch (the same on every rank)."""
        return self.train_iter.next_batch(self.config.algo.prompts_per_step)

    def _ptx_rows(self) -> list[dict]:
        """PTX rows: data.ptx_path, else the training rows (their answers)."""
        if self.config.data.ptx_path is not None:
            return load_text_rows(self.config.data.ptx_path)
        check_sft_rows(self.train_rows, "algo.ptx_coef", "data.ptx_path")
        return self.train_rows

    def _source(self, remote: Remote | None) -> BatchSource:
        """The batch source of this job's placement."""
        config, dist, generator = self.config, self.dist, self.generator
        common = dict(reward_high=self.reward_high, fuse=self.fuse, shape=self.shape)
        if config.runtime.controller == "single" and dist.active:
            return SingleControllerSource(config, dist, generator, self.draw, **common,
                                          scorer=self.scorer, advantages=self.advantages)
        receiver = Receiver(config, dist, self.device, reward_high=self.reward_high,
                            pad_token_id=self.tokenizer.pad_token_id, shape=self.shape)
        if config.runtime.placement == "dynamic":
            return DynamicSource(config, dist, generator, self.train_iter, receiver,
                                 self.updater, run_dir=self.run_dir, **common)
        if remote is None:
            return ColocatedSource(config, dist, generator, self.draw, **common)
        parts = (config, dist, generator, self.draw, remote, receiver)
        gathered = lambda: self.models.gathered(self.models.policy)  # noqa: E731
        if self.settings.streams_groups:
            return StreamedSource(*parts, gathered=gathered, settings=self.settings,
                                  scorer=self.scorer, advantages=self.advantages,
                                  updater=self.updater)
        return RemoteSource(*parts, gathered=gathered)


def train(config: Config, callbacks=(), dist=None) -> dict:
    """Run an RL job end to end (as one rank of ``dist`` when given) and return its
    summary."""
    with RLTrainer(config, callbacks=callbacks, dist=dist) as trainer:
        return trainer.run()


def run_job(config: Config, world: Dist) -> dict:
    """One process's part of a launched RL job: a trainer rank (the trainers' summary)
    or, under a placement with rollout workers apart, a worker (``{}``)."""
    roles = job.plan(config, world)
    if roles.is_worker:
        return job.serve_rollouts(config, roles)
    with RLTrainer(config, dist=roles.dist, remote=roles.remote) as trainer:
        job.connect_trainer(roles, trainer.policy)
        try:
            return trainer.run()
        finally:
            if roles.remote is not None:
                roles.remote.finish()
