"""One process's role in a launched job, by placement: its process groups and links.

Every process of the job calls :func:`plan` with the whole-job :class:`Dist`.
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
from plait.runtime.remote import Remote
from plait.runtime.rollout_worker import RolloutWorker
from plait.runtime.transfer import ObjectChannel, WeightBroadcast


@dataclass
class Roles:
    """This process's part: its group (``dist``: the trainers, or the rollout workers),
    whether it is a rollout worker, and the links between the two (``remote``: None
    when every process trains and generates)."""

    world: Dist
    dist: Dist
    is_worker: bool = False
    remote: Remote | None = None
    push_group: object = None


def plan(config: Config, world: Dist) -> Roles:
    """The groups and links of this process under ``runtime.placement``."""
    runtime = config.runtime
    if runtime.placement in ("colocated", "dynamic"):
        return Roles(world, world)
    layout = Layout(runtime.num_ranks, runtime.rollout_workers)
    trainer_group = _new_group(layout.trainer_ranks, world)
    worker_group = _new_group(layout.worker_ranks, world)
    push_group = _new_group([0, *layout.worker_ranks], world)
    is_worker = layout.is_worker(world.global_rank)
    mine = layout.worker_ranks if is_worker else layout.trainer_ranks
    dist = world.subgroup(mine, worker_group if is_worker else trainer_group)
    remote = Remote(layout, ObjectChannel(world), push_group=push_group,
                    max_staleness=runtime.max_staleness, steps=config.train.steps,
                    bucket_bytes=int(runtime.weight_bucket_mb * (1 << 20)))
    return Roles(world, dist, is_worker, remote, push_group)


def serve_rollouts(config: Config, roles: Roles) -> dict:
    """A rollout worker's whole job: serve the trainers until the last batch."""
    roles.world.barrier()  # trainers first: rank 0 settles the run directory and the model
    with RolloutWorker(config, dist=roles.dist) as worker:
        roles.remote.weights = WeightBroadcast(worker.policy, roles.push_group, 0, roles.world,
                                               roles.remote.bucket_bytes)
        worker.serve(roles.remote)
        roles.remote.finish()
    return {}


def connect_trainer(roles: Roles, policy) -> None:
    """A trainer rank, once built: meet the workers, and (trainer 0) open the weight
    broadcast from ``policy``."""
    if roles.remote is None:
        return
    roles.world.barrier()
    if roles.world.global_rank == 0:
        roles.remote.weights = WeightBroadcast(policy, roles.push_group, 0, roles.world,
                                               roles.remote.bucket_bytes)


def _new_group(ranks: list[int], world: Dist):
    """``new_group`` must be called by every process, members or not."""
    if not world.active:
        return None
    return tdist.new_group(ranks)
