"""Batch sources: where a trainer's batch for a step comes from, one per placement.

An RL step is the same dataflow under every placement (see :mod:`plait.recipes.rl`);
the placement decides only how steps 1-3 (prompts, generation, rewards) happen and
how new weights reach the generators afterwards. A source does exactly that:

- :meth:`collect` ``(step, timer) -> (batch or None, metrics)``: this rank's batch with
  its rewards (and whatever later stages the placement already did), plus the draw
  and rollout statistics; None when dynamic sampling found no group to learn from;
- :meth:`start` once before the first step, :meth:`after_update` for step 7 (weight
  sync), :meth:`observe` with the step's reduced metrics.

This module holds the colocated source (every rank generates its own shard) and the
single-controller one (rank 0 drives); :mod:`plait.runtime.remote` the rollout
workers apart, :mod:`plait.runtime.dynamic` the dynamic placement.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch

from plait import algos
from plait.config import Config
from plait.parallel.dist import Dist, shard_bounds
from plait.runtime.generation import Generator, reward_terms, sample_seeds, sampling_params
from plait.telemetry.timing import StageTimer
from plait.train.experience import Experience
from plait.train.scoring import RewardShaper

# how per-rank step metrics combine: added, largest, or (the rest) averaged
SUMMED_METRICS = ("samples", "tokens", "reward_failures", "groups_drawn", "groups_kept",
                  "loss/policy", "loss/value", "loss/ptx", "loss/rehearsal", "kl_ref",
                  "policy/entropy", *RewardShaper.SUMS)
MAX_METRICS = ("response_length/max", "nan_skips", "controller/traffic_bytes",
               "controller/gradient_bytes", "controller/batch_bytes", "controller/peak_rss_mb")


class BatchSource:
    """The interface (see module doc); the default hooks do nothing but update the
    engine's weight version, which the engine shares with the trainer."""

    generator: Generator

    def start(self, *, step: int, data: dict, reference_dir: str | None) -> None:
        """Before the first step: where the job stands (resumed or fresh)."""

    def collect(self, step: int, timer: StageTimer) -> tuple[Experience | None, dict]:
        raise NotImplementedError

    def after_update(self, step: int, metrics: dict, timer: StageTimer) -> dict:
        """Step 7: the generators get the weights of the update just made."""
        with timer.stage("weight_sync"):
            self.generator.engine.update_weights(None, step + 1)
        return metrics

    def observe(self, step: int, metrics: dict) -> None:
        """The step's metrics, reduced over the ranks."""


class ColocatedSource(BatchSource):
    """Every rank draws the same global prompt batch and generates and scores its own
    contiguous shard of it (parallel controllers: no driver). With dynamic sampling
    (DAPO), drawing repeats until enough groups over all ranks carry a learning signal
    (rewards that differ) or the draw cap is hit."""

    def __init__(self, config: Config, dist: Dist, generator: Generator,
                 draw: Callable[[int], list[dict]], *, reward_high: float,
                 fuse: Callable[[], bool] = lambda: False, shape: RewardShaper | None = None):
        self.config, self.dist, self.generator, self.draw = config, dist, generator, draw
        self.reward_high, self.fuse = reward_high, fuse
        self.shape = shape or RewardShaper(config)

    def collect(self, step: int, timer: StageTimer) -> tuple[Experience | None, dict]:
        algo = self.config.algo
        kept: list[Experience] = []
        stats = {"draws": 0, "groups_drawn": 0, "reward_failures": 0}
        drawn_rewards, correct = [], []
        last = None
        while True:
            stats["draws"] += 1
            rows = self.draw(step)                                      # the global batch
            lo, hi = self.dist.shard_bounds(len(rows))                  # this rank's prompts
            stats["groups_drawn"] += hi - lo
            batch = self.generator.rollout(
                rows[lo:hi], sampling_params(self.config), algo.group_size, timer,
                fuse=self.fuse(), first_index=lo, total=len(rows),
                seeds=sample_seeds(self.config.train.seed, step, lo, hi - lo, stats["draws"]))
            last = batch
            stats["reward_failures"] += batch.reward_failures
            correct.append(batch.rewards >= self.reward_high - 1e-6)
            batch.rewards = self.shape(batch.rewards, batch)
            drawn_rewards.append(batch.rewards)
            if not algo.dynamic_sampling:
                kept = [batch]
                break
            signal = algos.group_has_signal(batch.rewards, batch.group_ids)
            if signal.any():
                kept.append(batch.select(signal.nonzero().squeeze(-1)))
            local_groups = sum(part.group_ids.unique().numel() for part in kept)
            num_groups = int(self.dist.all_reduce(torch.tensor([local_groups]), kind="control"))
            if num_groups >= algo.prompts_per_step or stats["draws"] >= algo.max_draws:
                break
        stats["reward_all_mean"] = float(torch.cat(drawn_rewards).mean())
        stats["train/accuracy"] = float(torch.cat(correct).float().mean())
        batch = (Experience.cat(kept, self.generator.tokenizer.pad_token_id) if len(kept) > 1
                 else kept[0]) if kept else None
        if algo.dynamic_sampling:
            batch = self._keep_first_groups(batch, last, stats)
        else:
            stats["groups_kept"] = hi - lo
        if batch is not None:
            stats.update(rollout_metrics(self.config, batch, self.dist))
        return batch, stats

    def _keep_first_groups(self, batch: Experience | None, last: Experience, stats: dict):
        """Dynamic sampling keeps the first prompts_per_step groups with a signal, counted
        over all ranks (group ids are global, earliest draws first). A rank left with none
        trains on one of its rows at zero weight, so every rank joins the gradient
        all-reduce; if no rank has any, the step is skipped."""
        algo = self.config.algo
        local = batch.group_ids.unique().tolist() if batch is not None else []
        every = sorted(g for ids in self.dist.all_gather_objects(local, kind="control")
                       for g in ids)
        if not every:
            stats["groups_kept"] = 0
            return None
        chosen = torch.tensor(every[: algo.prompts_per_step])
        stats["groups_kept"] = 0
        if batch is not None:
            keep = torch.isin(batch.group_ids, chosen)
            stats["groups_kept"] = int(batch.group_ids[keep].unique().numel())
            batch = batch.select(keep.nonzero().squeeze(-1)) if keep.any() else None
        return batch if batch is not None else last.ghost_row()


