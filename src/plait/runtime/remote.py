"""Rollout workers apart (the disaggregated and partial placements), trainer side.

Trainer ranks get each step's batch from the rollout workers: each worker generates
and scores its contiguous range of the global prompt batch and sends every trainer
the rows of the prompts in the trainer's range (:func:`send_parts`); a trainer
assembles its part (:class:`Receiver`). After each update trainer 0 pushes the new
weights to the workers while some batch still needs them (:class:`Remote`). With
``runtime.stream_groups`` parts arrive group by group and the trainer scores them,
computes their (group-wise) advantages and runs their forward and backward passes
as they come (:class:`StreamedSource`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.config import Config
from plait.parallel.dist import Dist
from plait.runtime.generation import Generator
from plait.runtime.placement import Layout
from plait.runtime.sources import BatchSource, rollout_metrics
from plait.runtime.transfer import ObjectChannel, WeightBroadcast
from plait.telemetry.timing import StageTimer
from plait.train.experience import Experience
from plait.train.scoring import RewardShaper, mean_gap


@dataclass
class Remote:
    """What a trainer or rollout worker of a disaggregated job uses to reach the others."""

    layout: Layout
    channel: ObjectChannel
    weights: WeightBroadcast | None = None
    push_group: object = None
    max_staleness: int = 0
    steps: int = 0
    bucket_bytes: int = 0  # weight broadcasts travel in buckets of this size

    def start(self, dist: Dist, state: dict, gathered) -> None:
        """Trainer 0, before the first step: tell each worker where the job stands
        (``state``: step, data position, next group id, reference directory) and push
        the starting weights (version = the step the job resumes from)."""
        if dist.global_rank == 0:
            for worker in self.layout.worker_ranks:
                self.channel.send(state, worker, kind="control")
        self.push(dist, state["step"], gathered)

    def pushed(self, version: int) -> bool:
        """Whether ``version`` is pushed after the update that makes it: only while some
        worker will still need it (batch ``s`` needs weights ``>= s - max_staleness``, and
        the last batch is ``steps - 1``)."""
        return version + self.max_staleness <= self.steps - 1

    def push(self, dist: Dist, version: int, gathered) -> None:
        """Every trainer calls this: sharded trainers gather the policy together
        (``gathered()``), and trainer 0 snapshots and sends it."""
        with gathered():
            if dist.global_rank == 0:
                self.weights.push(version)

    def finish(self) -> None:
        self.channel.wait()
        if self.weights is not None:
            self.weights.wait()


def send_parts(batch: Experience | None, layout: Layout, worker: int, first: int, total: int,
               channel: ObjectChannel, version: int, timer: StageTimer, *, final: bool = True,
               first_id: int | None = None) -> None:
    """As rollout worker ``worker`` of ``layout``, whose ``batch`` holds prompts of the
    range ``first..`` of a global batch of ``total``: send each trainer the rows of the
    prompts in its range. ``first_id``: the group id of prompt ``first`` (default: the
    batch's smallest, when it holds the whole range). A ``final`` message ends this
    worker's part of the batch for every trainer (rows or not); others go only to
    trainers with rows in them."""
    batch = batch.to("cpu") if batch is not None else None
    if batch is not None:
        base = int(batch.group_ids.min()) if first_id is None else first_id
        prompt = batch.group_ids - base + first  # global index
    for trainer, lo, hi in layout.worker_targets(worker, total):
        rows = ((prompt >= lo) & (prompt < hi)).nonzero().squeeze(-1) \
            if batch is not None else torch.zeros(0, dtype=torch.long)
        if not final and rows.numel() == 0:
            continue
        channel.send({"batch": batch.select(rows) if rows.numel() else None,
                      "version": version, "times": dict(timer.times), "final": final}, trainer)


class Receiver:
    """A trainer's part of a batch made by rollout workers: the messages of each worker
    that holds some of its prompts, assembled, rewards shaped, with step statistics."""

    def __init__(self, config: Config, dist: Dist, device: torch.device, *, pad_token_id: int,
                 reward_high: float, shape: RewardShaper | None = None):
        self.config, self.dist, self.device = config, dist, device
        self.pad_token_id, self.reward_high = pad_token_id, reward_high
        self.shape = shape or RewardShaper(config)

    def receive(self, layout: Layout, total: int, channel: ObjectChannel, timer: StageTimer,
                step: int, on_part: Callable[[Experience], None] | None = None
                ) -> tuple[Experience, dict]:
        """This trainer's part of a batch of ``total`` prompts made by ``layout``'s
        workers for ``step`` (the wait is the time the trainer idles), with its step
        statistics. ``on_part`` is called on each part as it arrives (rewards shaped)."""
        messages, chunks, correct = [], [], []
        for message in self._messages(layout, total, channel, timer):
            messages.append(message)
            if message["batch"] is not None:
                chunks.append(self._arrived(message["batch"], correct))
                if on_part is not None:
                    on_part(chunks[-1])
        batch, stats = self._assembled(layout, total, messages, chunks, correct, step)
        if on_part is not None:  # parts taken as they arrived
            stats["rollout/parts"] = float(len(chunks))
        return batch, stats

    def _messages(self, layout: Layout, total: int, channel: ObjectChannel, timer: StageTimer):
        """The messages of this trainer's part of a batch of ``total`` prompts, each
        worker's until its final one (a worker sends its part whole, or group by group
        with ``runtime.stream_groups``); blocked time is ``rollout_wait``."""
        for src, _, _ in layout.trainer_sources(self.dist.rank, total):
            while True:
                with timer.stage("rollout_wait"):
                    message = channel.recv(src)
                yield message
                if message["final"]:
                    break

    def _arrived(self, chunk: Experience, correct: list) -> Experience:
        """An arrived part on this trainer's device, its rewards shaped (whether each
        sample was correct, before shaping, appended to ``correct``)."""
        chunk = chunk.to(self.device)
        correct.append(chunk.rewards >= self.reward_high - 1e-6)
        chunk.rewards = self.shape(chunk.rewards, chunk)
        return chunk

    def _assembled(self, layout: Layout, total: int, messages: list[dict],
                   chunks: list[Experience], correct: list, step: int
                   ) -> tuple[Experience, dict]:
        """The batch of the arrived ``chunks`` and its step statistics."""
        batch = Experience.cat(chunks, self.pad_token_id) if len(chunks) > 1 else chunks[0]
        batch.reward_failures = sum(chunk.reward_failures for chunk in chunks)
        version = min(message["version"] for message in messages)
        groups = float(sum(hi - lo for _, lo, hi in layout.trainer_sources(self.dist.rank,
                                                                           total)))
        stats = {"draws": 1.0, "groups_drawn": groups, "groups_kept": groups,
                 "reward_failures": float(batch.reward_failures),
                 "reward_all_mean": float(batch.rewards.mean()),
                 "train/accuracy": float(torch.cat(correct).float().mean()),
                 "rollout/staleness": float(step - version)}
        # each of the workers' stage times (generate, weights_wait, send, cycle, ...), as
        # of its final message: the largest value over the workers that sent this trainer
        finals = [message for message in messages if message["final"]]
        for name in sorted({name for message in finals for name in message["times"]}):
            stats[f"rollout/worker_{name}_s"] = max(m["times"].get(name, 0.0) for m in finals)
        return batch, stats


class RemoteSource(BatchSource):
    """A trainer's batches from the rollout workers apart; trainer 0 pushes the weights
    after each update while some worker still needs them."""

    def __init__(self, config: Config, dist: Dist, generator: Generator,
                 draw: Callable[[int], list[dict]], remote: Remote, receiver: Receiver, *,
                 gathered):
        self.config, self.dist, self.generator, self.draw = config, dist, generator, draw
        self.remote, self.receiver, self.gathered = remote, receiver, gathered

    def start(self, *, step: int, data: dict, reference_dir: str | None) -> None:
        self.remote.start(self.dist, {"step": step, "data": data,
                                      "next_group_id": self.generator.next_group_id,
                                      "reference_dir": reference_dir}, self.gathered)

    def collect(self, step: int, timer: StageTimer, on_part=None) -> tuple[Experience, dict]:
        rows = self.draw(step)  # keeps the data position in step with the workers
        batch, metrics = self.receiver.receive(self.remote.layout, len(rows),
                                               self.remote.channel, timer, step, on_part)
        metrics.update(rollout_metrics(self.config, batch, self.dist))
        return batch, metrics

    def after_update(self, step: int, metrics: dict, timer: StageTimer) -> dict:
        with timer.stage("weight_sync"):
            self.generator.engine.update_weights(None, step + 1)
            if self.remote.pushed(step + 1):
                self.remote.push(self.dist, step + 1, self.gathered)
        return metrics


class StreamedSource(RemoteSource):
    """``runtime.stream_groups``: each part the rollout workers send (finished groups,
    scored) gets its forward passes, advantages (group-wise) and the forward and
    backward passes of the update as it arrives, while the workers still generate the
    rest; the step's update then only completes the optimizer step."""

    def __init__(self, *args, settings, scorer, advantages, updater, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings, self.scorer, self.advantages = settings, scorer, advantages
        self.updater = updater

    def collect(self, step: int, timer: StageTimer, on_part=None) -> tuple[Experience, dict]:
        update = self.updater.groupwise()

        def train_on(part: Experience) -> None:
            self.scorer.score_forwards(part, timer)
            self.advantages.compute(part, across_ranks=False)
            with timer.stage("update"):
                update.add(part)

        batch, metrics = super().collect(step, timer, on_part=train_on)
        if self.settings.needs_old_logprobs and batch.sampled_logprobs is not None and \
                not self.config.algo.use_engine_logprobs:
            metrics["rollout/logprob_gap_mean"] = mean_gap(
                batch.sampled_logprobs, batch.old_logprobs, batch.response_mask)
        # the statistics (the advantages are the same: each group's alone)
        metrics.update(self.advantages.compute(batch))
        return batch, metrics
