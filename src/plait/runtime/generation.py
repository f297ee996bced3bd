"""Scored batches from prompts: the engine generates each prompt's group, rewards are
computed the moment a group finishes (in a helper thread, so a user's reward
functions run alongside the long tail of generation), and forward passes can run on
finished groups between decode steps (inter-stage fusion). What comes out is an
:class:`~plait.train.experience.Experience` with global group ids.

A :class:`Generator` is what a process needs to make batches: engine, rewards and
tokenizer; trainers and rollout workers each hold one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from plait.config import Config
from plait.errors import TrainingDiverged
from plait.rollout.base import Completion, RolloutEngine, SamplingParams
from plait.telemetry.timing import StageTimer
from plait.train.experience import Experience, experience_from_completions


@dataclass
class PendingBatch:
    """A batch being generated: its rows and encoded prompts, the groups finished so far,
    their reward futures, and the fused forward outputs of finished groups."""

    rows: list[dict]
    prompts: list[list[int]]
    score: bool = True
    fuse: bool = False
    groups: list = field(default_factory=list)
    futures: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)
    unfused: list[int] = field(default_factory=list)  # finished, fused passes not yet run
    failed: list = field(default_factory=list)  # reward futures that raised, as they end
    done: int = 0

    def __post_init__(self):
        self.groups = [None] * len(self.rows)

    @property
    def complete(self) -> bool:
        return self.done == len(self.rows)


@dataclass
class ScoredCompletions:
    """Completions in row order (each row's ``n`` together) and their total rewards: what
    an evaluation reads, without the padded training tensors of an Experience."""

    completions: list[Completion]
    rewards: torch.Tensor  # [rows * n]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens of each completion."""
        return torch.tensor([len(c.token_ids) for c in self.completions], dtype=torch.float64)

    @property
    def truncated(self) -> torch.Tensor:
        """1 for each completion cut at the token limit before its end."""
        return torch.tensor([c.finish_reason == "length" for c in self.completions],
                            dtype=torch.float64)


def sampling_params(config: Config) -> SamplingParams:
    """The rollout's sampling settings."""
    r = config.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k, stop=tuple(r.stop))


def sample_seeds(seed: int, step: int, first_index: int, count: int, draw: int) -> list[int]:
    """One seed per prompt from (train.seed, step, draw, global prompt index): a prompt's
    samples are the same on any number of ranks and after a resume."""
    base = ((seed * 1_000_003 + step) * 1_000_003 + draw)
    return [base * 1_000_003 + first_index + i for i in range(count)]


