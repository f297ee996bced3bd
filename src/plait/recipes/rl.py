"""Online RL recipe: GRPO (and its descendants) and PPO with a critic.

One step reads as a dataflow:

    1. draw prompts             (a prompt's whole group stays together)
    2. generate G completions   (rollout engine)
    3. score rewards            (verifiers, user functions, overlong penalty)
    4. reference / old log-probs and critic values (teacher-forced forwards)
    5. advantages               (GRPOVI adjustment, then the estimator)
    6. update                   (epochs x mini-batches x micro-batches)
    7. log, evaluate, checkpoint

With dynamic sampling (DAPO), steps 1-3 repeat until enough groups carry a
learning signal (rewards that differ) or the draw cap is hit.

With several ranks (parallel controllers) every rank runs this same step on
its own contiguous shard of the global prompt batch; the ranks meet only in
collectives: the loss normalisers and the GAE whitening statistics (so the
update equals the one-rank update), the gradient all-reduce (DDP), the
non-finite check and the metric reduction. With ``runtime.controller=single``
rank 0 instead gathers every completion, scores it, computes the advantages
of the whole batch and scatters the shards back (the driver pattern, kept for
comparison).
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from plait import algos
from plait.config import (
    Config,
    ConfigError,
    needs_old_logprobs,
    off_policy_mode,
    streams_groups,
)
from plait.errors import TrainingDiverged
from plait.parallel import fsdp
from plait.parallel.dist import shard_bounds
from plait.parallel.heartbeat import waiting_in
from plait.recipes.session import Session
from plait.rollout.base import SamplingParams
from plait.telemetry.timing import StageTimer
from plait.train.experience import Experience
from plait.train.forward import ResponseLogits, response_logits, response_values, token_logprobs

SUMMED_STATS = frozenset({"loss/policy", "loss/value", "kl_ref", "policy/entropy", "nonfinite"})
# how per-rank step metrics combine: added, largest, or (the rest) averaged
SUMMED_METRICS = ("samples", "tokens", "reward_failures", "groups_drawn", "groups_kept",
                  "loss/policy", "loss/value", "kl_ref", "policy/entropy")
MAX_METRICS = ("response_length/max", "nan_skips", "controller/traffic_bytes",
               "controller/gradient_bytes", "controller/batch_bytes", "controller/peak_rss_mb")


class RLTrainer(Session):
    """GRPO / PPO training loop: one process, or one rank of a data-parallel job."""

    remote = None  # the disaggregated placement's links to the rollout workers (runtime.job)
    during_update = None  # a callable run once inside the next optimizer step (see dynamic)

    @property
    def off_policy(self) -> str:
        return off_policy_mode(self.config)

    def on_start(self) -> None:
        if self.remote is not None:
            self.remote.start(self)

    def setup_training(self, *, resuming: bool = False, load_weights=None) -> None:
        super().setup_training(resuming=resuming, load_weights=load_weights)
        # the modules the update runs through: DDP wrappers when there are several ranks
        # (sharded forwards must be the same on every rank: one model call per micro-batch)
        share = self.config.algo.share_prompt_forward and not self.sharded
        self.train_policy = ResponseLogits(self.policy, share, self.config.algo.pack_group_tokens)
        self.train_critic = self.critic
        if self.dist.active and not self.sharded:
            # buffers (rotary tables) never change: no broadcast before each forward, so
            # a rank's forwards issue no collective and only the backward's all-reduce
            # meets the other ranks (dynamic placement's workers join it late, after
            # generating, while the trainers run their micro-batches)
            ddp = dict(device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       process_group=self.dist.group, **_no_forward_buffer_sync())
            self.train_policy = DistributedDataParallel(self.train_policy, **ddp)
            if self.critic is not None:
                self.train_critic = DistributedDataParallel(self.critic, **ddp)
        self._grad_bytes = sum(p.numel() * p.element_size() for m in self.trainable_models()
                               for p in m.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ rollout

    def sample_seeds(self, first_index: int, count: int, draw: int) -> list[int]:
        """One seed per prompt from (train.seed, step, draw, global prompt index): a
        prompt's samples are the same on any number of ranks and after a resume."""
        base = ((self.config.train.seed * 1_000_003 + self.global_step) * 1_000_003 + draw)
        return [base * 1_000_003 + first_index + i for i in range(count)]

    def sampling_params(self) -> SamplingParams:
        r = self.config.rollout
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, stop=tuple(r.stop))

    def collect(self, timer: StageTimer) -> tuple[Experience | None, dict]:
        """Steps 1-3: prompts, completions and rewards for one RL step."""
        algo = self.config.algo
        kept: list[Experience] = []
        stats = {"draws": 0, "groups_drawn": 0, "reward_failures": 0}
        drawn_rewards, correct = [], []
        last = None
        while True:
            stats["draws"] += 1
            rows = self.draw_rows()                                     # the global batch
            lo, hi = self.dist.shard_bounds(len(rows))                  # this rank's prompts
            stats["groups_drawn"] += hi - lo
            batch = self.rollout(rows[lo:hi], self.sampling_params(), algo.group_size, timer,
                                 fuse=self.fuse_forwards, first_index=lo, total=len(rows),
                                 seeds=self.sample_seeds(lo, hi - lo, stats["draws"]))
            last = batch
            stats["reward_failures"] += batch.reward_failures
            correct.append(batch.rewards >= self.reward_high - 1e-6)
            batch.rewards = self.shape_rewards(batch.rewards, batch)
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
        batch = (Experience.cat(kept, self.tokenizer.pad_token_id) if len(kept) > 1
                 else kept[0]) if kept else None
        if algo.dynamic_sampling:
            batch = self._keep_first_groups(batch, last, stats)
        else:
            stats["groups_kept"] = hi - lo
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

    def draw_rows(self) -> list[dict]:
        """The next global prompt batch (the same on every rank)."""
        return self.train_iter.next_batch(self.config.algo.prompts_per_step)

    def shape_rewards(self, total: torch.Tensor, batch: Experience) -> torch.Tensor:
        """Add the DAPO soft overlong penalty when it is configured."""
        algo = self.config.algo
        if algo.overlong_buffer > 0:
            total = total + algos.overlong_penalty(
                batch.response_lengths, self.config.rollout.max_new_tokens,
                algo.overlong_buffer, algo.overlong_penalty)
        return total

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score_forwards(self, batch: Experience, timer: StageTimer) -> dict[str, float]:
        """Step 4: reference log-probs, behaviour log-probs and critic values (those not
        already computed on finished groups during generation)."""
        stats: dict[str, float] = {}
        if self.reference is not None and batch.ref_logprobs is None:
            with timer.stage("reference"), self.gathered(self.reference):
                batch.ref_logprobs = self._per_token(batch, lambda m: self._logprobs(
                    self.reference, m))
        if self.needs_old_logprobs():
            if self.config.algo.use_engine_logprobs and batch.sampled_logprobs is not None:
                batch.old_logprobs = batch.sampled_logprobs
            else:
                with timer.stage("old_logprobs"), self.gathered(self.policy):
                    batch.old_logprobs = self._per_token(batch, lambda m: self._logprobs(
                        self.policy, m))
                if batch.sampled_logprobs is not None:  # both exist: log the mismatch
                    stats["rollout/logprob_gap_mean"] = _mean_gap(
                        batch.sampled_logprobs, batch.old_logprobs, batch.response_mask)
        if self.critic is not None and batch.values is None:
            with timer.stage("critic"), self.gathered(self.critic):
                batch.values = self._per_token(batch, lambda m: response_values(self.critic, m))
        return stats

    @property
    def fuse_forwards(self) -> bool:
        """Forwards on finished groups during generation: not with sharded models, whose
        gathering every rank must do at the same point."""
        has_passes = self.reference is not None or self.critic is not None
        return self.config.rollout.fuse_forwards and has_passes and not self.sharded

    @torch.no_grad()
    def fused_forwards(self, chunk: Experience) -> dict[str, torch.Tensor]:
        """Reference log-probs and critic values of groups that finished while the rest of
        the batch is still generating (inter-stage fusion)."""
        out = {}
        if self.reference is not None:
            out["ref_logprobs"] = self._per_token(chunk, lambda m: self._logprobs(
                self.reference, m))
        if self.critic is not None:
            out["values"] = self._per_token(chunk, lambda m: response_values(self.critic, m))
        return out

    def _logprobs(self, model, micro: Experience) -> torch.Tensor:
        algo = self.config.algo
        return token_logprobs(response_logits(
            model, micro, self.train_temperature, algo.share_prompt_forward,
            algo.pack_group_tokens), micro.response_ids)

    def _per_token(self, batch: Experience, fn) -> torch.Tensor:
        """``fn`` over micro-batches, reassembled into a ``[B, R]`` tensor in row order."""
        algo = self.config.algo
        out = torch.zeros(batch.response_ids.shape, device=batch.response_ids.device)
        with self.autocast():
            for idx in batch.micro_batch_indices(algo.micro_batch_size, algo.micro_batch_tokens,
                                                 algo.share_prompt_forward):
                part = fn(batch.select(idx).trimmed()).float()
                out[idx.to(out.device), : part.shape[1]] = part
        return out

    def needs_old_logprobs(self) -> bool:
        """A batch used for exactly one update needs no separate pass: its old log-probs
        are the detached current ones. This holds for the off-policy corrections too: with
        one update the proximal policy is the current one, so pi_prox/pi_behav is the
        detached current probability over the engine's."""
        return needs_old_logprobs(self.config)

    @property
    def kl_in_reward(self) -> bool:
        algo = self.config.algo
        return self.uses_reference and algo.kl_coef > 0 and algo.kl_mode == "reward"

    @property
    def kl_in_loss(self) -> bool:
        algo = self.config.algo
        return self.uses_reference and algo.kl_coef > 0 and algo.kl_mode == "loss"

    # ------------------------------------------------------------------ advantages

    def compute_advantages(self, batch: Experience, across_ranks: bool = True
                           ) -> dict[str, float]:
        """Step 5: reward adjustment and the advantage estimator (batch-wide statistics
        over every rank's rows unless ``across_ranks`` is off)."""
        algo = self.config.algo
        mask = batch.response_mask
        rewards = batch.rewards
        stats = {}
        kl_tok = None
        if self.kl_in_reward:
            kl_tok = algos.kl_estimate(batch.old_logprobs, batch.ref_logprobs,
                                       algo.kl_estimator) * mask
            count = mask.sum().double().cpu().reshape(1)
            if across_ranks:  # a share of the global mean: the rank reduction adds shares
                self.dist.all_reduce(count, kind="control")
            stats["kl_ref"] = float(kl_tok.sum() / count.clamp(min=1).item())
        estimator = self.advantage_estimator
        if algo.reward_adjust == "grpovi":
            try:
                rewards = algos.grpovi_adjust_groups(
                    rewards, batch.group_ids, low=self.reward_low, high=self.reward_high,
                    weights=self.grpovi_weights(batch), split_ties=algo.grpovi_split_ties)
            except ValueError as err:
                raise ConfigError(f"GRPOVI: {err}. Every total reward (fallback rewards and "
                                  "penalties included) must lie in algo.reward_range") from None
            stats["reward_adjusted_std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
        if estimator in ("grpo", "drgrpo", "rloo"):
            if kl_tok is not None:
                rewards = rewards - algo.kl_coef * kl_tok.sum(-1)
            if estimator == "rloo":
                seq_adv = algos.rloo_advantages(rewards, batch.group_ids)
            else:
                seq_adv = algos.grpo_advantages(rewards, batch.group_ids,
                                                scale_by_std=estimator == "grpo")
            batch.advantages = algos.broadcast_seq_advantages(seq_adv, mask)
            if batch.ghost:  # zero weight: no NaN from one-row groups may reach the update
                batch.advantages = torch.zeros_like(batch.advantages)
            return stats
        token_rewards = algos.outcome_to_token_rewards(rewards, mask)
        if kl_tok is not None:
            token_rewards = token_rewards - algo.kl_coef * kl_tok
        if estimator == "reinforce++":
            batch.advantages = algos.reinforce_pp_advantages(token_rewards, mask, algo.gamma)
            if batch.ghost:
                batch.advantages = torch.zeros_like(batch.advantages)
            return stats
        adv, returns = algos.gae_advantages(token_rewards, batch.values, mask, algo.gamma,
                                            algo.lam)
        batch.returns = returns
        batch.advantages = self.whiten(adv, mask, across_ranks) * mask
        if batch.ghost:  # zero weight: no NaN from one-row groups may reach the update
            batch.advantages = torch.zeros_like(batch.advantages)
            batch.returns = torch.zeros_like(batch.returns)
        return stats

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, across_ranks: bool = True
               ) -> torch.Tensor:
        """Masked whitening with statistics over every rank's tokens."""
        if not (self.dist.active and across_ranks):
            return algos.masked_whiten(x, mask)
        m = mask.to(x.dtype)
        sums = torch.stack([(x * m).sum(), m.sum()]).double().cpu()
        self.dist.all_reduce(sums, kind="control")
        mean = (sums[0] / sums[1].clamp(min=1)).to(x.dtype).to(x.device)
        sq = torch.stack([((x - mean) ** 2 * m).sum()]).double().cpu()
        self.dist.all_reduce(sq, kind="control")
        var = (sq[0] / (sums[1] - 1).clamp(min=1)).to(x.dtype).to(x.device)
        return (x - mean) * torch.rsqrt(var + 1e-8)

    def grpovi_weights(self, batch: Experience) -> torch.Tensor | None:
        if self.config.algo.grpovi_weights == "uniform":
            return None
        seq_logprobs = algos.sequence_logprob(batch.ref_logprobs, batch.response_mask)
        return algos.sequence_weights_from_logprobs(seq_logprobs.double(),
                                                    group_ids=batch.group_ids)

    # ------------------------------------------------------------------ update

    def update(self, batch: Experience, step: int) -> dict[str, float]:
        """Step 6: epochs x mini-batches of optimizer steps, micro-batched."""
        algo = self.config.algo
        totals: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(self.config.train.seed * 7919 + step)
        for _ in range(algo.epochs):
            order = torch.randperm(batch.batch_size, generator=generator)
            for mini_idx in order.tensor_split(algo.mini_batches):
                mini = batch.select(mini_idx)
                for key, value in self.optimizer_step(mini).items():
                    totals.setdefault(key, []).append(value)
        return {key: sum(v) / len(v) for key, v in totals.items()}

    def optimizer_step(self, mini: Experience) -> dict[str, float]:
        """One optimizer step over a mini-batch, accumulating micro-batch gradients whose
        losses are normalised by mini-batch totals, so the update equals the unsplit one."""
        algo = self.config.algo
        trained = self._rows_with_gradient(mini)
        # the loss is normalised by the whole mini-batch (skipped rows included), logged
        # per-token statistics by the rows trained
        counts = torch.tensor([mini.response_mask.sum().item(), mini.num_real_rows,
                               trained.response_mask.sum().item(), trained.num_real_rows],
                              dtype=torch.float64)
        if self.dist.active:  # normalise by the global mini-batch, so ranks add up exactly
            self.dist.all_reduce(counts, kind="control")
        device = mini.response_mask.device

        def normaliser(tokens, seqs):
            return dict(num_tokens=torch.tensor(float(tokens), device=device).clamp(min=1),
                        num_seqs=max(int(seqs), 1), norm_constant=self.loss_norm_constant)

        norm = normaliser(counts[0], counts[1])
        stat_norm = normaliser(counts[2], counts[3])
        if self.during_update is not None:  # work that overlaps the other ranks' backward
            task, self.during_update = self.during_update, None
            task()
        stats: dict[str, float] = {}
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if algo.skip_zero_advantage and not mini.ghost:
            stats["update/rows_skipped_frac"] = 1.0 - trained.num_real_rows / mini.batch_size
        if trained.ghost and not mini.ghost:  # every row skipped: their loss is exactly 0
            stats["loss/policy"] = 0.0
        mini = trained
        micros = mini.micro_batches(algo.micro_batch_size, algo.micro_batch_tokens,
                                    algo.share_prompt_forward and not self.sharded)
        if self.sharded:  # every rank runs as many sharded forwards/backwards
            micros = self._as_many_micro_batches(micros)
        for i, micro in enumerate(micros):
            # DDP all-reduces the gradients once, in the last micro-batch's backward
            sync = i == len(micros) - 1
            with self._no_sync(sync):
                with self.autocast():
                    loss, micro_stats = self.micro_loss(micro, norm, stat_norm)
                # DDP/FSDP average over ranks; the loss is already a share of the global one
                (loss * self.dist.world_size).backward()
            if micro.ghost:
                continue
            for key, value in micro_stats.items():
                # losses are already fractions of the mini-batch loss: they add up;
                # per-token means (clip fractions, ratios) are averaged by rows
                share = 1.0 if key in SUMMED_STATS else micro.batch_size / mini.batch_size
                stats[key] = stats.get(key, 0.0) + value * share
        return self.apply_gradients(stats)

    def _rows_with_gradient(self, mini: Experience) -> Experience:
        """``mini`` without the rows that add exactly nothing to the gradient (every
        advantage 0 and no other loss term), or ``mini`` itself. A rank left with no row
        keeps one zero-weight row, so it still runs the step's backward and collectives."""
        if not self.config.algo.skip_zero_advantage or self.kl_in_loss or \
                self.config.algo.entropy_coef != 0 or self.critic is not None or \
                mini.advantages is None or mini.ghost:
            return mini
        keep = ((mini.advantages != 0) & mini.response_mask.bool()).any(-1)
        if bool(keep.all()):
            return mini
        if not bool(keep.any()):
            return mini.ghost_row()
        return mini.select(keep.nonzero().squeeze(-1))

    def _as_many_micro_batches(self, micros: list[Experience]) -> list[Experience]:
        """``micros`` padded with zero-weight micro-batches to the largest count over the
        ranks (token budgets or uneven batches can give ranks different counts)."""
        count = torch.tensor([float(len(micros))])
        most = int(self.dist.all_reduce(count, op="max", kind="control"))
        return micros + [micros[0].ghost_row()] * (most - len(micros))

    def _no_sync(self, sync: bool):
        """Skip DDP's gradient all-reduce for every micro-batch but the last."""
        if sync or not self.dist.active:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.sharded:
            models = self.trainable_models()
            fsdp.set_gradient_sync(models, False)
            stack.callback(fsdp.set_gradient_sync, models, True)
            return stack
        for model in (self.train_policy, self.train_critic):
            if isinstance(model, DistributedDataParallel):
                stack.enter_context(model.no_sync())
        return stack

    def micro_loss(self, micro: Experience, norm: dict, stat_norm: dict | None = None
                   ) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a share of the mini-batch loss, normalised by
        ``norm``) and its statistics (logged-only ones normalised by ``stat_norm``)."""
        algo = self.config.algo
        mask = micro.response_mask
        logits = self.train_policy(micro, self.train_temperature)
        logprobs = token_logprobs(logits, micro.response_ids)
        old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()
        weights, wstats = None, {}
        if self.off_policy != "none":  # old = proximal policy, sampled = behaviour policy
            weights, wstats = algos.off_policy_weights(
                old, micro.sampled_logprobs, mask, self.off_policy, algo.off_policy_cap)
        loss, pstats = algos.ppo_policy_loss(
            logprobs, old, micro.advantages, mask, clip_low=algo.clip_low,
            clip_high=algo.clip_high, dual_clip=algo.dual_clip, ratio_level=algo.ratio_level,
            agg=algo.loss_agg, token_weights=weights, **norm)
        stats = {"loss/policy": loss.item(),
                 **{f"policy/{k}": float(v) for k, v in {**pstats, **wstats}.items()}}
        if micro.old_logprobs is None and micro.sampled_logprobs is not None:
            # lean path: the current policy is the behaviour policy, so this is the
            # engine-vs-trainer numeric gap
            stats["rollout/logprob_gap_mean"] = _mean_gap(micro.sampled_logprobs,
                                                          logprobs.detach(), mask)
        if self.kl_in_loss:
            kl = algos.kl_estimate(logprobs, micro.ref_logprobs, algo.kl_estimator)
            kl_loss = algos.aggregate_loss(kl, mask, algo.loss_agg, **norm)
            loss = loss + algo.kl_coef * kl_loss
            stats["kl_ref"] = kl_loss.item()
        if algo.entropy_coef > 0:
            entropy = algos.aggregate_loss(algos.entropy_from_logits(logits), mask,
                                           algo.loss_agg, **norm)
            loss = loss - algo.entropy_coef * entropy
            stats["policy/entropy"] = entropy.item()
        else:  # logged only: keep the [B, R, V] softmax out of the autograd graph
            with torch.no_grad():
                entropy = algos.aggregate_loss(algos.entropy_from_logits(logits.detach()), mask,
                                               algo.loss_agg, **(stat_norm or norm))
            stats["policy/entropy"] = entropy.item()
        if self.critic is not None:
            values = response_values(self.train_critic, micro)
            vloss, vstats = algos.value_loss(values, micro.values, micro.returns, mask,
                                             clip_range=algo.vf_clip, agg=algo.loss_agg, **norm)
            loss = loss + algo.vf_coef * vloss
            stats["loss/value"] = vloss.item()
            stats.update({f"critic/{k}": float(v) for k, v in vstats.items()})
        if not torch.isfinite(loss):
            stats["nonfinite"] = 1.0
        return loss, stats

    def apply_gradients(self, stats: dict[str, float]) -> dict[str, float]:
        """Clip, check for NaN/inf, and step (or skip and count the skip)."""
        max_norm = self.config.optim.max_grad_norm or float("inf")
        finite = stats.pop("nonfinite", 0.0) == 0.0
        for name, model in self.named_trainable_models():
            # the total norm is NaN/inf exactly when some gradient is; after the all-reduce
            # every rank holds the same gradients and so the same norm
            norm = fsdp.local_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                     max_norm))
            stats[f"grad_norm/{name}"] = float(norm)
            finite = finite and bool(torch.isfinite(norm))
        if self.dist.active:  # a non-finite loss on any rank skips the step on all
            # (the gradient all-reduce or reduce-scatter runs inside the backward)
            self.dist.traffic.add("gradients", sent=self._grad_bytes,
                                  received=self._grad_bytes)
            flag = torch.tensor([0.0 if finite else 1.0])
            finite = float(self.dist.all_reduce(flag, op="max", kind="control")) == 0.0
        if not finite:
            self.skip_nonfinite_update()
            stats["skipped"] = 1.0
            return stats
        self.consecutive_nan_skips = 0
        for name, opt in self.optimizers.items():
            opt.step()
            self.schedulers[name].step()
        stats["lr"] = self.schedulers["policy"].get_last_lr()[0]
        return stats

    def skip_nonfinite_update(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.nan_skips += 1
        self.consecutive_nan_skips += 1
        train = self.config.train
        if train.nan_policy == "stop" or self.consecutive_nan_skips >= train.max_nan_skips:
            raise TrainingDiverged(
                f"loss or gradients became NaN/inf ({self.consecutive_nan_skips} update(s) in "
                f"a row, {self.nan_skips} in all); stopping with the last complete checkpoint "
                f"in {self.checkpoint_root} intact. Lower optim.lr or set optim.max_grad_norm")

    # ------------------------------------------------------------------ one step

    def begin_step(self) -> tuple[StageTimer, float, tuple[int, int]]:
        """A step's timer, start time and traffic counters (see :meth:`_controller_load`)."""
        self._held_bytes = 0
        traffic = (self.dist.traffic.total(exclude=("gradients",)), self.dist.traffic.total())
        return StageTimer(), time.perf_counter(), traffic

    def step(self, step: int) -> dict[str, float]:
        timer, start, traffic_before = self.begin_step()
        streamed = self.remote is not None and self.streams_groups
        if self.config.runtime.controller == "single" and self.dist.active:
            batch, metrics = self.collect_single(timer)                 # 1-5 via rank 0
        elif streamed:
            batch, metrics = self.collect_streamed(timer)               # 1-6, group by group
        elif self.remote is not None:
            batch, metrics = self.collect_remote(timer)                 # 1-3 on the workers
            metrics.update(self.rollout_metrics(batch))
            metrics.update(self.score_forwards(batch, timer))          # 4
            metrics.update(self.compute_advantages(batch))             # 5
        else:
            batch, draw_stats = self.collect(timer)                     # 1-3
            metrics: dict[str, float] = {**draw_stats}
            if batch is None:
                metrics["skipped_no_signal"] = 1.0
                return self._timing(metrics, timer, start)
            metrics.update(self.rollout_metrics(batch))
            metrics.update(self.score_forwards(batch, timer))          # 4
            metrics.update(self.compute_advantages(batch))             # 5
        self._held_bytes = max(self._held_bytes, batch.nbytes)
        if not streamed:
            with timer.stage("update"):
                metrics.update(self.update(batch, step))               # 6
        with timer.stage("weight_sync"):
            self.engine.update_weights(None, step + 1)
            if self.remote is not None:
                self.remote.after_update(self, step + 1)
        metrics.update(self._controller_load(traffic_before))
        return self._timing(metrics, timer, start)

    def _controller_load(self, before: tuple[int, int]) -> dict[str, float]:
        """What passed through this process in the step (collective payload bytes, the
        experience it held at once) and its peak memory so far."""
        control = self.dist.traffic.total(exclude=("gradients",)) - before[0]
        total = self.dist.traffic.total() - before[1]
        return {"controller/traffic_bytes": float(control),
                "controller/gradient_bytes": float(total - control),
                "controller/batch_bytes": float(self._held_bytes),
                "controller/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def collect_remote(self, timer: StageTimer, on_part=None) -> tuple[Experience, dict]:
        """Steps 1-3 under the disaggregated placement: this rank's part of the batch the
        rollout workers generated and scored (the wait is the time the trainer idles;
        ``on_part`` as for :meth:`receive_parts`)."""
        rows = self.draw_rows()  # keeps the data position in step with the workers
        return self.receive_parts(self.remote.layout, len(rows), self.remote.channel, timer,
                                  on_part)

    def receive_parts(self, layout, total: int, channel, timer: StageTimer, on_part=None
                      ) -> tuple[Experience, dict]:
        """This trainer's part of a batch of ``total`` prompts made by ``layout``'s rollout
        workers (the wait is the time the trainer idles), with its step statistics.
        ``on_part`` is called on each part as it arrives (rewards shaped)."""
        messages, chunks, correct = [], [], []
        for message in self._messages(layout, total, channel, timer):
            messages.append(message)
            if message["batch"] is not None:
                chunks.append(self._arrived(message["batch"], correct))
                if on_part is not None:
                    on_part(chunks[-1])
        batch, stats = self._assembled(layout, total, messages, chunks, correct)
        if on_part is not None:  # parts taken as they arrived
            stats["rollout/parts"] = float(len(chunks))
        return batch, stats

    def _messages(self, layout, total: int, channel, timer: StageTimer):
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
        chunk.rewards = self.shape_rewards(chunk.rewards, chunk)
        return chunk

    def _assembled(self, layout, total: int, messages: list[dict], chunks: list[Experience],
                   correct: list) -> tuple[Experience, dict]:
        """The batch of the arrived ``chunks`` and its step statistics."""
        batch = Experience.cat(chunks, self.tokenizer.pad_token_id) if len(chunks) > 1 \
            else chunks[0]
        batch.reward_failures = sum(chunk.reward_failures for chunk in chunks)
        version = min(message["version"] for message in messages)
        groups = float(sum(hi - lo for _, lo, hi in layout.trainer_sources(self.dist.rank,
                                                                           total)))
        stats = {"draws": 1.0, "groups_drawn": groups, "groups_kept": groups,
                 "reward_failures": float(batch.reward_failures),
                 "reward_all_mean": float(batch.rewards.mean()),
                 "train/accuracy": float(torch.cat(correct).float().mean()),
                 "rollout/staleness": float(self.global_step - version)}
        # each of the workers' stage times (generate, weights_wait, send, cycle, ...), as
        # of its final message: the largest value over the workers that sent this trainer
        finals = [message for message in messages if message["final"]]
        for name in sorted({name for message in finals for name in message["times"]}):
            stats[f"rollout/worker_{name}_s"] = max(m["times"].get(name, 0.0) for m in finals)
        return batch, stats

    @property
    def streams_groups(self) -> bool:
        """Whether batches of rollout workers apart travel group by group and trainers
        train on each group as it arrives (``runtime.stream_groups``; the same answer on
        workers and trainers: it depends on the config alone)."""
        return streams_groups(self.config)

    def collect_streamed(self, timer: StageTimer) -> tuple[Experience, dict]:
        """Steps 1-6 under ``runtime.stream_groups``: each part the rollout workers send
        (finished groups, scored) gets its forward passes, advantages (group-wise) and
        the forward and backward passes of the update as it arrives, while the workers
        still generate the rest; the optimizer steps once the batch is complete."""
        update = GroupwiseUpdate(self)

        def train_on(part: Experience) -> None:
            self.score_forwards(part, timer)
            self.compute_advantages(part, across_ranks=False)
            with timer.stage("update"):
                update.add(part)

        batch, metrics = self.collect_remote(timer, on_part=train_on)
        metrics.update(self.rollout_metrics(batch))
        if self.needs_old_logprobs() and batch.sampled_logprobs is not None and \
                not self.config.algo.use_engine_logprobs:
            metrics["rollout/logprob_gap_mean"] = _mean_gap(
                batch.sampled_logprobs, batch.old_logprobs, batch.response_mask)
        # the statistics (the advantages are the same: each group's alone)
        metrics.update(self.compute_advantages(batch))
        with timer.stage("update"):
            metrics.update(update.finish())
        return batch, metrics

    def send_parts(self, batch: Experience | None, layout, worker: int, first: int,
                   total: int, channel, version: int, timer: StageTimer, *,
                   final: bool = True, first_id: int | None = None) -> None:
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
                          "version": version, "times": dict(timer.times), "final": final},
                         trainer)

    def collect_single(self, timer: StageTimer) -> tuple[Experience, dict]:
        """Steps 1-5 the single-controller way: rank 0 draws the prompts and scatters
        them, every rank generates and runs its forward passes, rank 0 gathers the whole
        batch, scores it, computes the advantages and scatters each rank's share back."""
        algo, dist = self.config.algo, self.dist
        shards = None
        if dist.is_main:
            rows = self.train_iter.next_batch(algo.prompts_per_step)
            shards = []
            for rank in range(dist.world_size):
                lo, hi = shard_bounds(len(rows), rank, dist.world_size)
                shards.append((lo, rows[lo:hi]))
        first, rows_local = dist.scatter_objects(shards, kind="prompts")
        batch = self.rollout(rows_local, self.sampling_params(), algo.group_size, timer,
                             fuse=self.fuse_forwards, first_index=first,
                             total=algo.prompts_per_step,
                             seeds=self.sample_seeds(first, len(rows_local), 1), score=False)
        self.score_forwards(batch, timer)
        with timer.stage("gather"):
            parts = dist.gather_objects((rows_local, batch.to("cpu")), kind="rollouts")
        metrics: dict[str, float] = {"draws": 1.0}
        pieces = None
        if dist.is_main:
            with timer.stage("driver"):
                pieces, metrics = self._drive(parts, metrics)
        with timer.stage("scatter"):
            batch = dist.scatter_objects(pieces, kind="batches").to(self.device)
        return batch, metrics

    def _drive(self, parts, metrics: dict) -> tuple[list[Experience], dict]:
        """Rank 0's share of the single-controller step: score and compute advantages
        for the whole batch, then cut it back into each rank's rows."""
        rows = [row for part_rows, _ in parts for row in part_rows]
        full = Experience.cat([b for _, b in parts], self.tokenizer.pad_token_id)
        size = self.config.algo.group_size
        prompts = [row["prompt"] for row in rows for _ in range(size)]
        fields = {key: [row[key] for row in rows for _ in range(size)]
                  for key in rows[0] if key != "prompt"}
        result = self.rewards.score(prompts, full.texts, fields)
        correct = result.total >= self.reward_high - 1e-6
        full.rewards = self.shape_rewards(result.total, full)
        metrics.update({"reward_failures": float(result.num_failures),
                        "groups_drawn": float(len(rows)), "groups_kept": float(len(rows)),
                        "reward_all_mean": float(full.rewards.mean()),
                        "train/accuracy": float(correct.float().mean())})
        metrics.update(self.rollout_metrics(full, across_ranks=False))
        metrics.update(self.compute_advantages(full, across_ranks=False))
        pieces, start = [], 0
        for _, part in parts:
            pieces.append(full.select(torch.arange(start, start + part.batch_size)).trimmed())
            start += part.batch_size
        # the driver holds the gathered rollouts, the assembled batch and its cut-up copy
        self._held_bytes = sum(part.nbytes for _, part in parts) + full.nbytes + \
            sum(piece.nbytes for piece in pieces)
        return pieces, metrics

    def rollout_metrics(self, batch: Experience, across_ranks: bool = True) -> dict[str, float]:
        """Reward and length statistics of the step's batch (over every rank's rows)."""
        real = 0 if batch.ghost else batch.batch_size
        lengths = batch.response_lengths.double().cpu()[:real]
        rewards = batch.rewards.double().cpu()[:real]
        sums = torch.tensor([rewards.sum(), (rewards ** 2).sum(), real, lengths.sum()],
                            dtype=torch.float64)
        if across_ranks:
            self.dist.all_reduce(sums, kind="metrics")
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
        }

    def _timing(self, metrics, timer: StageTimer, start: float) -> dict[str, float]:
        """Stage times and throughput; with several ranks, metrics are reduced over them
        (counts added, maxima and stage times the slowest rank's, the rest averaged)."""
        elapsed = time.perf_counter() - start
        metrics.update({f"time/{k}": v for k, v in timer.times.items()})
        metrics.update({f"memory/{k}_peak_mb": v for k, v in timer.memory.items()})
        metrics["time/step"] = elapsed
        metrics["nan_skips"] = float(self.nan_skips)
        if self.dist.active:
            exact = {k: metrics[k] for k in ("reward/mean", "reward/std",
                                             "response_length/mean") if k in metrics}
            maxima = MAX_METRICS + tuple(k for k in metrics
                                         if k.startswith(("time/", "memory/")))
            metrics = self.dist.reduce_metrics(metrics, sums=SUMMED_METRICS, maxima=maxima)
            metrics.update(exact)  # already global
        if "tokens" in metrics:
            metrics["throughput/tokens_per_s"] = metrics["tokens"] / metrics["time/step"]
            metrics["throughput/samples_per_s"] = metrics["samples"] / metrics["time/step"]
        metrics["_spans"] = timer.spans
        return metrics


