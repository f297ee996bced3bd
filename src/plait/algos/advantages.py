"""Advantage estimators: GAE, GRPO / Dr.GRPO, RLOO, REINFORCE++, and reward placement helpers.

:data:`ESTIMATORS` maps each ``algo.advantage`` name to a function of
:class:`AdvantageInputs`; adding an estimator is one function and one
:func:`register_estimator` (plus its name in the config's choices).

Shapes: B sequences, T response tokens; ``mask`` [B, T] is 1 on valid response tokens.
All outputs are detached: advantages and returns are targets, never differentiated through.

Deviations and choices (plait's, beyond the papers):
- GAE and REINFORCE++ skip masked positions rather than stopping at them: a masked token is
  transparent to the backward recursion (value and accumulated advantage pass through it).
  For right-padded responses (1s then 0s) this is exactly textbook GAE with V(after end) = 0;
  it also handles left padding or interior holes.
- GRPO uses the unbiased (n - 1) group standard deviation, as ``torch.std`` does and as the
  reference GRPO implementations (TRL, verl) do; the DeepSeekMath paper just says "std".
- A group of size 1 gets advantage 0 in GRPO and RLOO (no baseline can be formed).
- REINFORCE++ whitens with the unbiased variance over all valid tokens of the batch, eps 1e-8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.algos._groups import group_stats
from plait.algos.aggregation import masked_whiten


def _masked_backward_scan(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """GAE backward recursion over valid tokens; masked positions are skipped. Returns [B, T]."""
    valid = mask.bool()
    batch, length = token_rewards.shape
    next_value = token_rewards.new_zeros(batch)
    next_adv = token_rewards.new_zeros(batch)
    advantages = []
    for t in reversed(range(length)):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        advantages.append(torch.where(valid[:, t], adv_t, torch.zeros_like(adv_t)))
    return torch.stack(advantages[::-1], dim=1)


@torch.no_grad()
def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16).

    δ_t = r_t + γ V_{t+1} - V_t,  A_t = Σ_l (γλ)^l δ_{t+l},  R_t = A_t + V_t,
    with V after the last valid token = 0 (the episode ends with the response).

    Args:
        token_rewards: [B, T] per-token reward (e.g. KL penalty + score on the last token).
        values: [B, T] critic values V_t of the state before token t is generated.
        mask: [B, T] 0/1 valid response tokens.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        (advantages [B, T], returns [B, T]), both 0 on masked positions, detached.
    """
    advantages = _masked_backward_scan(token_rewards, values, mask, gamma, lam)
    zero = torch.zeros_like(values)
    returns = torch.where(mask.bool(), advantages + values, zero)
    return advantages, returns


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantage (GRPO, Shao et al. 2024, arXiv 2402.03300, outcome supervision).

    A_i = (r_i - mean_g) / (std_g + eps), std unbiased (n - 1). With ``scale_by_std=False``:
    A_i = r_i - mean_g (Dr.GRPO, Liu et al. 2025, arXiv 2503.20783). Size-1 groups and groups with
    all-equal rewards get 0 (also with eps=0).

    Args:
        rewards: [B] scalar reward per sequence.
        group_ids: [B] long, arbitrary group labels (one group = one prompt's samples).

    Returns:
        [B] advantages, detached, dtype of ``rewards`` (default float dtype for integer input).
    """
    count, centred, centred_sq_sum = group_stats(rewards, group_ids)
    centred = torch.where(count > 1, centred, torch.zeros_like(centred))
    if not scale_by_std:
        return centred
    scale = torch.sqrt(centred_sq_sum / (count - 1).clamp(min=1)) + eps
    # scale is 0 only with eps=0 and all-equal rewards, where centred is 0 too: return 0, not NaN
    return torch.where(scale > 0, centred / scale, torch.zeros_like(centred))


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (RLOO, Ahmadian et al. 2024, arXiv 2402.14740).

    A_i = r_i - (1 / (n - 1)) Σ_{j≠i} r_j = n / (n - 1) · (r_i - mean_g); size-1 groups get 0.

    Args:
        rewards: [B]; group_ids: [B] long, arbitrary labels.

    Returns:
        [B] advantages, detached.
    """
    count, centred, _ = group_stats(rewards, group_ids)
    scale = count / (count - 1).clamp(min=1)
    return torch.where(count > 1, scale * centred, torch.zeros_like(centred))


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
    whiten: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_whiten,
) -> torch.Tensor:
    """REINFORCE++ advantage (Hu 2025, arXiv 2501.03262): whitened discounted return-to-go.

    G_t = Σ_{s>=t} γ^(s-t) r_s over valid tokens, then (G - mean) / sqrt(var + 1e-8) with mean
    and unbiased variance over all valid tokens of the batch (global, not per prompt).

    Args:
        token_rewards: [B, T] (KL penalty per token and/or the outcome reward on the last token).
        mask: [B, T] 0/1 valid tokens.
        gamma: discount.
        whiten: masked whitening; data-parallel ranks pass one whose statistics cover
            every rank's tokens, so the batch is whitened as one.

    Returns:
        [B, T] advantages, 0 on masked positions, detached.
    """
    zero_values = torch.zeros_like(token_rewards)
    returns = _masked_backward_scan(token_rewards, zero_values, mask, gamma, lam=1.0)
    return whiten(returns, mask) * mask.to(returns.dtype)


