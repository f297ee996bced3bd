"""One process's part of a job, by placement: build its groups, its role, and run.

Every process of the job calls :func:`run_job` with the whole-job :class:`Dist`.
Process groups are created in the same order everywhere (a torch.distributed
rule): the trainer group (DDP, metric reductions), the worker group, and the
push group (trainer 0 + the rollout workers) that carries weight broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as tdist

from plait.config import Config
from plait.parallel.dist import Dist
from plait.runtime.placement import Layout
from plait.runtime.transfer import ObjectChannel, WeightBroadcast


@dataclass
class Remote:
    """What a trainer or rollout worker of a disaggregated job uses to reach the others."""

    layout: Layout
    channel: ObjectChannel
    weights: WeightBroadcast | None = None
    push_group: object = None
    max_staleness: int = 0
    steps: int = 0

    def start(self, trainer) -> None:
        """Trainer 0, before the first step: tell each worker where the job stands and push
        the starting weights (version = the step the job resumes from)."""
        if trainer.dist.global_rank == 0:
            state = {"step": trainer.global_step, "data": trainer.train_iter.state_dict(),
                     "next_group_id": trainer._next_group_id,
                     "reference_dir": trainer.state.get("reference_dir")}
            for worker in self.layout.worker_ranks:
                self.channel.send(state, worker, kind="control")
        self._push(trainer, trainer.global_step)

    def pushed(self, version: int) -> bool:
        """Whether ``version`` is pushed after the update that makes it: only while some
        worker will still need it (batch ``s`` needs weights ``>= s - max_staleness``, and
        the last batch is ``steps - 1``)."""
        return version + self.max_staleness <= self.steps - 1

    def after_update(self, trainer, version: int) -> None:
        """Trainer 0 pushes ``version`` if :meth:`pushed` says so."""
        if self.pushed(version):
            self._push(trainer, version)

    def _push(self, trainer, version: int) -> None:
        """Every trainer calls this: sharded trainers gather the policy together, and
        trainer 0 snapshots and sends it."""
        with trainer.gathered(trainer.policy):
            if trainer.dist.global_rank == 0:
                self.weights.push(version)

    def finish(self) -> None:
        self.channel.wait()
        if self.weights is not None:
            self.weights.wait()


def run_job(config: Config, world: Dist) -> dict:
    """Run this process's role; the trainers' summary (a worker returns ``{}``)."""
    from plait.recipes.rl import RLTrainer

    runtime = config.runtime
    if runtime.placement == "colocated":
        with RLTrainer(config, dist=world) as trainer:
            return trainer.run()
    if runtime.placement == "dynamic":
        from plait.recipes.dynamic import DynamicTrainer

        with DynamicTrainer(config, dist=world) as trainer:
            return trainer.run()
    layout = Layout(runtime.num_ranks, runtime.rollout_workers)
    trainer_group = _new_group(layout.trainer_ranks, world)
    worker_group = _new_group(layout.worker_ranks, world)
    push_ranks = [0, *layout.worker_ranks]
    push_group = _new_group(push_ranks, world)
    is_worker = layout.is_worker(world.global_rank)
    mine = layout.worker_ranks if is_worker else layout.trainer_ranks
    dist = world.subgroup(mine, worker_group if is_worker else trainer_group)
    remote = Remote(layout, ObjectChannel(world), push_group=push_group,
                    max_staleness=runtime.max_staleness, steps=config.train.steps)
    bucket = int(runtime.weight_bucket_mb * (1 << 20))
    if is_worker:
        from plait.recipes.rollout_worker import RolloutWorker

        world.barrier()  # trainers first: rank 0 settles the run directory and the model
        with RolloutWorker(config, dist=dist) as worker:
            remote.weights = WeightBroadcast(worker.policy, push_group, 0, world, bucket)
            worker.serve(remote)
            remote.finish()
        return {}
    with RLTrainer(config, dist=dist) as trainer:
        world.barrier()
        if world.global_rank == 0:
            remote.weights = WeightBroadcast(trainer.policy, push_group, 0, world, bucket)
        trainer.remote = remote
        try:
            return trainer.run()
        finally:
            remote.finish()


def _new_group(ranks: list[int], world: Dist):
    """``new_group`` must be called by every process, members or not."""
    if not world.active:
        return None
    return tdist.new_group(ranks)
