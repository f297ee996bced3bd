"""Steps 4 and 5 of an RL step: the teacher-forced forward passes over a batch
(reference log-probs, old log-probs, critic values) and its advantages (GRPOVI
adjustment, KL penalty, the registered estimator).

Both compute only what the batch lacks: a source may deliver parts already done
(forward passes fused into generation, the single controller's advantages computed
on rank 0, parts trained on as they stream in).
"""

from __future__ import annotations

import contextlib
import math

import torch

from plait import algos
from plait.config import Config, ConfigError, Settings
from plait.train.experience import Experience
from plait.train.forward import response_logits, response_values, token_logprobs


class Scorer:
    """The forward passes of step 4, over micro-batches, with the models given (a
    rollout worker holding only a reference passes no critic)."""

    def __init__(self, config: Config, settings: Settings, *, policy, reference=None,
                 critic=None, autocast=contextlib.nullcontext,
                 gathered=lambda *models: contextlib.nullcontext()):
        self.config, self.settings = config, settings
        self.policy, self.reference, self.critic = policy, reference, critic
        self.autocast, self.gathered = autocast, gathered

    @torch.no_grad()
    def score_forwards(self, batch: Experience, timer) -> dict[str, float]:
        """Reference log-probs, behaviour log-probs and critic values (those not already
        computed on finished groups during generation)."""
        stats: dict[str, float] = {}
        if self.reference is not None and batch.ref_logprobs is None:
            with timer.stage("reference"), self.gathered(self.reference):
                batch.ref_logprobs = self.per_token(batch, self.reference_logprobs)
        if self.settings.needs_old_logprobs and batch.old_logprobs is None:
            if self.config.algo.use_engine_logprobs and batch.sampled_logprobs is not None:
                batch.old_logprobs = batch.sampled_logprobs
            else:
                with timer.stage("old_logprobs"), self.gathered(self.policy):
                    batch.old_logprobs = self.per_token(batch, lambda m: self.logprobs(
                        self.policy, m))
                if batch.sampled_logprobs is not None:  # both exist: log the mismatch
                    stats["rollout/logprob_gap_mean"] = mean_gap(
                        batch.sampled_logprobs, batch.old_logprobs, batch.response_mask)
        if self.critic is not None and batch.values is None:
            with timer.stage("critic"), self.gathered(self.critic):
                batch.values = self.per_token(batch, lambda m: response_values(self.critic, m))
        return stats

    @torch.no_grad()
    def fused_forwards(self, chunk: Experience) -> dict[str, torch.Tensor]:
        """Reference log-probs and critic values of groups that finished while the rest of
        the batch is still generating (inter-stage fusion)."""
        out = {}
        if self.reference is not None:
            out["ref_logprobs"] = self.per_token(chunk, self.reference_logprobs)
        if self.critic is not None:
            out["values"] = self.per_token(chunk, lambda m: response_values(self.critic, m))
        return out

    def reference_logprobs(self, micro: Experience) -> torch.Tensor:
        return self.logprobs(self.reference, micro)

    def logprobs(self, model, micro: Experience) -> torch.Tensor:
        algo = self.config.algo
        return token_logprobs(response_logits(
            model, micro, self.settings.train_temperature, algo.share_prompt_forward,
            algo.pack_group_tokens), micro.response_ids)

    def per_token(self, batch: Experience, fn) -> torch.Tensor:
        """``fn`` over micro-batches, reassembled into a ``[B, R]`` tensor in row order."""
        algo = self.config.algo
        out = torch.zeros(batch.response_ids.shape, device=batch.response_ids.device)
        with self.autocast():
            for idx in batch.micro_batch_indices(algo.micro_batch_size, algo.micro_batch_tokens,
                                                 algo.share_prompt_forward):
                part = fn(batch.select(idx).trimmed()).float()
                out[idx.to(out.device), : part.shape[1]] = part
        return out