class GroupwiseUpdate:
    """One optimizer step whose forward and backward passes run part by part as a batch
    arrives (:meth:`RLTrainer.collect_streamed`).

    The loss of every mode of ``algo.loss_agg`` is a sum over tokens or sequences divided
    by a batch-wide count (tokens, or sequences) not known until the last part: each
    part's loss is taken with a normaliser of 1, and the summed gradients are divided by
    the count at the end. Rows that add nothing (``algo.skip_zero_advantage``) are left
    out but counted, as in :meth:`RLTrainer.optimizer_step`. With several trainer ranks
    the backward passes skip DDP's all-reduce (ranks hold different numbers of parts)
    and the gradients are all-reduced once, in one flat buffer, before the division."""

    def __init__(self, trainer: RLTrainer):
        self.trainer = trainer
        # tokens and rows of the parts, then of the rows trained (skipped rows aside)
        self.counts = torch.zeros(4, dtype=torch.float64)
        self.summed: dict[str, float] = {}  # SUMMED_STATS, before normalising
        self.by_row: dict[str, float] = {}  # per-token means x rows, to average by rows
        self.rows_trained = 0
        device = trainer.device
        self.unit = dict(num_tokens=torch.tensor(1.0, device=device), num_seqs=1,
                         norm_constant=trainer.loss_norm_constant)
        for opt in trainer.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def add(self, part: Experience) -> None:
        """Forward and backward passes over ``part`` (whole groups with advantages)."""
        trainer, algo = self.trainer, self.trainer.config.algo
        trained = trainer._rows_with_gradient(part)
        self.counts += torch.tensor([part.response_mask.sum().item(), part.num_real_rows,
                                     trained.response_mask.sum().item(),
                                     trained.num_real_rows], dtype=torch.float64)
        if trained.ghost:
            return
        for micro in trained.micro_batches(algo.micro_batch_size, algo.micro_batch_tokens,
                                           algo.share_prompt_forward):
            with trainer._no_sync(False):  # all-reduced once, in finish()
                with trainer.autocast():
                    loss, stats = trainer.micro_loss(micro, self.unit, self.unit)
                (loss * trainer.dist.world_size).backward()
            self.rows_trained += micro.batch_size
            for key, value in stats.items():
                if key in SUMMED_STATS:
                    self.summed[key] = self.summed.get(key, 0.0) + value
                else:
                    self.by_row[key] = self.by_row.get(key, 0.0) + value * micro.batch_size

    def finish(self) -> dict[str, float]:
        """Reduce and normalise the gradients, then clip and step; the update's stats."""
        trainer, algo = self.trainer, self.trainer.config.algo
        rows_here, trained_here = float(self.counts[1]), float(self.counts[3])
        trainer.dist.all_reduce(self.counts, kind="control")
        tokens, rows, trained_tokens, trained_rows = self.counts.tolist()

        def scale(num_tokens: float, num_rows: float) -> float:
            return 1.0 / max(num_tokens if algo.loss_agg == "token-mean" else num_rows, 1.0)

        grad_scale, stat_scale = scale(tokens, rows), scale(trained_tokens, trained_rows)
        params = [p for model in trainer.trainable_models() for p in model.parameters()
                  if p.requires_grad]
        if trainer.dist.active or not self.rows_trained:
            for p in params:  # every rank reduces the same tensors; a step with no rows
                if p.grad is None:  # trained still steps (as a zero-weight row would)
                    p.grad = torch.zeros_like(p)
        if trainer.dist.active:
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            with waiting_in("all_reduce (gradients)"):
                tdist.all_reduce(flat, group=trainer.dist.group)
            flat /= trainer.dist.world_size
            for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads),
                                     strict=True):
                grad.copy_(reduced)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(grad_scale)
        stats: dict[str, float] = {}
        for key, value in self.summed.items():
            logged_only = key == "policy/entropy" and algo.entropy_coef <= 0
            stats[key] = value if key == "nonfinite" else \
                value * (stat_scale if logged_only else grad_scale)
        for key, value in self.by_row.items():
            stats[key] = value / self.rows_trained
        if algo.skip_zero_advantage:
            stats["update/rows_skipped_frac"] = 1.0 - trained_here / max(rows_here, 1.0)
        if not self.rows_trained:
            stats["loss/policy"] = 0.0
        return trainer.apply_gradients(stats)


def train(config: Config, callbacks=(), dist=None) -> dict:
    """Run an RL job end to end (as one rank of ``dist`` when given) and return its
    summary."""
    with RLTrainer(config, callbacks=callbacks, dist=dist) as trainer:
        return trainer.run()


def _no_forward_buffer_sync() -> dict:
    """DDP's switch for syncing buffers before every forward, by its name in this torch."""
    import inspect

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names \
        else {"broadcast_buffers": False}


def _mean_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute per-token difference over valid tokens."""
    return float(((a - b).abs() * mask).sum() / mask.sum().clamp(min=1))