def outcome_to_token_rewards(seq_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's reward on its last valid token (outcome supervision).

    Args:
        seq_rewards: [B].
        mask: [B, T] 0/1; rows with no valid token get no reward.

    Returns:
        [B, T], zero except at each row's last valid position.
    """
    length = mask.shape[1]
    positions = torch.arange(1, length + 1, device=mask.device).expand_as(mask)
    last_plus_one = torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(-1)
    one_hot = positions == last_plus_one.unsqueeze(-1)
    return seq_rewards.unsqueeze(-1) * one_hot.to(seq_rewards.dtype)


def broadcast_seq_advantages(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every valid token its sequence's advantage: [B] -> [B, T] (``adv[:, None] * mask``)."""
    return adv.unsqueeze(-1) * mask.to(adv.dtype)


# ---------------------------------------------------------------------------- registry


@dataclass
class AdvantageInputs:
    """What an estimator may read about a batch: total rewards per sequence (after any
    adjustment such as GRPOVI), group labels, the response mask, the per-token KL to the
    reference with its coefficient when KL is a reward penalty (else None), the critic's
    values (GAE), the discounts, and the whitening to use (batch-wide statistics)."""

    rewards: torch.Tensor
    group_ids: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor | None = None
    kl_coef: float = 0.0
    values: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 1.0
    whiten: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_whiten


Estimator = Callable[[AdvantageInputs], "tuple[torch.Tensor, torch.Tensor | None]"]
ESTIMATORS: dict[str, Estimator] = {}
NEEDS_CRITIC: set[str] = set()


def register_estimator(name: str, *, needs_critic: bool = False) -> Callable[[Estimator],
                                                                             Estimator]:
    """Register ``fn(inputs) -> (advantages [B, T], returns [B, T] or None)`` under
    ``name``; ``needs_critic``: the estimator reads ``inputs.values``."""

    def add(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        if needs_critic:
            NEEDS_CRITIC.add(name)
        return fn

    return add


def _sequence_rewards(inputs: AdvantageInputs) -> torch.Tensor:
    """Sequence rewards with the summed KL penalty taken off (KL in the reward)."""
    if inputs.kl is None:
        return inputs.rewards
    return inputs.rewards - inputs.kl_coef * inputs.kl.sum(-1)


def _token_rewards(inputs: AdvantageInputs) -> torch.Tensor:
    """The outcome on each sequence's last token, minus the per-token KL penalty."""
    token_rewards = outcome_to_token_rewards(inputs.rewards, inputs.mask)
    if inputs.kl is not None:
        token_rewards = token_rewards - inputs.kl_coef * inputs.kl
    return token_rewards


@register_estimator("grpo")
def _grpo(inputs: AdvantageInputs):
    seq = grpo_advantages(_sequence_rewards(inputs), inputs.group_ids, scale_by_std=True)
    return broadcast_seq_advantages(seq, inputs.mask), None


@register_estimator("drgrpo")
def _drgrpo(inputs: AdvantageInputs):
    seq = grpo_advantages(_sequence_rewards(inputs), inputs.group_ids, scale_by_std=False)
    return broadcast_seq_advantages(seq, inputs.mask), None


@register_estimator("rloo")
def _rloo(inputs: AdvantageInputs):
    seq = rloo_advantages(_sequence_rewards(inputs), inputs.group_ids)
    return broadcast_seq_advantages(seq, inputs.mask), None


@register_estimator("reinforce++")
def _reinforce_pp(inputs: AdvantageInputs):
    return reinforce_pp_advantages(_token_rewards(inputs), inputs.mask, inputs.gamma,
                                   whiten=inputs.whiten), None


@register_estimator("gae", needs_critic=True)
def _gae(inputs: AdvantageInputs):
    adv, returns = gae_advantages(_token_rewards(inputs), inputs.values, inputs.mask,
                                  inputs.gamma, inputs.lam)
    return inputs.whiten(adv, inputs.mask) * inputs.mask, returns