class KLCoefficient:
    """The KL-to-reference coefficient: ``algo.kl_coef``, or with ``algo.kl_target`` the
    adaptive controller's value, moved after each step by that step's ``kl_ref`` (the same
    on every rank). It lives in the trainer state (``state()``), so checkpoints keep it and
    a resumed run continues from it."""

    def __init__(self, algo, state=None):
        self.algo = algo
        self.state = state  # returns the trainer state dict; None: the coefficient is fixed

    @property
    def value(self) -> float:
        if self.algo.kl_target is None or self.state is None:
            return self.algo.kl_coef
        return self.state().get("kl_coef", self.algo.kl_coef)

    def update(self, metrics: dict[str, float]) -> dict[str, float]:
        """Move the coefficient by the step's metrics; returns ``{"kl_coef": value}`` the
        step ran with when adaptive."""
        if self.algo.kl_target is None or self.state is None or "kl_ref" not in metrics:
            return {}
        used = self.value
        self.state()["kl_coef"] = algos.adaptive_kl_coef(
            used, metrics["kl_ref"], self.algo.kl_target, self.algo.kl_horizon,
            int(metrics["samples"]))
        return {"kl_coef": used}


class RewardShaper:
    """What happens to each scored total reward before the advantages: with
    ``reward.normalize`` it is standardised by the running mean and std of the raw totals
    of the steps before this one (over every rank; the first step's pass unchanged), with
    ``reward.clip`` clipped to ``[-clip, clip]``, and the DAPO overlong penalty and
``reward.missing_eos_penalty`` (a completion cut at max_new_tokens) are added.

    Statistics change only between steps (:meth:`update`, from the step's summed
    metrics), so every path that scores — groups as they stream out, a driver's whole
    batch, parts arriving from rollout workers — shapes a step's rewards alike. They
    live in the trainer state (``state()``), so a resumed run continues them."""

    SUMS = ("reward_raw/sum", "reward_raw/sumsq", "reward_raw/count")

    def __init__(self, config: Config, state=None):
        self.config, self.state = config, state
        self._sums = [0.0, 0.0, 0.0]

    def __call__(self, total: torch.Tensor, batch: Experience) -> torch.Tensor:
        reward, algo = self.config.reward, self.config.algo
        if reward.normalize:
            raw = total.double()
            for i, value in enumerate((raw.sum(), (raw ** 2).sum(), raw.numel())):
                self._sums[i] += float(value)
            count, mean, m2 = self.statistics()
            if count > 1:
                total = ((raw - mean) / math.sqrt(m2 / count + 1e-8)).to(total.dtype)
        if reward.clip is not None:
            total = total.clamp(-reward.clip, reward.clip)
        if algo.overlong_buffer > 0:
            total = total + algos.overlong_penalty(
                batch.response_lengths, self.config.rollout.max_new_tokens,
                algo.overlong_buffer, algo.overlong_penalty)
        if reward.missing_eos_penalty and batch.truncated is not None:
            total = total - reward.missing_eos_penalty * batch.truncated.to(total)
        return total

    def statistics(self) -> tuple[float, float, float]:
        """``(count, mean, M2)`` of the raw totals of the steps so far."""
        if self.state is None:
            return 0.0, 0.0, 0.0
        return tuple(self.state().get("reward_stats", (0.0, 0.0, 0.0)))

    def step_sums(self) -> dict[str, float]:
        """This rank's sums of the raw totals it shaped this step (summed over ranks with
        the step's metrics), and a fresh start for the next step."""
        if not self.config.reward.normalize:
            return {}
        sums, self._sums = self._sums, [0.0, 0.0, 0.0]
        return dict(zip(self.SUMS, sums, strict=True))

    def update(self, metrics: dict[str, float]) -> dict[str, float]:
        """Fold the step's global sums (popped from ``metrics``) into the running
        statistics; returns the raw mean and std of the step for the log."""
        if not self.config.reward.normalize or self.state is None:
            return {}
        total, squares, n = (metrics.pop(key, 0.0) for key in self.SUMS)
        if n == 0:
            return {}
        count, mean, m2 = self.statistics()
        step_mean = total / n
        step_m2 = max(squares - n * step_mean ** 2, 0.0)
        delta, combined = step_mean - mean, count + n
        self.state()["reward_stats"] = [combined, mean + delta * n / combined,
                                        m2 + step_m2 + delta ** 2 * count * n / combined]
        return {"reward_raw/mean": step_mean, "reward_raw/std": math.sqrt(step_m2 / n)}


