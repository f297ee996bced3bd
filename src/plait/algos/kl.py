"""Per-token estimators of KL(π ‖ π_ref) from samples of π, and the KL-penalised reward.

Estimators from J. Schulman, "Approximating KL divergence" (2020,
http://joschu.net/blog/kl-approx.html). With samples y ~ π and log_ratio = log π(y) - log π_ref(y):
    k1 = log_ratio                              unbiased, high variance, can be negative
    k2 = ½ log_ratio²                           biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio        unbiased, low variance, >= 0

The adaptive KL coefficient is Ziegler et al.'s controller (2019, arXiv 1909.08593),
as DeepSpeed-Chat, TRL and OpenRLHF offer it.

Deviation: for k3 plait clamps log_ratio to [-clamp, clamp] (default 20) before ``exp``, so a
token the reference finds vastly more likely cannot overflow; k1 and k2 are never clamped.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str,
    *,
    clamp: float | None = 20.0,
) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate (Schulman 2020, k1 / k2 / k3).

    Args:
        logprobs: [B, T] log π of the sampled tokens.
        ref_logprobs: [B, T] log π_ref of the same tokens.
        kind: one of ``KL_ESTIMATORS``.
        clamp: bound on |log_ratio| applied for k3 only; ``None`` disables it.

    Returns:
        [B, T] per-token estimate (not masked; differentiable w.r.t. both inputs).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid estimators: {KL_ESTIMATORS}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(-log_ratio) - 1 + log_ratio


def kl_penalty_rewards(
    token_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    kind: str,
) -> torch.Tensor:
    """KL-shaped reward r_t - β·KL_t (Ziegler et al. 2019, arXiv 1909.08593; InstructGPT).

    Args:
        token_rewards: [B, T] (e.g. from ``outcome_to_token_rewards``).
        logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under π and π_ref;
            pass detached tensors (a reward is not differentiated through).
        mask: [B, T] 0/1 valid tokens.
        coef: β.
        kind: KL estimator, one of ``KL_ESTIMATORS``.

    Returns:
        [B, T] shaped rewards, 0 on masked positions.
    """
    shaped = token_rewards - coef * kl_estimate(logprobs, ref_logprobs, kind)
    return torch.where(mask.bool(), shaped, torch.zeros_like(shaped))


def adaptive_kl_coef(coef: float, measured_kl: float, target: float, horizon: int,
                     samples: int) -> float:
    """The KL coefficient after one step of the adaptive controller (Ziegler et al. 2019):
    ``coef * (1 + e * samples / horizon)`` with the proportional error
    ``e = clip(measured_kl / target - 1, -0.2, 0.2)``, so the coefficient grows while the
    policy is further from the reference than ``target`` and shrinks while it is closer.

    Args:
        coef: the coefficient the step ran with (> 0).
        measured_kl: the step's KL estimate.
        target: the KL to steer to (> 0).
        horizon: samples over which the coefficient moves by up to 20% of its error.
        samples: the step's sample count.
    """
    if coef <= 0 or target <= 0 or horizon < 1:
        raise ValueError(f"adaptive KL needs coef > 0, target > 0 and horizon >= 1, got "
                         f"{coef}, {target}, {horizon}")
    error = min(max(measured_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)


@torch.no_grad()
def ema_update(averages, params, decay: float) -> None:
    """One step of an exponential moving average, in place: ``a = decay * a + (1 - decay)
    * p`` for each pair (a weight average that smooths the last steps' noise, as
    DeepSpeed-Chat keeps of its actor)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    for average, param in zip(averages, params, strict=True):
        average.lerp_(param.detach().to(average.dtype), 1.0 - decay)
