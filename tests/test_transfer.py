"""Batches and weights between processes (gloo, 2 processes): sends never wait for the
receiver, arrive in order, a weight version can be polled for without blocking, and its
receive posted before it is pushed."""

import os
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from plait.parallel.dist import Dist
from plait.runtime.transfer import ObjectChannel, WeightBroadcast


def _exchange(rank: int, store: str, failures) -> None:
    try:
        tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                 world_size=2)
        push_group = tdist.new_group([0, 1])  # weights apart from the barriers below
        dist = Dist(rank, 2, initialised=True)
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(float(rank))
        channel = ObjectChannel(dist)
        weights = WeightBroadcast(model, push_group, 0, dist)
        if rank == 0:
            for i in range(3):  # the receiver takes none of them before the barrier
                channel.send({"i": i, "payload": torch.full((50_000,), i)}, 1)
            tdist.barrier()  # 1: all three posted without the receiver receiving
            tdist.barrier()  # 2: the receiver polled before any push
            weights.push(5)
            tdist.barrier()  # 3: the receiver took 5 and posted the receive of the next
            with torch.no_grad():
                model.weight.fill_(2.0)
            weights.push(6)
            channel.wait()
            weights.wait()
        else:
            tdist.barrier()  # 1
            assert not weights.poll()
            tdist.barrier()  # 2
            deadline = time.time() + 30
            while not weights.poll():
                assert time.time() < deadline, "the pushed version never showed"
                time.sleep(0.01)
            assert weights.receive() == 5
            assert bool((model.weight == 0).all())
            weights.prefetch()  # posted before the push: arrives in the background
            tdist.barrier()  # 3
            assert weights.receive() == 6
            assert bool((model.weight == 2).all())
            got = [channel.recv(0) for _ in range(3)]
            assert [g["i"] for g in got] == [0, 1, 2]
            assert all(bool((g["payload"] == g["i"]).all()) for g in got)
        tdist.barrier()
        tdist.destroy_process_group()
    except BaseException as err:  # reported to the test (an assert in a child is silent)
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        raise


def test_sends_do_not_wait_for_the_receiver_and_versions_can_be_polled(tmp_path):
    """A worker posts several batches while the trainer is busy (at max_staleness >= 3 the
    trainer may be blocked pushing weights the worker has not taken: a send that waited
    for the receiver would deadlock them); they arrive in order. poll() is false before
    a push and true after it, and receive() then takes that version."""
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    procs = [ctx.Process(target=_exchange, args=(rank, str(tmp_path / "store"), failures))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        os.kill(proc.pid, 9)
    assert not alive, "deadlocked"
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, errors
    assert all(proc.exitcode == 0 for proc in procs)