class Advantages:
    """Step 5: the GRPOVI reward adjustment, the KL penalty (KL in the reward) and the
    estimator ``algos.ESTIMATORS[settings.advantage]``, with batch-wide statistics (KL
    mean, whitening) over every rank's rows unless told otherwise."""

    def __init__(self, config: Config, settings: Settings, dist, reward_range,
                 kl_coef: KLCoefficient | None = None):
        self.config, self.settings, self.dist = config, settings, dist
        self.low, self.high = reward_range
        self.estimator = algos.ESTIMATORS[settings.advantage]
        self.kl_coef = kl_coef or KLCoefficient(config.algo)

    def __call__(self, batch: Experience, across_ranks: bool = True) -> dict[str, float]:
        """Set ``batch.advantages`` (and ``returns`` for a critic) unless the batch came
        with them; the step statistics."""
        if batch.advantages is not None:
            return {}
        return self.compute(batch, across_ranks)

    def compute(self, batch: Experience, across_ranks: bool = True) -> dict[str, float]:
        """Compute the advantages of ``batch`` (replacing any it has)."""
        algo = self.config.algo
        mask = batch.response_mask
        rewards = batch.rewards
        stats = {}
        kl_tok = None
        if self.settings.kl_in_reward:
            kl_tok = algos.kl_estimate(batch.old_logprobs, batch.ref_logprobs,
                                       algo.kl_estimator) * mask
            count = mask.sum().double().cpu().reshape(1)
            if across_ranks:  # a share of the global mean: the rank reduction adds shares
                self.dist.all_reduce(count, kind="control")
            stats["kl_ref"] = float(kl_tok.sum() / count.clamp(min=1).item())
        if algo.reward_adjust == "grpovi":
            try:
                rewards = algos.grpovi_adjust_groups(
                    rewards, batch.group_ids, low=self.low, high=self.high,
                    weights=self.grpovi_weights(batch), split_ties=algo.grpovi_split_ties)
            except ValueError as err:
                raise ConfigError(f"GRPOVI: {err}. Every total reward (fallback rewards and "
                                  "penalties included) must lie in algo.reward_range") from None
            stats["reward_adjusted_std"] = float(rewards.std()) if rewards.numel() > 1 else 0.0
        whiten = self.dist.masked_whiten if across_ranks else algos.masked_whiten
        batch.advantages, returns = self.estimator(algos.AdvantageInputs(
            rewards=rewards, group_ids=batch.group_ids, mask=mask, kl=kl_tok,
            kl_coef=self.kl_coef.value, values=batch.values, gamma=algo.gamma, lam=algo.lam,
            whiten=whiten))
        if returns is not None:
            batch.returns = returns
        if batch.ghost:  # zero weight: no NaN from one-row groups may reach the update
            batch.advantages = torch.zeros_like(batch.advantages)
            if returns is not None:
                batch.returns = torch.zeros_like(batch.returns)
        return stats

    def grpovi_weights(self, batch: Experience) -> torch.Tensor | None:
        if self.config.algo.grpovi_weights == "uniform":
            return None
        seq_logprobs = algos.sequence_logprob(batch.ref_logprobs, batch.response_mask)
        return algos.sequence_weights_from_logprobs(seq_logprobs.double(),
                                                    group_ids=batch.group_ids)


def mean_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute per-token difference over valid tokens."""
    return float(((a - b).abs() * mask).sum() / mask.sum().clamp(min=1))
