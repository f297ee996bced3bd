"""Step 6 of an RL step: the policy (and critic) update.

Epochs x mini-batches of optimizer steps; each step accumulates the gradients of
micro-batches whose losses are normalised by mini-batch totals counted over every
rank, so the update equals the unsplit one-process update. Gradients are clipped,
checked for NaN/inf (a non-finite step is skipped on every rank and counted), and
applied. :class:`GroupwiseUpdate` is the same optimizer step with its forward and
backward passes run part by part as a streamed batch arrives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from plait import algos
from plait.config import Config, Settings
from plait.errors import TrainingDiverged
from plait.parallel import fsdp
from plait.parallel.dist import Dist
from plait.train.experience import Experience
from plait.train.forward import response_values, token_logprobs
from plait.train.models import TrainModels
from plait.train.scoring import KLCoefficient, mean_gap

# per-micro-batch statistics that are shares of the mini-batch value (added, not averaged)
SUMMED_STATS = frozenset({"loss/policy", "loss/value", "kl_ref", "policy/entropy", "nonfinite"})


@dataclass
class SkipCount:
    """Optimizer steps skipped because the loss or gradients were NaN/inf: in all, and in
    a row (``train.max_nan_skips`` of them in a row stop the job)."""

    total: int = 0
    in_a_row: int = 0


class Updater:
    """Runs updates of :class:`TrainModels` over batches with advantages; non-finite
    steps are skipped and counted in ``skips``."""

    def __init__(self, config: Config, settings: Settings, dist: Dist, models: TrainModels,
                 *, skips: SkipCount, checkpoint_root, kl_coef: KLCoefficient | None = None):
        self.config, self.settings, self.dist, self.models = config, settings, dist, models
        self.kl_coef = kl_coef or KLCoefficient(config.algo)
        self.skips = skips
        self.checkpoint_root = checkpoint_root  # named when a divergence stops the job
        self.during_update = None  # a callable run once inside the next optimizer step
        self.open_update: GroupwiseUpdate | None = None
        # supervised losses mixed into each optimizer step (PTX, selective rehearsal)
        self.mixed: list = []
        self._step_key = (0, 0)  # (RL step, optimizer step within it)
        self._grad_bytes: int | None = None

    def update(self, batch: Experience, step: int) -> dict[str, float]:
        """Epochs x mini-batches of optimizer steps, micro-batched; or, when the batch's
        parts were already trained on as they arrived (:meth:`groupwise`), the optimizer
        step that completes them."""
        if self.open_update is not None:
            update, self.open_update = self.open_update, None
            return update.finish()
        algo = self.config.algo
        totals: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(self.config.train.seed * 7919 + step)
        for epoch in range(algo.epochs):
            for index, mini in enumerate(self.mini_batches(batch, generator)):
                self._step_key = (step, epoch * algo.mini_batches + index)
                for key, value in self.optimizer_step(mini).items():
                    totals.setdefault(key, []).append(value)
        return {key: sum(v) / len(v) for key, v in totals.items()}

    def mini_batches(self, batch: Experience, generator: torch.Generator) -> list[Experience]:
        """This rank's rows of each of the epoch's mini-batches. The rows of every rank,
        ordered by group, are shuffled and split as one process would split them, so N
        ranks take the one-rank optimizer steps; a rank with no row in a mini-batch joins
        it with a zero-weight row."""
        algo = self.config.algo
        if algo.mini_batches == 1:
            return [batch.select(torch.randperm(batch.batch_size, generator=generator))]
        local = [] if batch.ghost else batch.group_ids.tolist()
        keys, seen = [], {}
        for group in local:  # (group, n-th row of the group on this rank)
            keys.append((group, seen.get(group, 0)))
            seen[group] = seen.get(group, 0) + 1
        everyone = self.dist.all_gather_objects(keys, kind="control") if self.dist.active \
            else [keys]
        ordered = sorted(key for rank_keys in everyone for key in rank_keys)
        row_of = {key: row for row, key in enumerate(keys)}
        minis = []
        for chunk in torch.randperm(len(ordered), generator=generator).tensor_split(
                algo.mini_batches):
            rows = [row_of[ordered[i]] for i in chunk.tolist() if ordered[i] in row_of]
            minis.append(batch.select(torch.tensor(rows, dtype=torch.long)) if rows
                         else batch.ghost_row())
        return minis

    def groupwise(self) -> GroupwiseUpdate:
        """Begin an optimizer step whose parts arrive one by one; the next :meth:`update`
        completes it."""
        self.open_update = GroupwiseUpdate(self)
        return self.open_update

    def optimizer_step(self, mini: Experience) -> dict[str, float]:
        """One optimizer step over a mini-batch, accumulating micro-batch gradients whose
        losses are normalised by mini-batch totals, so the update equals the unsplit one."""
        algo = self.config.algo
        trained = self.rows_with_gradient(mini)
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
                        num_seqs=max(int(seqs), 1),
                        norm_constant=self.settings.loss_norm_constant)

        norm = normaliser(counts[0], counts[1])
        stat_norm = normaliser(counts[2], counts[3])
        if self.during_update is not None:  # work that overlaps the other ranks' backward
            task, self.during_update = self.during_update, None
            task()
        stats: dict[str, float] = {}
        for opt in self.models.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if algo.skip_zero_advantage and not mini.ghost:
            stats["update/rows_skipped_frac"] = 1.0 - trained.num_real_rows / mini.batch_size
        if trained.ghost and not mini.ghost:  # every row skipped: their loss is exactly 0
            stats["loss/policy"] = 0.0
        mini = trained
        for mixed in self.mixed:  # their gradients join the micro-batches' (synced) ones
            stats.update(mixed.backward(self.models.policy, *self._step_key,
                                        autocast=self.models.autocast))
        sharded = self.models.sharded
        micros = mini.micro_batches(algo.micro_batch_size, algo.micro_batch_tokens,
                                    algo.share_prompt_forward and not sharded)
        if sharded:  # every rank runs as many sharded forwards/backwards
            micros = self._as_many_micro_batches(micros)
        for i, micro in enumerate(micros):
            # DDP all-reduces the gradients once, in the last micro-batch's backward
            sync = i == len(micros) - 1
            with self.no_sync(sync):
                with self.models.autocast():
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

    def rows_with_gradient(self, mini: Experience) -> Experience:
        """``mini`` without the rows that add exactly nothing to the gradient (every
        advantage 0 and no other loss term), or ``mini`` itself. A rank left with no row
        keeps one zero-weight row, so it still runs the step's backward and collectives."""
        algo = self.config.algo
        if not algo.skip_zero_advantage or self.settings.kl_in_loss or \
                algo.entropy_coef != 0 or self.models.critic is not None or \
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

    def no_sync(self, sync: bool):
        """Skip DDP's gradient all-reduce for every micro-batch but the last."""
        if sync or not self.dist.active:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.models.sharded:
            models = self.models.trainable_models()
            fsdp.set_gradient_sync(models, False)
            stack.callback(fsdp.set_gradient_sync, models, True)
            return stack
        for model in (self.models.train_policy, self.models.train_critic):
            if isinstance(model, DistributedDataParallel):
                stack.enter_context(model.no_sync())
        return stack

    def micro_loss(self, micro: Experience, norm: dict, stat_norm: dict | None = None
                   ) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (a share of the mini-batch loss, normalised by
        ``norm``) and its statistics (logged-only ones normalised by ``stat_norm``)."""
        algo, models = self.config.algo, self.models
        mask = micro.response_mask
        logits = models.train_policy(micro, self.settings.train_temperature)
        logprobs = token_logprobs(logits, micro.response_ids)
        old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()
        weights, wstats = None, {}
        if self.settings.off_policy != "none":  # old = proximal, sampled = behaviour policy
            weights, wstats = algos.off_policy_weights(
                old, micro.sampled_logprobs, mask, self.settings.off_policy,
                algo.off_policy_cap)
        loss, pstats = algos.ppo_policy_loss(
            logprobs, old, micro.advantages, mask, clip_low=algo.clip_low,
            clip_high=algo.clip_high, dual_clip=algo.dual_clip, ratio_level=algo.ratio_level,
            agg=algo.loss_agg, token_weights=weights, **norm)
        stats = {"loss/policy": loss.item(),
                 **{f"policy/{k}": float(v) for k, v in {**pstats, **wstats}.items()}}
        if micro.old_logprobs is None and micro.sampled_logprobs is not None:
            # lean path: the current policy is the behaviour policy, so this is the
            # engine-vs-trainer numeric gap
            stats["rollout/logprob_gap_mean"] = mean_gap(micro.sampled_logprobs,
                                                         logprobs.detach(), mask)
        if self.settings.kl_in_loss:
            kl = algos.kl_estimate(logprobs, micro.ref_logprobs, algo.kl_estimator)
            kl_loss = algos.aggregate_loss(kl, mask, algo.loss_agg, **norm)
            loss = loss + self.kl_coef.value * kl_loss
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
        if models.critic is not None:
            values = response_values(models.train_critic, micro)
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
        for name, model in self.models.named_trainable_models():
            # the total norm is NaN/inf exactly when some gradient is; after the all-reduce
            # every rank holds the same gradients and so the same norm
            norm = fsdp.local_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                     max_norm))
            stats[f"grad_norm/{name}"] = float(norm)
            finite = finite and bool(torch.isfinite(norm))
        if self.dist.active:  # a non-finite loss on any rank skips the step on all
            # (the gradient all-reduce or reduce-scatter runs inside the backward)
            if self._grad_bytes is None:
                self._grad_bytes = self.models.gradient_bytes()
            self.dist.traffic.add("gradients", sent=self._grad_bytes,
                                  received=self._grad_bytes)
            flag = torch.tensor([0.0 if finite else 1.0])
            finite = float(self.dist.all_reduce(flag, op="max", kind="control")) == 0.0
        if not finite:
            self.skip_nonfinite_update()
            stats["skipped"] = 1.0
            return stats
        self.skips.in_a_row = 0
        for name, opt in self.models.optimizers.items():
            opt.step()
            self.models.schedulers[name].step()
        self.models.update_ema()
        stats["lr"] = self.models.schedulers["policy"].get_last_lr()[0]
        return stats

    def skip_nonfinite_update(self) -> None:
        for opt in self.models.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.skips.total += 1
        self.skips.in_a_row += 1
        train = self.config.train
        if train.nan_policy == "stop" or self.skips.in_a_row >= train.max_nan_skips:
            raise TrainingDiverged(
                f"loss or gradients became NaN/inf ({self.skips.in_a_row} update(s) in "
                f"a row, {self.skips.total} in all); stopping with the last complete checkpoint "
                f"in {self.checkpoint_root} intact. Lower optim.lr or set optim.max_grad_norm")


class GroupwiseUpdate:
    """One optimizer step whose forward and backward passes run part by part as a batch
    arrives (a streamed source trains on each part as it comes).

    The loss of every mode of ``algo.loss_agg`` is a sum over tokens or sequences divided
    by a batch-wide count (tokens, or sequences) not known until the last part: each
    part's loss is taken with a normaliser of 1, and the summed gradients are divided by
    the count at the end. Rows that add nothing (``algo.skip_zero_advantage``) are left
    out but counted, as in :meth:`Updater.optimizer_step`. With several trainer ranks
    the backward passes skip DDP's all-reduce (ranks hold different numbers of parts)
    and the gradients are averaged once, in one flat buffer, before the division."""

    def __init__(self, updater: Updater):
        self.updater = updater
        # tokens and rows of the parts, then of the rows trained (skipped rows aside)
        self.counts = torch.zeros(4, dtype=torch.float64)
        self.summed: dict[str, float] = {}  # SUMMED_STATS, before normalising
        self.by_row: dict[str, float] = {}  # per-token means x rows, to average by rows
        self.rows_trained = 0
        self.unit = dict(num_tokens=torch.tensor(1.0, device=updater.models.device),
                         num_seqs=1, norm_constant=updater.settings.loss_norm_constant)
        for opt in updater.models.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def add(self, part: Experience) -> None:
        """Forward and backward passes over ``part`` (whole groups with advantages)."""
        updater, algo = self.updater, self.updater.config.algo
        trained = updater.rows_with_gradient(part)
        self.counts += torch.tensor([part.response_mask.sum().item(), part.num_real_rows,
                                     trained.response_mask.sum().item(),
                                     trained.num_real_rows], dtype=torch.float64)
        if trained.ghost:
            return
        for micro in trained.micro_batches(algo.micro_batch_size, algo.micro_batch_tokens,
                                           algo.share_prompt_forward):
            with updater.no_sync(False):  # averaged once, in finish()
                with updater.models.autocast():
                    loss, stats = updater.micro_loss(micro, self.unit, self.unit)
                (loss * updater.dist.world_size).backward()
            self.rows_trained += micro.batch_size
            for key, value in stats.items():
                if key in SUMMED_STATS:
                    self.summed[key] = self.summed.get(key, 0.0) + value
                else:
                    self.by_row[key] = self.by_row.get(key, 0.0) + value * micro.batch_size

    def finish(self) -> dict[str, float]:
        """Reduce and normalise the gradients, then clip and step; the update's stats."""
        updater, algo = self.updater, self.updater.config.algo
        dist = updater.dist
        rows_here, trained_here = float(self.counts[1]), float(self.counts[3])
        dist.all_reduce(self.counts, kind="control")
        tokens, rows, trained_tokens, trained_rows = self.counts.tolist()

        def scale(num_tokens: float, num_rows: float) -> float:
            return 1.0 / max(num_tokens if algo.loss_agg == "token-mean" else num_rows, 1.0)

        grad_scale, stat_scale = scale(tokens, rows), scale(trained_tokens, trained_rows)
        params = [p for model in updater.models.trainable_models() for p in model.parameters()
                  if p.requires_grad]
        if dist.active or not self.rows_trained:
            for p in params:  # every rank reduces the same tensors; a step with no rows
                if p.grad is None:  # trained still steps (as a zero-weight row would)
                    p.grad = torch.zeros_like(p)
        dist.average_gradients([p.grad for p in params])
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
        return updater.apply_gradients(stats)
