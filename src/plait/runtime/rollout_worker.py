"""A rollout worker of the disaggregated and partial placements: generate, score, send.

The worker is composed of what it uses: a :class:`~plait.runtime.generation.Generator`
(the policy's weights in its engine, the rewards), the prompt stream, and the
transport to the trainers (:class:`~plait.runtime.remote.Remote`); it has no
optimizer and never trains. For step ``s`` it makes sure its weights are at
least version ``s - max_staleness`` (receiving pushed versions in order, and
blocking only when it would otherwise be too far ahead), draws the same global
prompt batch every process draws for step ``s``, generates and scores its
contiguous range of it with the same per-prompt seeds a colocated job uses,
and posts each trainer its part without waiting for the trainer to take it. With
``runtime.stream_groups`` (where it applies, see
``Settings.streams_groups``) each group is posted as soon as it
is generated and scored, and the trainer runs its forward and backward passes while the
rest of the batch generates; the batch's last message carries the worker's stage times.
Under the partial placement it also holds the reference model and sends the
reference log-probs with the batch (computed on finished groups while the rest
still generate).

With ``runtime.partial_rollout`` the engine is never drained between batches: a
pushed version is taken between decode steps (the unfinished rows are re-prefilled
and go on under it), and batch ``s + 1`` is submitted as soon as the weights reach
version ``s + 1 - max_staleness``, so its rows fill the slots that batch ``s``'s
finished rows free while its long tail still runs. Batches are posted in order, each
the moment its last group is done. Its stage times then mean: ``generate``, from the
batch's submission to its last group (other batches' rows ran alongside);
``weights_wait``, blocked on a version with nothing to generate; ``weights_load``,
taking versions mid-generation; both since the previous post. Rewards are scored in
the order groups finish, so a batch's last rewards may wait behind groups of the next
batch that finished before them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from plait.config import Config, ConfigError, derive
from plait.parallel.dist import Dist
from plait.parallel.heartbeat import report
from plait.runtime import inputs
from plait.runtime.generation import Generator, PendingBatch, sample_seeds, sampling_params
from plait.runtime.remote import Remote, send_parts
from plait.telemetry.timing import StageTimer
from plait.train.models import autocast, load_reference
from plait.train.scoring import Scorer


@dataclass
class _Submitted:
    """A batch of the partial rollout loop: submitted to the engine, not yet posted."""

    step: int
    pending: PendingBatch
    first: int  # its global prompt range starts here (this worker's share)
    total: int  # prompts in the global batch
    version: int  # the weights it was submitted under (its rows start no older)
    timer: StageTimer
    submitted: float


class RolloutWorker:
    """Serves batches to the trainer ranks (see module doc)."""

    def __init__(self, config: Config, dist: Dist | None = None):
        self.config, self.dist = config, dist or Dist.single()
        self.settings = derive(config)
        run_dir = Path(config.run.dir)
        self.dist.barrier()
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.dir {str(run_dir)!r} is a file, not a directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.device = inputs.configure_process(config, self.dist)
        task = inputs.job_task(config)
        inputs.reward_range(config, task)  # refuses what the trainers refuse
        model_dir, tokenizer, policy = inputs.load_policy(config, self.dist, run_dir)
        self.policy = policy.to(self.device).eval()
        encode = inputs.PromptEncoder(tokenizer, config.model.chat_template)
        self.prompts = inputs.load_prompts(config, task, encode)
        self.step = 0  # the step whose batch is being made (its seeds are that step's)
        rewards = inputs.build_rewards(config, task, self.device)
        self.scorer = Scorer(config, self.settings, policy=self.policy,
                             autocast=self.autocast)
        try:
            engine = inputs.engine_for(config, self.policy, tokenizer, model_dir,
                                       compile=True)
        except ConfigError:
            rewards.close()
            raise
        # nothing trains in a worker's process: its KV cache stays allocated
        self.generator = Generator(
            config, engine, rewards, tokenizer, self.device, encode_prompt=encode,
            autocast=self.autocast, fused_forwards=self.scorer.fused_forwards,
            diverged=lambda: f"the policy produced NaN/inf probabilities while generating "
                             f"for step {self.step + 1}: the weights diverged (lower "
                             f"optim.lr or set optim.max_grad_norm)")

    def autocast(self):
        return autocast(self.config, self.device)

    @property
    def fuse(self) -> bool:
        """Reference log-probs on finished groups during generation (partial placement)."""
        return self.config.rollout.fuse_forwards and self.scorer.reference is not None

    def draw_rows(self) -> list[dict]:
        """The next global prompt batch (every process draws the same)."""
        return self.prompts.train_iter.next_batch(self.config.algo.prompts_per_step)

    def seeds(self, first: int, count: int) -> list[int]:
        return sample_seeds(self.config.train.seed, self.step, first, count, 1)

    def close(self) -> None:
        self.generator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve(self, remote: Remote) -> None:
        """``remote``: the job's links to the trainers (layout, channel, weight broadcast)."""
        cfg = self.config
        worker = remote.layout.worker_ranks.index(self.dist.global_rank)
        start = remote.channel.recv(0, kind="control")
        self.prompts.train_iter.load_state_dict(start["data"])
        self.generator.next_group_id = start["next_group_id"]
        if cfg.runtime.placement == "partial" and self.settings.uses_reference:
            # the reference role lives here: the warm-started model, model.ref_path, or
            # (neither) the starting model this worker loaded, before any weights arrive
            self.scorer.reference = load_reference(cfg, start["reference_dir"], self.policy,
                                                   self.device)
        version = self._receive(remote)
        serve = self._serve_partial if cfg.runtime.partial_rollout else self._serve_in_turn
        serve(remote, worker, start["step"], version)
        remote.channel.wait()
        report("done serving")

    def _serve_in_turn(self, remote, worker: int, first_step: int, version: int) -> None:
        """One batch after the other, each generated from start to end (see module doc)."""
        cfg = self.config
        algo, k = cfg.algo, cfg.runtime.max_staleness
        posted, send_s = None, 0.0  # when posting the previous batch began, how long it took
        for step in range(first_step, cfg.train.steps):
            timer = StageTimer()
            with timer.stage("weights_wait"):
                while version < step - k:
                    report(f"step {step + 1}: waiting for weights v{step - k}")
                    version = self._receive(remote)
            report(f"step {step + 1}: generate (weights v{version})")
            self.step = step  # the seeds are those of this step
            rows = self.draw_rows()
            lo, hi = remote.layout.worker_range(worker, len(rows))
            if self.settings.streams_groups:
                posted, send_s = self._stream_batch(rows[lo:hi], lo, len(rows), remote, worker,
                                                    version, timer, posted, send_s)
                continue
            batch = self.generator.rollout(rows[lo:hi], sampling_params(cfg), algo.group_size,
                                           timer, fuse=self.fuse, first_index=lo,
                                           total=len(rows), seeds=self.seeds(lo, hi - lo))
            posted, send_s = self._post(batch, remote, worker, lo, len(rows), version, timer,
                                        posted, send_s)

    def _serve_partial(self, remote, worker: int, first_step: int, version: int) -> None:
        """The ``runtime.partial_rollout`` loop (see the module doc)."""
        cfg = self.config
        k, last, n = cfg.runtime.max_staleness, cfg.train.steps, cfg.algo.group_size
        params, weights, generator = sampling_params(cfg), remote.weights, self.generator
        engine = generator.engine
        queue: deque[_Submitted] = deque()
        owner: dict[int, tuple[_Submitted, int]] = {}  # engine prompt index -> batch, row
        next_step, next_index = first_step, 0
        posted, send_s, waited, loaded = None, 0.0, 0.0, 0.0

        def due() -> bool:  # the next version will be pushed
            return remote.pushed(version + 1)

        def submit(step: int) -> None:
            nonlocal next_index
            self.step = step  # the seeds are those of this step
            rows = self.draw_rows()
            lo, hi = remote.layout.worker_range(worker, len(rows))
            pending = generator.pending_batch(rows[lo:hi], fuse=self.fuse)
            batch = _Submitted(step, pending, lo, len(rows), version, StageTimer(),
                               time.perf_counter())
            engine.submit(pending.prompts, params, n, seeds=self.seeds(lo, hi - lo),
                          first_index=next_index)
            for row in range(hi - lo):
                owner[next_index + row] = batch, row
            next_index += hi - lo
            queue.append(batch)
            report(f"step {step + 1}: generate (weights v{version})")

        def post(batch: _Submitted) -> None:
            nonlocal posted, send_s, waited, loaded
            timer = batch.timer
            timer.times["generate"] = time.perf_counter() - batch.submitted
            timer.times["weights_wait"], timer.times["weights_load"] = waited, loaded
            waited = loaded = 0.0
            experience = generator.finish_batch(batch.pending, timer, first_index=batch.first,
                                                total=batch.total).to(self.device)
            posted, send_s = self._post(experience, remote, worker, batch.first, batch.total,
                                        batch.version, timer, posted, send_s)

        with generator.diverged_generation(), self.autocast():
            while queue or next_step < last:
                while next_step < last and version >= next_step - k:
                    submit(next_step)
                    next_step += 1
                if not engine.busy:  # every submitted batch is posted: wait for weights
                    report(f"step {next_step + 1}: waiting for weights v{next_step - k}")
                    began = time.perf_counter()
                    version = self._receive(remote)
                    waited += time.perf_counter() - began
                    continue
                for index, group in engine.stream(lambda: due() and weights.poll()):
                    batch, row = owner.pop(index)
                    generator.take_group(batch.pending, row, group, batch.timer)
                    while queue and queue[0].pending.complete:
                        post(queue.popleft())
                if due() and weights.poll():  # paused for a new version: take it now
                    began = time.perf_counter()
                    version = self._receive(remote)
                    loaded += time.perf_counter() - began

    def _stream_batch(self, rows: list[dict], first: int, total: int, remote, worker: int,
                      version: int, timer: StageTimer, posted: float | None, send_s: float
                      ) -> tuple[float, float]:
        """Generate ``rows`` (prompts ``first..`` of a global batch of ``total``) and send
        each finished group to its trainer once its rewards are in (``runtime.
        stream_groups``): the engine pauses between decode runs when a reward has come in,
        the groups scored so far go out, and generation goes on. The final message to each
        trainer carries the rest and the batch's stage times. Returns as :meth:`_post`."""
        cfg, generator = self.config, self.generator
        engine = generator.engine
        pending = generator.pending_batch(rows, fuse=self.fuse)
        first_id = generator.next_group_id + first
        generator.next_group_id += total
        unsent: list[int] = []
        sending = 0.0  # time spent sending parts, out of the generation time

        def scored() -> bool:
            return any(pending.futures[i].done() for i in unsent)

        def send_scored() -> None:
            nonlocal sending
            ready = [i for i in unsent if pending.futures[i].done()]
            if not ready:
                return
            began = time.perf_counter()
            for i in ready:
                unsent.remove(i)
            part = self._with_reference(generator.finish_groups(pending, ready, timer,
                                                                first_id), timer)
            send_parts(part, remote.layout, worker, first, total, remote.channel, version,
                       timer, final=False, first_id=first_id)
            sending += time.perf_counter() - began

        began = time.perf_counter()
        with generator.diverged_generation(), self.autocast():
            engine.reset()
            engine.submit(pending.prompts, sampling_params(cfg), cfg.algo.group_size,
                          seeds=self.seeds(first, len(rows)))
            while True:
                for index, group in engine.stream(scored):
                    generator.take_group(pending, index, group, timer)
                    unsent.append(index)
                    send_scored()
                if not engine.busy:
                    break
                send_scored()
        timer.times["generate"] = time.perf_counter() - began - sending
        rest = generator.finish_groups(pending, unsent, timer, first_id) if unsent else None
        return self._post(rest, remote, worker, first, total, version, timer, posted, send_s,
                          first_id=first_id)

    def _with_reference(self, batch, timer: StageTimer):
        """``batch`` with the reference log-probs the generation did not fuse."""
        scorer = self.scorer
        if batch is not None and scorer.reference is not None and batch.ref_logprobs is None:
            with timer.stage("reference"):
                batch.ref_logprobs = scorer.per_token(batch, scorer.reference_logprobs)
        return batch

    def _post(self, batch, remote, worker: int, first: int, total: int, version: int,
              timer: StageTimer, posted: float | None, send_s: float, *,
              first_id: int | None = None) -> tuple[float, float]:
        """Add the reference log-probs the generation did not fuse, and send each trainer
        its part (the final message of the batch; ``batch`` None when the rest was sent
        group by group; ``first_id`` as for :meth:`send_parts`). ``posted``/``send_s``: when
        posting the previous batch began and how long it took (this batch's cycle runs post
        to post); returns this post's pair."""
        batch = self._with_reference(batch, timer)
        now = time.perf_counter()
        if posted is not None:
            timer.times["cycle"] = now - posted
            timer.times["send"] = send_s
        send_parts(batch, remote.layout, worker, first, total, remote.channel, version, timer,
                   first_id=first_id)
        return now, time.perf_counter() - now

    def _receive(self, remote) -> int:
        """Take the next pushed version, and post the receive of the one after it (if the
        trainer will push it: the version a batch still needs) so that it arrives while
        this worker generates."""
        version = remote.weights.receive()
        self.generator.engine.update_weights(None, version)
        if remote.pushed(version + 1):
            remote.weights.prefetch()
        return version