class SingleControllerSource(BatchSource):
    """The driver pattern, kept for comparison (``runtime.controller=single``): rank 0
    draws the prompts and scatters them, every rank generates and runs its forward
    passes, rank 0 gathers the whole batch, scores it, computes the advantages and
    scatters each rank's share back."""

    def __init__(self, config: Config, dist: Dist, generator: Generator,
                 draw: Callable[[int], list[dict]], *, reward_high: float, scorer, advantages,
                 fuse: Callable[[], bool] = lambda: False, shape: RewardShaper | None = None):
        self.config, self.dist, self.generator, self.draw = config, dist, generator, draw
        self.reward_high, self.scorer, self.advantages = reward_high, scorer, advantages
        self.fuse, self.shape = fuse, shape or RewardShaper(config)

    def collect(self, step: int, timer: StageTimer) -> tuple[Experience, dict]:
        algo, dist = self.config.algo, self.dist
        shards = None
        if dist.is_main:
            rows = self.draw(step)
            shards = []
            for rank in range(dist.world_size):
                lo, hi = shard_bounds(len(rows), rank, dist.world_size)
                shards.append((lo, rows[lo:hi]))
        first, rows_local = dist.scatter_objects(shards, kind="prompts")
        batch = self.generator.rollout(
            rows_local, sampling_params(self.config), algo.group_size, timer,
            fuse=self.fuse(), first_index=first, total=algo.prompts_per_step,
            seeds=sample_seeds(self.config.train.seed, step, first, len(rows_local), 1),
            score=False)
        self.scorer.score_forwards(batch, timer)
        with timer.stage("gather"):
            parts = dist.gather_objects((rows_local, batch.to("cpu")), kind="rollouts")
        metrics: dict[str, float] = {"draws": 1.0}
        pieces = None
        if dist.is_main:
            with timer.stage("driver"):
                pieces, metrics = self._drive(parts, metrics, timer)
        with timer.stage("scatter"):
            batch = dist.scatter_objects(pieces, kind="batches").to(self.generator.device)
        return batch, metrics

    def _drive(self, parts, metrics: dict, timer: StageTimer) -> tuple[list[Experience], dict]:
        """Rank 0's share: score and compute advantages for the whole batch, then cut it
        back into each rank's rows."""
        rows = [row for part_rows, _ in parts for row in part_rows]
        full = Experience.cat([b for _, b in parts], self.generator.tokenizer.pad_token_id)
        size = self.config.algo.group_size
        prompts = [row["prompt"] for row in rows for _ in range(size)]
        fields = {key: [row[key] for row in rows for _ in range(size)]
                  for key in rows[0] if key != "prompt"}
        result = self.generator.rewards.score(prompts, full.texts, fields)
        correct = result.total >= self.reward_high - 1e-6
        full.rewards = self.shape(result.total, full)
        full.reward_names, full.reward_terms = reward_terms([result])
        metrics.update({"reward_failures": float(result.num_failures),
                        "groups_drawn": float(len(rows)), "groups_kept": float(len(rows)),
                        "reward_all_mean": float(full.rewards.mean()),
                        "train/accuracy": float(correct.float().mean())})
        metrics.update(rollout_metrics(self.config, full, self.dist, across_ranks=False))
        metrics.update(self.advantages.compute(full, across_ranks=False))
        pieces, start = [], 0
        for _, part in parts:
            pieces.append(full.select(torch.arange(start, start + part.batch_size)).trimmed())
            start += part.batch_size
        # the driver holds the gathered rollouts, the assembled batch and its cut-up copy
        timer.hold(sum(part.nbytes for _, part in parts) + full.nbytes +
                   sum(piece.nbytes for piece in pieces))
        return pieces, metrics


