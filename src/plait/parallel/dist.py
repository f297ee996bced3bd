"""This process's place in a job: its rank, the collectives it meets the others
in, and a count of every byte it sends and receives through them.

A job of one process uses :meth:`Dist.single` and every collective is a no-op,
so the recipes have one code path. With several ranks, each rank is a full
controller; the only traffic between them is what passes through this class:

- ``all_reduce`` of gradients (by DDP, counted separately from the model size),
  metric sums and loss normalisers;
- ``broadcast`` of weights (after a warm start on rank 0);
- ``gather_objects`` / ``scatter_objects`` (the single-controller mode only).

Example:
    >>> dist = Dist.from_env()               # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    >>> lo, hi = dist.shard_bounds(8)        # this rank's prompts of a global batch of 8
    >>> total = dist.all_reduce(torch.tensor([3.0]))
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from plait.algos.aggregation import masked_whiten
from plait.parallel.heartbeat import waiting_in


@dataclass
class Traffic:
    """Bytes this process sent and received through collectives, by kind."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, sent: int = 0, received: int = 0) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(sent)
        self.received[kind] = self.received.get(kind, 0) + int(received)

    def total(self, exclude: tuple[str, ...] = ()) -> int:
        return sum(v for k, v in self.sent.items() if k not in exclude) + \
            sum(v for k, v in self.received.items() if k not in exclude)

    def as_dict(self) -> dict:
        return {"sent": dict(self.sent), "received": dict(self.received)}


def resolve_backend(backend: str, device: str, local_world: int) -> str:
    """The collective backend for ranks on ``device`` (``train.device``), ``local_world``
    of them on this machine. ``auto`` takes NCCL when the ranks run on CUDA with a GPU
    each, else gloo (which also carries CUDA tensors, so several ranks can share one
    GPU). An explicit ``nccl`` that cannot work is refused here, with the way out, rather
    than failing inside NCCL's initialisation."""
    from plait.config import ConfigError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_cuda = device == "cuda" or (device == "auto" and gpus > 0)
    if backend == "auto":
        return "nccl" if on_cuda and gpus >= local_world else "gloo"
    if backend == "nccl":
        if not on_cuda:
            raise ConfigError(
                "runtime.backend=nccl carries CUDA tensors only, and the ranks run on the CPU"
                + (" (no CUDA device here)" if gpus == 0 else " (train.device=cpu)")
                + ": use runtime.backend=gloo or auto")
        if gpus < local_world:
            raise ConfigError(
                f"runtime.backend=nccl needs a GPU per rank, and {local_world} ranks share "
                f"this machine's {gpus} GPU{'s' if gpus > 1 else ''}: use "
                f"runtime.backend=gloo (or auto, which picks gloo here), or "
                f"{gpus} rank{'s' if gpus > 1 else ''} per machine")
    return backend


