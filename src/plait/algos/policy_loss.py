"""Policy and value losses: clipped PPO (with clip-higher, dual-clip, GSPO), value loss, entropy.

Shapes: B sequences, T response tokens, V vocabulary; ``mask`` [B, T] is 1 on valid tokens.

Papers and plait's deviations:
- PPO clipped surrogate: Schulman et al. 2017, arXiv 1707.06347, eq. 7. The ratio range is
  asymmetric, [1 - clip_low, 1 + clip_high] ("clip-higher", DAPO, Yu et al. 2025,
  arXiv 2503.14476). Dual-clip: Ye et al. 2020, arXiv 1912.09729 — for A < 0 the loss
  -A·ratio is additionally capped at -c·A.
- GSPO (Zheng et al. 2025, arXiv 2507.18071), ``ratio_level="sequence"``: plait implements
  the GSPO-token form. s_i = exp(mean_t (log π - log π_old)) over the valid tokens of row i;
  the per-token ratio in the loss is sg(s_i)·π_t/sg(π_t), whose value is s_i and whose gradient
  is s_i·∇log π_t, so per-token advantages are allowed and the clip (on s_i) acts per sequence.
  With one advantage per sequence and ``agg="seq-mean-token-mean"`` this equals sequence-level
  GSPO exactly (value and gradient). GSPO's paper uses much smaller clip ranges (≈3e-4 / 4e-4)
  than token-level PPO; choosing them is the caller's job.
- The log-ratio is clamped to [-20, 20] before ``exp`` (as verl does) so the ratio cannot
  overflow; this only matters for tokens whose probability changed by a factor > e^20.
- Stats: ``approx_kl`` is the k3 estimate of KL(π_old ‖ π) on the sampled tokens,
  mean over valid tokens of exp(ℓ) - 1 - ℓ with ℓ = log π - log π_old (token level, even for
  GSPO); ``clipfrac`` counts valid tokens where the ratio clip is active (the clipped branch
  gives the larger loss); ``dual_clipfrac`` those where the dual-clip cap is active.
- Value loss: PPO2-style value clipping (OpenAI baselines; DeepSpeed-Chat uses clip 0.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plait.algos.aggregation import aggregate_loss, masked_mean
from plait.algos.kl import kl_estimate

_LOG_RATIO_BOUND = 20.0

# The importance ratio of the surrogate, by ``ratio_level``: each entry maps (log π, log
# π_old, mask) to the log-ratio [B, T] the clipped loss uses. A new ratio form of the PPO
# family is one function and one :func:`register_log_ratio`.
LOG_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_log_ratio(name: str):
    def add(fn):
        LOG_RATIOS[name] = fn
        return fn

    return add


@register_log_ratio("token")
def _token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """PPO's per-token ratio."""
    return logprobs - old_logprobs


