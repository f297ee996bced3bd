"""The Ray launcher: ``runtime.launcher=ray`` runs the same ranks as Ray actors.

- One placement group with a bundle per rank (``runtime.cpus_per_rank``,
  ``runtime.gpus_per_rank``), packed; a local Ray is started when
  ``runtime.ray_address`` is unset, otherwise the job joins that cluster (``auto``
  = the one started with ``ray start`` on this machine).
- Rank 0's actor picks the rendezvous address on its own node; every actor
  then joins the torch.distributed group and runs the rank exactly as the local
  launcher's processes do. On a cluster, ``run.dir`` must be on a filesystem
  every node sees (checkpoints are written by rank 0 and read on resume).
- Heartbeats go to a small board actor, so the driver watches ranks on any
  node; a rank whose actor dies, whose task fails, or whose heartbeat is older
  than ``runtime.heartbeat_timeout_s`` ends the job: every actor is killed and
  :class:`~plait.runtime.launch.RankFailure` names the rank, its last message and the
  checkpoint a rerun resumes from.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from plait.config import Config, ConfigError, RunConfig, dump_yaml
from plait.parallel.heartbeat import ProgressWatch, is_peer_failure
from plait.runtime.launch import (
    STARTUP_GRACE_S,
    RankFailure,
    checkpoint_note,
    import_failure_reporting,
    prepare_job,
    world_size,
)


def _import_ray():
    message = ("runtime.launcher=ray needs Ray, an optional extra: pip install -c "
               "constraints.txt -e \".[ray]\" (from a clone of plait) or pip install 'plait[ray]'")
    try:
        import ray
        import ray.util.placement_group  # noqa: F401 - a directory named ray is not Ray
    except ImportError:
        raise ConfigError(message) from None
    if not hasattr(ray, "init"):
        raise ConfigError(message)
    return ray


class _Board:
    """Latest heartbeat of every rank (a Ray actor)."""

    def __init__(self):
        self.beats: dict[int, dict] = {}

    def beat(self, record: dict) -> None:
        self.beats[record["rank"]] = record

    def snapshot(self) -> dict[int, dict]:
        return dict(self.beats)


class _Rank:
    """One rank of the job (a Ray actor)."""

    def address(self) -> tuple[str, int]:
        import ray

        from plait.runtime.launch import free_port

        return ray.util.get_node_ip_address(), free_port()

    def run(self, config_text: str, job: str, rank: int, world: int, master: tuple[str, int],
            board, threads: int) -> dict:
        import tempfile

        from plait.runtime.worker import run_rank

        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world),
                           "LOCAL_RANK": "0", "MASTER_ADDR": master[0],
                           "MASTER_PORT": str(master[1]), "PLAIT_RANK_PROCESS": "1",
                           "PLAIT_THREADS": str(threads)})
        with tempfile.TemporaryDirectory(prefix="plait-rank-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(config_text)
            return run_rank(str(path), job, sink=lambda record: board.beat.remote(record))


def launch_ray(config: Config, job: str) -> dict:
    """Run ``config``'s ranks as Ray actors, each calling the job function ``job``
    (``MODULE:NAME``); the summary."""
    ray = _import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    runtime = config.runtime
    rank_config, run_dir = prepare_job(config)
    started_ray = False
    if not ray.is_initialized():
        kwargs = {"address": runtime.ray_address} if runtime.ray_address else {
            "num_cpus": max(os.cpu_count() or 1,
                            int(world_size(config) * runtime.cpus_per_rank + 0.999))}
        ray.init(log_to_driver=True, include_dashboard=False, logging_level="ERROR",
                 **kwargs)
        started_ray = True
    bundles = [{"CPU": runtime.cpus_per_rank, **({"GPU": runtime.gpus_per_rank}
                                                 if runtime.gpus_per_rank else {})}
               for _ in range(world_size(config))]
    group = placement_group(bundles, strategy="PACK")
    actors = []
    try:
        try:
            ray.get(group.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            raise RankFailure(f"Ray could not place {len(bundles)} ranks of {bundles[0]} "
                              "within 120 s: the cluster lacks the resources "
                              "(lower runtime.cpus_per_rank / gpus_per_rank)") from None
        board = ray.remote(num_cpus=0)(_Board).remote()
        rank_cls = ray.remote(max_restarts=0)(_Rank)
        for rank in range(world_size(config)):
            actors.append(rank_cls.options(
                num_cpus=runtime.cpus_per_rank, num_gpus=runtime.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank)).remote())
        master = ray.get(actors[0].address.remote())
        threads = max(1, int(runtime.cpus_per_rank))
        text = dump_yaml(rank_config)
        refs = [actor.run.remote(text, job, rank, len(actors), master, board, threads)
                for rank, actor in enumerate(actors)]
        import_failure_reporting()
        summaries = _watch(ray, refs, board, runtime.heartbeat_timeout_s, run_dir,
                           config.run, ProgressWatch(runtime.progress_timeout_s))
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)
        if started_ray:
            ray.shutdown()
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.is_file() else summaries[0]


def _watch(ray, refs, board, timeout_s: float, run_dir: Path, run: RunConfig,
           progress: ProgressWatch) -> list[dict]:
    """Results of every rank, or a RankFailure naming the first rank that failed, hung or
    stalled; ``run``: the job's run settings as given, for what a rerun must change."""
    message = functools.partial(_message, run_dir=run_dir, run=run)
    started = time.time()
    results: dict[int, dict] = {}
    index_of = {ref: rank for rank, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        failed = []
        for ref in done:
            rank = index_of[ref]
            try:
                results[rank] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - any failure of a rank ends the job
                failed.append((rank, err))
        if failed and pending and all(_is_peer_error(e) for _, e in failed):
            # a broken connection is a symptom: give the rank that caused it time to surface
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=10)
            for ref in more:
                try:
                    results[index_of[ref]] = ray.get(ref)
                except Exception as err:  # noqa: BLE001
                    failed.append((index_of[ref], err))
        beats = ray.get(board.snapshot.remote())
        if failed:
            rank, err = _first_cause(failed, beats)
            raise RankFailure(message(rank, _describe(err), beats))
        now = time.time()
        live = {index_of[ref]: beats[index_of[ref]] for ref in pending
                if beats.get(index_of[ref])}
        stuck = progress.stuck(live, now)
        if stuck:
            raise RankFailure(message(stuck[0], stuck[1], beats))
        for ref in pending:
            rank = index_of[ref]
            beat = beats.get(rank)
            age = now - beat["time"] if beat else now - started
            limit = timeout_s if beat else timeout_s + STARTUP_GRACE_S
            if age > limit:
                raise RankFailure(message(
                    rank, f"stopped responding: no heartbeat for {age:.0f} s "
                    f"(runtime.heartbeat_timeout_s={timeout_s:g})", beats))
    return [results[r] for r in range(len(refs))]


def _died(err: Exception) -> bool:
    name = type(err).__name__
    return "ActorDied" in name or "ActorError" in name or "WorkerCrashed" in name


def _is_peer_error(err: Exception) -> bool:
    return not _died(err) and is_peer_failure(getattr(err, "cause", None) or err)


def _first_cause(failed, beats):
    """A rank whose process died, else one with an error of its own, else the first."""
    for rank, err in failed:
        if _died(err):
            return rank, err
    for rank, err in failed:
        if not _is_peer_error(err):
            return rank, err
    return failed[0]


def _describe(err: Exception) -> str:
    if _died(err):
        return "died (its Ray actor process exited)"
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"failed: {type(cause).__name__}: {cause}"
    return f"failed: {type(err).__name__}"


def _message(rank: int, reason: str, beats: dict, run_dir: Path, run: RunConfig) -> str:
    beat = beats.get(rank) or {}
    lines = [f"rank {rank} (Ray actor) {reason}",
             f"  its last message: {beat.get('message', '(none: it never started)')!r}"]
    if beat.get("error"):
        lines.append(f"  its error: {beat['error']}")
    lines.append(f"  {checkpoint_note(run_dir, run)}")
    return "\n".join(lines)