class Dist:
    """Rank, world size and counted collectives (no-ops for a single process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, *, initialised: bool = False,
                 group=None, global_rank: int | None = None):
        self.rank = rank                  # rank within this Dist's group
        self.world_size = world_size      # size of the group
        self.initialised = initialised
        self.group = group                # None: the whole job
        self.global_rank = rank if global_rank is None else global_rank
        self.traffic = Traffic()

    def subgroup(self, ranks: list[int], group) -> Dist:
        """A Dist over ``ranks`` (global ranks, this process among them) sharing this one's
        traffic count; ``group`` is the process group from ``new_group(ranks)``."""
        sub = Dist(ranks.index(self.global_rank), len(ranks), group=group,
                   global_rank=self.global_rank)
        sub.traffic = self.traffic
        return sub

    # ------------------------------------------------------------------ setup

    @classmethod
    def single(cls) -> Dist:
        return cls(0, 1)

    @classmethod
    def from_env(cls, *, backend: str = "auto", timeout_s: float = 1800.0,
                 device: str = "auto") -> Dist:
        """Join the process group described by ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
        and ``MASTER_PORT`` (a single process when ``WORLD_SIZE`` is unset or 1), over the
        backend :func:`resolve_backend` picks for ``device`` (``train.device``)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world <= 1:
            return cls.single()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        backend = resolve_backend(backend, device, local_world)
        if device != "cpu" and torch.cuda.is_available():  # ranks spread over the GPUs
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) %
                                  torch.cuda.device_count())
        tdist.init_process_group(backend, rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world, initialised=True)

    def close(self) -> None:
        if self.initialised and tdist.is_initialized():
            tdist.destroy_process_group()
        self.initialised = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the whole job: the one that writes the run directory."""
        return self.global_rank == 0

    def shard_bounds(self, total: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[lo, hi)`` of ``total`` items."""
        return shard_bounds(total, self.rank, self.world_size)

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, kind: str = "reduce"
                   ) -> torch.Tensor:
        """Element-wise ``sum``/``max``/``min`` over ranks, in place; returns ``tensor``."""
        if not self.active:
            return tensor
        ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
        with waiting_in(f"all_reduce ({kind})"):
            tdist.all_reduce(tensor, op=ops[op], group=self.group)
        size = tensor.numel() * tensor.element_size()
        self.traffic.add(kind, sent=size, received=size)
        return tensor

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked whitening (zero mean, unit unbiased variance over valid positions) with
        statistics over every rank's positions, so a batch split over ranks is whitened
        as one; one process whitens its own."""
        if not self.active:
            return masked_whiten(x, mask)
        m = mask.to(x.dtype)
        sums = torch.stack([(x * m).sum(), m.sum()]).double().cpu()
        self.all_reduce(sums, kind="control")
        mean = (sums[0] / sums[1].clamp(min=1)).to(x.dtype).to(x.device)
        sq = torch.stack([((x - mean) ** 2 * m).sum()]).double().cpu()
        self.all_reduce(sq, kind="control")
        var = (sq[0] / (sums[1] - 1).clamp(min=1)).to(x.dtype).to(x.device)
        return (x - mean) * torch.rsqrt(var + 1e-8)

    def average_gradients(self, grads: list[torch.Tensor]) -> None:
        """Average ``grads`` over ranks in place, in one flat all-reduce (for gradients
        accumulated outside DDP's own reduction)."""
        if not self.active:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        with waiting_in("all_reduce (gradients)"):
            tdist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads),
                                 strict=True):
            grad.copy_(reduced)

    def broadcast_tensors(self, tensors, src: int = 0, *, kind: str = "broadcast") -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s, in place."""
        if not self.active:
            return
        for tensor in tensors:
            data = tensor.data if tensor.is_contiguous() else tensor.data.contiguous()
            with waiting_in(f"broadcast ({kind})"):
                tdist.broadcast(data, src=src, group=self.group)
            if data is not tensor.data:
                tensor.data.copy_(data)
            size = tensor.numel() * tensor.element_size()
            if self.rank == src:
                self.traffic.add(kind, sent=size * (self.world_size - 1))
            else:
                self.traffic.add(kind, received=size)

    def all_gather_objects(self, obj, *, kind: str = "gather") -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        with waiting_in(f"all_gather ({kind})"):
            tdist.all_gather_object(out, obj, group=self.group)
        size = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        received = sum(len(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)) for o in out)
        self.traffic.add(kind, sent=size * (self.world_size - 1), received=received - size)
        return out

    def gather_objects(self, obj, dst: int = 0, *, kind: str = "gather") -> list | None:
        """Every rank's ``obj`` on rank ``dst`` (in rank order); ``None`` elsewhere."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        with waiting_in(f"gather ({kind})"):
            tdist.gather_object(obj, out, dst=dst)
        if self.rank == dst:
            self.traffic.add(kind, received=sum(_pickled_size(o) for i, o in enumerate(out)
                                                if i != dst))
        else:
            self.traffic.add(kind, sent=_pickled_size(obj))
        return out

    def scatter_objects(self, objs: list | None, src: int = 0, *, kind: str = "scatter"):
        """Rank ``i`` gets ``objs[i]`` from rank ``src``."""
        if not self.active:
            return objs[0]
        out = [None]
        with waiting_in(f"scatter ({kind})"):
            tdist.scatter_object_list(out, objs if self.rank == src else None, src=src)
        if self.rank == src:
            self.traffic.add(kind, sent=sum(_pickled_size(o) for i, o in enumerate(objs)
                                            if i != src))
        else:
            self.traffic.add(kind, received=_pickled_size(out[0]))
        return out[0]

    def barrier(self) -> None:
        if self.active:
            with waiting_in("barrier"):
                tdist.barrier(group=self.group)

    # ------------------------------------------------------------------ metrics

    def reduce_metrics(self, metrics: dict[str, float], *, sums=(), maxima=()) -> dict:
        """Mean over ranks of every metric (keys in ``sums`` are added, keys in ``maxima``
        take the largest); ranks must hold the same keys (missing ones count as absent)."""
        if not self.active:
            return dict(metrics)
        keys = sorted(set().union(*self.all_gather_objects(sorted(metrics), kind="metrics")))
        values = torch.tensor([[float(metrics.get(k, 0.0)), 1.0 if k in metrics else 0.0]
                               for k in keys], dtype=torch.float64)
        totals = self.all_reduce(values.clone(), kind="metrics")
        highest = self.all_reduce(
            torch.tensor([float(metrics.get(k, float("-inf"))) for k in keys],
                         dtype=torch.float64), op="max", kind="metrics")
        out = {}
        for i, key in enumerate(keys):
            if key in maxima:
                out[key] = float(highest[i])
            elif key in sums:
                out[key] = float(totals[i, 0])
            else:
                out[key] = float(totals[i, 0] / totals[i, 1].clamp(min=1))
        return out


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice ``[lo, hi)`` of ``total`` items split over
    ``world`` ranks (equal shares; the first ``total % world`` ranks take one more)."""
    base, extra = divmod(total, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _pickled_size(obj) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def data_parallel(module: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DDP over ``dist``'s group. Buffers (rotary tables) never
    change, so no broadcast runs before each forward: a rank's forwards issue no
    collective and only the backward's all-reduce meets the other ranks."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names \
        else {"broadcast_buffers": False}
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=dist.group, **no_buffer_sync)