@register_log_ratio("sequence")
def _sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token (see module doc): the sequence's geometric-mean ratio, with each token's
    own gradient."""
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1)  # [B], log s_i
    return seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()


RATIO_LEVELS = tuple(LOG_RATIOS)


def _loss_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, ratio_level: str
) -> torch.Tensor:
    """Log of the ratio used in the surrogate, [B, T] (:data:`LOG_RATIOS`)."""
    fn = LOG_RATIOS.get(ratio_level)
    if fn is None:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid levels: {RATIO_LEVELS}")
    return fn(logprobs, old_logprobs, mask)


def _clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped PPO loss [B, T] and the masks where the clip / dual clip are active."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
    return loss, clip_active, dual_active


def _check_clip_args(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, "
            f"clip_high={clip_high}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {dual_clip}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    agg: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_constant: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    loss_t = max(-A_t·ρ_t, -A_t·clip(ρ_t, 1 - clip_low, 1 + clip_high)), and if ``dual_clip``
    = c: loss_t = min(loss_t, -c·A_t) where A_t < 0. ρ_t = π_t/π_old,t (``ratio_level="token"``)
    or the GSPO-token ratio (``"sequence"``, see module doc). Aggregated by ``aggregate_loss``.

    Args:
        logprobs: [B, T] log π of the sampled tokens (requires grad).
        old_logprobs: [B, T] log π_old (behaviour policy), detached.
        advantages: [B, T] per-token advantages, detached.
        mask: [B, T] 0/1 valid tokens.
        agg, num_tokens, num_seqs, norm_constant: forwarded to ``aggregate_loss``.
        token_weights: optional [B, T] detached weights multiplying each token's loss (the
            off-policy importance weights of :func:`off_policy_weights`).

    Returns:
        (scalar loss, stats) with stats detached scalars: clipfrac, dual_clipfrac, approx_kl,
        ratio_mean.
    """
    _check_clip_args(clip_low, clip_high, dual_clip)
    log_ratio = _loss_log_ratio(logprobs, old_logprobs, mask, ratio_level)
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    loss_mat, clip_active, dual_active = _clipped_surrogate(
        ratio, advantages, clip_low, clip_high, dual_clip
    )
    if token_weights is not None:
        loss_mat = loss_mat * token_weights
    loss = aggregate_loss(
        loss_mat, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant
    )
    with torch.no_grad():
        approx_kl = kl_estimate(old_logprobs, logprobs, "k3", clamp=_LOG_RATIO_BOUND)
        stats = {
            "clipfrac": masked_mean(clip_active.to(ratio.dtype), mask),
            "dual_clipfrac": masked_mean(dual_active.to(ratio.dtype), mask),
            "approx_kl": masked_mean(approx_kl, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss, optionally with PPO2 value clipping.

    Without ``clip_range``: ½ (V - R)². With it: ½ max((V - R)², (V_clip - R)²) where
    V_clip = V_old + clamp(V - V_old, -clip_range, clip_range).

    Args:
        values: [B, T] current critic values (requires grad).
        old_values: [B, T] values at rollout time, detached.
        returns: [B, T] targets (e.g. from ``gae_advantages``), detached.
        mask: [B, T] 0/1 valid tokens.
        agg, num_tokens, num_seqs, norm_constant: forwarded to ``aggregate_loss``.

    Returns:
        (scalar loss, {"vf_clipfrac": fraction of valid tokens where the clipped term is larger}).
    """
    unclipped = (values - returns).square()
    if clip_range is None:
        loss_mat = 0.5 * unclipped
        clip_active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns).square()
        loss_mat = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate_loss(
        loss_mat, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant
    )
    vf_clipfrac = masked_mean(clip_active.to(values.dtype), mask).detach()
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution per position: H = logsumexp(l) - Σ softmax(l)·l.

    Stable for large logits (no explicit exp of unnormalised logits) and for -inf logits
    (masked vocabulary entries contribute 0). Materialises [B, T, V]; chunk over T if needed.

    Args:
        logits: [B, T, V].

    Returns:
        [B, T] entropy in nats.
    """
    finite_logits = logits.masked_fill(torch.isneginf(logits), torch.finfo(logits.dtype).min)
    probs = torch.softmax(finite_logits, dim=-1)
    return torch.logsumexp(finite_logits, dim=-1) - (probs * finite_logits).sum(-1)


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y) = Σ_t log π(y_t | y_<t) over valid tokens: [B, T] -> [B]."""
    valid = torch.where(mask.bool(), token_logprobs, torch.zeros_like(token_logprobs))
    return valid.sum(-1)


OFF_POLICY_MODES = ("decoupled", "tis")


def off_policy_weights(
    prox_logprobs: torch.Tensor,
    behav_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "decoupled",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token importance weights w = π_prox/π_behav for samples generated by older
    weights (π_behav, the engine's) and trained against the proximal policy π_prox (the
    trainer's weights before this update, the ``old_logprobs`` of the clipped ratio).

    - ``"decoupled"`` (decoupled PPO, AReaL, arXiv 2505.24298): the clipped surrogate is
      weighted by w; tokens whose w exceeds ``cap`` get weight 0 (plait keeps them in the
      loss normaliser, so the weighting does not rescale the other tokens).
    - ``"tis"`` (truncated importance sampling): weight min(w, cap).

    Args:
        prox_logprobs, behav_logprobs, mask: [B, T].
    Returns:
        (weights [B, T] detached, stats: mean weight and the fraction of valid tokens whose
        weight was capped or masked).
    """
    if mode not in OFF_POLICY_MODES:
        raise ValueError(f"unknown off-policy mode {mode!r}; valid: {OFF_POLICY_MODES}")
    if cap < 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    log_w = (prox_logprobs - behav_logprobs).detach().clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    weights = torch.exp(log_w)
    over = weights > cap
    if mode == "decoupled":
        weights = torch.where(over, torch.zeros_like(weights), weights)
    else:
        weights = weights.clamp(max=cap)
    weights = weights * mask
    stats = {"is_weight_mean": masked_mean(weights, mask),
             "is_capped_frac": masked_mean(over.to(weights.dtype), mask)}
    return weights, stats