class Generator:
    """Makes scored batches with ``engine`` and ``rewards`` (see module doc).

    ``fused_forwards(chunk) -> {name: [rows, R] tensor}`` runs on finished groups when a
    batch asks for fusion; ``releases_kv_cache`` frees the engine's KV cache after each
    generation so training in this process can use the memory; ``gathered`` gives the
    policy's full parameters under FSDP; ``diverged()`` is the message that ends the job
    when generation meets NaN probabilities. ``next_group_id`` numbers groups across batches.
    """

    def __init__(self, config: Config, engine: RolloutEngine, rewards, tokenizer,
                 device: torch.device, *, encode_prompt, autocast=contextlib.nullcontext,
                 gathered=contextlib.nullcontext, fused_forwards=None,
                 releases_kv_cache: bool = False, diverged=None):
        self.config, self.engine, self.rewards, self.tokenizer = config, engine, rewards, tokenizer
        self.device = device
        self.autocast, self.gathered = autocast, gathered
        self.fused_forwards = fused_forwards
        self.releases_kv_cache = releases_kv_cache
        self.diverged = diverged or (lambda: "the policy produced NaN/inf probabilities "
                                     "while generating: the weights diverged")
        self.encode_prompt = encode_prompt
        self.next_group_id = 0
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-reward")

    def rollout(self, rows: list[dict], params: SamplingParams, n: int,
                timer: StageTimer | None = None, *, fuse: bool = False, first_index: int = 0,
                total: int | None = None, seeds: list[int] | None = None,
                score: bool = True) -> Experience:
        """Generate ``n`` completions per row and score them. Each row's completions share
        a group id; ``batch.rewards`` holds the total reward, ``batch.reward_failures`` the
        count of failed reward calls.

        ``rows`` may be one rank's shard of a global batch of ``total`` rows starting at
        ``first_index``: group ids are then global (``first_index + i`` past the ids of
        earlier batches). ``seeds`` (one per row) make each row's samples a function of its
        seed alone, whatever batch or rank generates them. ``score=False`` skips rewards
        (the single controller scores on rank 0). ``fuse`` runs :attr:`fused_forwards` on
        finished groups between decode steps, a micro-batch at a time."""
        timer = timer or StageTimer()
        pending = self.pending_batch(rows, score=score, fuse=fuse)
        self._generate(pending, params, n, seeds, timer)
        batch = self.finish_batch(pending, timer, first_index=first_index, total=total)
        if self.releases_kv_cache:
            self.engine.release()  # hybrid engine: the KV cache makes room for training
        return batch.to(self.device)

    def scored(self, rows: list[dict], params: SamplingParams, n: int, *,
               seeds: list[int] | None = None) -> ScoredCompletions:
        """``n`` completions per row and their rewards, streamed and scored as
        :meth:`rollout` does, but without packing training tensors (evaluation reads only
        texts, lengths, finish reasons and rewards)."""
        timer = StageTimer()
        pending = self.pending_batch(rows)
        self._generate(pending, params, n, seeds, timer)
        results = self._wait_rewards(pending, list(range(len(rows))), timer)
        if self.releases_kv_cache:
            self.engine.release()
        return ScoredCompletions([c for group in pending.groups for c in group],
                                 torch.cat([r.total for r in results]))

    def _generate(self, pending: PendingBatch, params: SamplingParams, n: int, seeds,
                  timer: StageTimer) -> None:
        """Generate every group of ``pending``, each taken (rewards started) as it ends."""
        with timer.stage("generate"), self.diverged_generation(), self.gathered():
            for index, group in self._generated_groups(pending.prompts, params, n, seeds):
                self.take_group(pending, index, group, timer)

    def pending_batch(self, rows: list[dict], *, score: bool = True, fuse: bool = False
                      ) -> PendingBatch:
        """A batch of ``rows`` whose groups are about to be generated."""
        return PendingBatch(rows, [self.encode_prompt(row["prompt"]) for row in rows],
                            score=score, fuse=fuse)

    def take_group(self, pending: PendingBatch, index: int, group: list[Completion],
                   timer: StageTimer) -> None:
        """Group ``index`` of ``pending`` has finished generating: start its rewards (in a
        helper thread) and, with ``fuse``, the fused forward passes of a micro-batch of
        finished groups while the engine still has work."""
        pending.groups[index] = group
        pending.done += 1
        if pending.score:
            _raise_first_failure(pending.failed)  # a failed reward ends it now
            future = self._reward_pool.submit(self._score_group, pending.rows[index], group)
            future.add_done_callback(partial(_note_failure, pending.failed))
            pending.futures[index] = future
        pending.unfused.append(index)
        if pending.fuse and len(pending.unfused) * len(group) >= \
                self.config.algo.micro_batch_size and self.engine.busy:
            with timer.stage("fused_forwards"):
                self._fuse(pending.prompts, pending.groups, pending.unfused, pending.fused)
            pending.unfused = []

    def finish_batch(self, pending: PendingBatch, timer: StageTimer, *, first_index: int = 0,
                     total: int | None = None) -> Experience:
        """The experience of a completely generated ``pending`` batch: group ids (global
        when it is one rank's shard of ``total`` rows starting at ``first_index``), texts,
        rewards (waiting for the last ones) and fused tensors."""
        first_id = self.next_group_id + first_index
        self.next_group_id += len(pending.rows) if total is None else total
        return self.finish_groups(pending, list(range(len(pending.rows))), timer, first_id)

    def finish_groups(self, pending: PendingBatch, indices: list[int], timer: StageTimer,
                      first_id: int) -> Experience:
        """The experience of finished groups ``indices`` of ``pending`` (group ``i`` gets id
        ``first_id + i``): texts, rewards (waiting for them) and fused tensors (running the
        passes not yet run on them)."""
        groups = [pending.groups[i] for i in indices]
        prompts = [pending.prompts[i] for i in indices]
        batch = experience_from_completions(prompts, groups, [first_id + i for i in indices],
                                            self.tokenizer.pad_token_id)
        batch.texts = [c.text for group in groups for c in group]
        if pending.score:
            results = self._wait_rewards(pending, indices, timer)
            batch.rewards = torch.cat([r.total for r in results])
            batch.reward_names, batch.reward_terms = reward_terms(results)
            batch.reward_failures = sum(r.num_failures for r in results)
        if pending.fused:  # some groups' passes ran during generation: run the rest's
            missing = [i for i in indices if i not in pending.fused]
            if missing:
                with timer.stage("fused_forwards"):
                    self._fuse(pending.prompts, pending.groups, missing, pending.fused)
            pending.unfused = [i for i in pending.unfused if i not in pending.fused]
            _attach_fused(batch, [pending.fused[i] for i in indices])
        return batch

    def _wait_rewards(self, pending: PendingBatch, indices: list[int], timer: StageTimer):
        """The reward results of groups ``indices`` of ``pending``, in order, once all are
        in (the first failure ends the wait, whichever group); their compute time and
        spans go to ``timer``."""
        with timer.stage("reward_wait"):
            futures = [pending.futures[i] for i in indices]
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            _raise_first_failure(futures)
            timed = [future.result() for future in futures]
        results = [result for result, _, _ in timed]
        timer.times["reward_compute"] = timer.times.get("reward_compute", 0.0) + sum(
            r.seconds for r in results)
        timer.spans.extend(("reward", start, end) for _, start, end in timed)
        return results

    def _fuse(self, prompts, groups, indices: list[int], fused: dict) -> None:
        if not indices:
            return
        chunk = experience_from_completions([prompts[i] for i in indices],
                                            [groups[i] for i in indices], list(indices),
                                            self.tokenizer.pad_token_id).to(self.device)
        outputs = self.fused_forwards(chunk)
        row = 0
        for index in indices:
            size = len(groups[index])
            fused[index] = {name: t[row:row + size] for name, t in outputs.items()}
            row += size

    def _generated_groups(self, prompts, params, n, seeds=None):
        with self.autocast():
            self.engine.reset()  # partial rollouts are not carried across calls
            self.engine.submit(prompts, params, n, seeds=seeds)
            yield from self.engine.stream()

    @contextlib.contextmanager
    def diverged_generation(self):
        """NaN/inf sampling probabilities (diverged weights) end the job with one line."""
        try:
            yield
        except RuntimeError as err:
            if "probability tensor contains" not in str(err):
                raise
            raise TrainingDiverged(self.diverged()) from err

    def _score_group(self, row: dict, group: list[Completion]):
        """Rewards of one prompt's completions (the row's extra fields are passed along),
        with the wall-clock span of the call."""
        start = time.perf_counter()
        size = len(group)
        fields = {key: [value] * size for key, value in row.items() if key != "prompt"}
        result = self.rewards.score([row["prompt"]] * size, [c.text for c in group], fields)
        return result, start, time.perf_counter()

    def close(self) -> None:
        """Stop without waiting for rewards: queued groups are dropped and the call in
        flight ends at once with its worker, so the pool's thread ends too."""
        self._reward_pool.shutdown(wait=False, cancel_futures=True)
        self.rewards.abort()
        self._reward_pool.shutdown(wait=True)
        self.rewards.close()


def reward_terms(results) -> tuple[tuple[str, ...], torch.Tensor]:
    """Each reward function's unweighted values over ``results`` (scored parts of one
    batch, in row order): the functions' names and a ``[B, F]`` tensor."""
    names = tuple(results[0].per_function)
    return names, torch.cat([torch.stack([r.per_function[n] for n in names], dim=1)
                             for r in results])


def _attach_fused(batch: Experience, fused: list[dict]) -> None:
    """Place each group's fused tensors (``fused``, in the batch's group order) into
    ``[B, R]`` fields of ``batch``."""
    for name in fused[0]:
        out = torch.zeros(batch.response_ids.shape)
        row = 0
        for outputs in fused:
            part = outputs[name].cpu()
            out[row:row + part.shape[0], : part.shape[1]] = part
            row += part.shape[0]
        setattr(batch, name, out)


def _note_failure(failed: list, future) -> None:
    """Done-callback of a reward future: keep it in ``failed`` when it raised (so a batch
    checks its failures without polling every future at every finished group)."""
    if not future.cancelled() and future.exception() is not None:
        failed.append(future)


def _raise_first_failure(futures) -> None:
    """Raise the exception of the first finished future that failed, if any."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()