def rollout_metrics(config: Config, batch: Experience, dist: Dist, across_ranks: bool = True
                    ) -> dict[str, float]:
    """Reward and length statistics of the step's batch (over every rank's rows), and
    each reward function's mean."""
    real = 0 if batch.ghost else batch.batch_size
    lengths = batch.response_lengths.double().cpu()[:real]
    rewards = batch.rewards.double().cpu()[:real]
    # one sum per configured function on every rank (a rank's stand-in batch has none)
    terms = torch.zeros(len(config.reward.functions), dtype=torch.float64)
    if batch.reward_terms is not None and real:
        terms = batch.reward_terms.double().cpu()[:real].sum(0)
    sums = torch.cat([torch.tensor([rewards.sum(), (rewards ** 2).sum(), real, lengths.sum()],
                                   dtype=torch.float64), terms])
    if across_ranks:
        dist.all_reduce(sums, kind="metrics")
    count = max(float(sums[2]), 1.0)
    mean = float(sums[0]) / count
    var = (float(sums[1]) - count * mean ** 2) / max(count - 1, 1.0)
    return {
        "reward/mean": mean,
        "reward/std": max(var, 0.0) ** 0.5 if count > 1 else 0.0,
        "response_length/mean": float(sums[3]) / count,
        "response_length/max": float(lengths.max()) if real else 0.0,
        "samples": float(real),
        "tokens": float(lengths.sum()),
        # each reward function's own mean (a weight-0 function is logged, not trained on)
        **{f"reward_fn/{name}": float(sums[4 + i]) / count
           for i, name in enumerate(batch.reward_names)},
    }


def traffic_mark(dist: Dist) -> tuple[int, int]:
    """The collective traffic so far (without gradients, and all of it)."""
    return dist.traffic.total(exclude=("gradients",)), dist.traffic.total()


def controller_load(dist: Dist, timer: StageTimer, before: tuple[int, int]) -> dict[str, float]:
    """What passed through this process in the step (collective payload bytes, the batch
    data it held at once) and its peak memory so far."""
    control = dist.traffic.total(exclude=("gradients",)) - before[0]
    total = dist.traffic.total() - before[1]
    return {"controller/traffic_bytes": float(control),
            "controller/gradient_bytes": float(total - control),
            "controller/batch_bytes": float(timer.held_bytes),
            "controller/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def step_metrics(dist: Dist, metrics: dict, timer: StageTimer, start: float, nan_skips: int
                 ) -> dict[str, float]:
    """Stage times and throughput; with several ranks, metrics are reduced over them
    (counts added, maxima and stage times the slowest rank's, the rest averaged)."""
    elapsed = time.perf_counter() - start
    metrics.update({f"time/{k}": v for k, v in timer.times.items()})
    metrics.update({f"memory/{k}_peak_mb": v for k, v in timer.memory.items()})
    metrics["time/step"] = elapsed
    metrics["nan_skips"] = float(nan_skips)
    if dist.active:
        exact = {k: metrics[k] for k in ("reward/mean", "reward/std",
                                         "response_length/mean") if k in metrics}
        maxima = MAX_METRICS + tuple(k for k in metrics if k.startswith(("time/", "memory/")))
        metrics = dist.reduce_metrics(metrics, sums=SUMMED_METRICS, maxima=maxima)
        metrics.update(exact)  # already global
    if "tokens" in metrics:
        metrics["throughput/tokens_per_s"] = metrics["tokens"] / metrics["time/step"]
        metrics["throughput/samples_per_s"] = metrics["samples"] / metrics["time/step"]
    metrics["_spans"] = timer.spans
    return metrics
