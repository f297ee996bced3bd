"""Moving batches and weights between trainer ranks and rollout workers.

- :class:`ObjectChannel`: point-to-point sends of pickled objects (a batch of
  experience) that do not block the sender: each send is posted asynchronously
  and waited for only at the end, so a rollout worker goes on generating while
  its batches are in flight.
- :class:`WeightBroadcast`: the trainer's parameters pushed to every rollout
  worker by broadcast in flat buckets (``runtime.weight_bucket_mb``), preceded
  by a header with the policy version. The sender snapshots the weights into
  its bucket buffers and broadcasts asynchronously, so training continues while
  the bytes travel; receivers block until a version arrives (or poll for it
  between decode steps), then copy it into their model in place.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as tdist

from plait.parallel.dist import Dist


class ObjectChannel:
    """Asynchronous pickled-object sends, blocking receives, over the job's process group."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self._in_flight: dict[int, list] = {}  # peer -> [works, tensors kept alive] each
        self._to_self: list = []  # sends to this very rank (a worker that trains next step)

    def send(self, obj, dst: int, *, kind: str = "rollouts") -> None:
        """Post ``obj`` to global rank ``dst`` and return without waiting for the receiver
        (gloo completes a send only once the peer receives it): a rollout worker running
        batches ahead keeps posting while the trainer is blocked elsewhere, e.g. pushing
        a version the worker takes later. Messages to one peer arrive in order; sends
        already completed are released here."""
        if dst == self.dist.global_rank:
            self._to_self.append(obj)
            return
        self._in_flight[dst] = [entry for entry in self._in_flight.get(dst, [])
                                if not all(work.is_completed() for work in entry[0])]
        data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                                dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
        works = [tdist.isend(size, dst), tdist.isend(data, dst)]
        self._in_flight[dst].append([works, size, data])  # tensors kept alive until sent
        self.dist.traffic.add(kind, sent=data.numel() + 8)

    def recv(self, src: int, *, kind: str = "rollouts"):
        if src == self.dist.global_rank:
            return self._to_self.pop(0)
        size = torch.zeros(1, dtype=torch.long)
        tdist.recv(size, src)
        data = torch.empty(int(size), dtype=torch.uint8)
        tdist.recv(data, src)
        self.dist.traffic.add(kind, received=data.numel() + 8)
        return pickle.loads(data.numpy().tobytes())

    def wait(self, dst: int | None = None) -> None:
        """Block until the sends to ``dst`` (every peer when None) have completed."""
        peers = [dst] if dst is not None else list(self._in_flight)
        for peer in peers:
            for entry in self._in_flight.pop(peer, []):
                for work in entry[0]:
                    work.wait()


class WeightBroadcast:
    """Bucketed, versioned broadcast of a model's parameters from one rank to a group.

    Every member builds it over the same model structure; ``src`` (a global rank)
    calls :meth:`push`, the others :meth:`receive`, once per version, in order. A sharded
    (FSDP) model is pushed while its trainers hold it gathered: the parameters are read
    from the model at each push, since gathering swaps them.
    """

    def __init__(self, model: torch.nn.Module, group, src: int, dist: Dist,
                 bucket_bytes: int = 64 << 20):
        self.group, self.src, self.dist = group, src, dist
        self.model = model
        self.layout: list[list[int]] = []  # parameter positions of each bucket
        current, size = [], 0
        params = list(model.parameters())
        for i, p in enumerate(params):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > bucket_bytes or
                            p.dtype != params[current[0]].dtype):
                self.layout.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            self.layout.append(current)
        self.flats = [torch.empty(sum(params[i].numel() for i in b), dtype=params[b[0]].dtype,
                                  device=params[0].device) for b in self.layout]
        self._pending: list = []
        self._incoming: tuple[torch.Tensor, list] | None = None  # by prefetch() / poll()
        self.group_size = tdist.get_world_size(group)

    @property
    def num_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flats)

    def push(self, version: int) -> None:
        """Snapshot the weights and start broadcasting them as ``version``; the previous
        push is completed first."""
        self.wait()
        header = torch.tensor([version, len(self.flats)], dtype=torch.long)
        works = [tdist.broadcast(header, self.src, group=self.group, async_op=True)]
        params = list(self.model.parameters())
        with torch.no_grad():
            for flat, bucket in zip(self.flats, self.layout, strict=True):
                torch.cat([params[i].detach().reshape(-1) for i in bucket], out=flat)
                works.append(tdist.broadcast(flat, self.src, group=self.group, async_op=True))
        self._pending = [works, header]
        self.dist.traffic.add("weights", sent=(self.num_bytes + 16) * (self.group_size - 1))

    def _check(self, header: torch.Tensor) -> None:
        if int(header[1]) != len(self.flats):
            raise RuntimeError(f"weight broadcast: {int(header[1])} buckets sent, "
                               f"{len(self.flats)} expected (different model structures)")

    def wait(self) -> None:
        if self._pending:
            for work in self._pending[0]:
                work.wait()
            self._pending = []

    def prefetch(self) -> None:
        """Receiver side: post the next version's receive (its header and every bucket)
        so that it arrives in the background while this process works; :meth:`receive`
        then waits for what is left and copies it in. Call it only when a next version
        will be pushed."""
        if self._incoming is None:
            header = torch.zeros(2, dtype=torch.long)
            works = [tdist.broadcast(header, self.src, group=self.group, async_op=True)]
            works += [tdist.broadcast(flat, self.src, group=self.group, async_op=True)
                      for flat in self.flats]
            self._incoming = header, works

    def poll(self) -> bool:
        """Receiver side, without blocking: whether the next version has started to arrive
        (:meth:`receive` then takes it). Call it only while a next version is due."""
        self.prefetch()
        return self._incoming[1][0].is_completed()

    def receive(self) -> int:
        """Block until the next version arrives, copy it into the model, return it."""
        if self._incoming is not None:  # posted by prefetch() or poll()
            header, works = self._incoming
            self._incoming = None
            for work in works:
                work.wait()
            self._check(header)
        else:  # the header first, so that other model structures fail clearly
            header = torch.zeros(2, dtype=torch.long)
            tdist.broadcast(header, self.src, group=self.group)
            self._check(header)
            for flat in self.flats:
                tdist.broadcast(flat, self.src, group=self.group)
        params = list(self.model.parameters())
        with torch.no_grad():
            for flat, bucket in zip(self.flats, self.layout, strict=True):
                offset = 0
                for p in (params[i] for i in bucket):
                    p.copy_(flat[offset: offset + p.numel()].view_as(p))
                    offset += p.numel()
        self.dist.traffic.add("weights", received=self.num_bytes + 16)
        return int(header[0])
