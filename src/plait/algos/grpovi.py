"""GRPOVI: reward variance increase before GRPO's group normalisation (arXiv 2505.23247).

For one group (one prompt's n responses) with rewards r, weights p > 0 and the reward model's
range [m, M], find the adjusted rewards

    z* = argmax_z  Σ p_i z_i²
         s.t.      m <= z_i <= M,   Σ p_i z_i = Σ p_i r_i,   r_i > r_k  =>  z_i >= z_k.

A convex function is maximised at a vertex; in reward order the optimum is (M, …, M, t, m, …, m)
with at most one entry t strictly inside (m, M) (the greedy fill majorises every other feasible
point). plait computes it in O(n log n): sort, prefix sums of weights, find the split, solve t.
Example: r = (0.9, 0.2, 0.5, 0.1), uniform p, [0, 1] -> z = (1, 0, 0.7, 0), mean kept at 0.425.
0/1 rewards are a fixed point (they are already a vertex). z replaces r in GRPO's advantage.

plait's choices where the paper is silent or leaves options:
- Ties (default): equal rewards keep equal z: the problem is solved on blocks of tied rewards
  with summed weights. Exact float equality defines a tie.
- ``split_ties=True``: tied rewards may get different z. Ties are broken by position: among
  equal rewards, the lower index ranks higher (gets the larger z). With non-uniform weights the
  result is optimal for that order, not necessarily over all tie orders (choosing the best order
  is a subset-sum problem); with uniform weights any tie order gives the same objective.
- A group whose rewards are all equal is returned unchanged, also with ``split_ties=True``
  (spreading it would create a preference out of nothing).
- Weights: uniform by default. The paper uses the initial policy's sequence probabilities;
  whether raw or tempered is not known. ``sequence_weights_from_logprobs`` gives the raw ones,
  normalised per group (the optimum is invariant to scaling p by a constant).
- Computation is in float64; the result is returned in the rewards' dtype.
"""

from __future__ import annotations

import math

import torch

from plait.algos._groups import group_index, group_reduce


def _check_bounds(low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"GRPOVI needs finite bounds low < high, got low={low}, high={high}")


def _check_rewards(rewards: torch.Tensor, low: float, high: float, dtype: torch.dtype) -> None:
    """Raise if a reward is non-finite or outside [low, high] beyond a dtype-aware tolerance."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    tol = max(1e-9, 4 * eps) * max(1.0, abs(low), abs(high))
    bad = ~torch.isfinite(rewards) | (rewards < low - tol) | (rewards > high + tol)
    if bad.any():
        index = int(bad.nonzero()[0])
        raise ValueError(
            f"reward {rewards[index].item()!r} at index {index} is outside the GRPOVI range "
            f"[low, high] = [{low}, {high}]; pass the reward model's true range or clip rewards"
        )


def _check_weights(weights: torch.Tensor | None, rewards: torch.Tensor) -> torch.Tensor:
    """Weights [n] as float64 (uniform if None); raise if shape is wrong or any is not > 0."""
    if weights is None:
        return torch.ones_like(rewards)
    weights = weights.detach().to(torch.float64)
    if weights.shape != rewards.shape:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} != rewards shape {tuple(rewards.shape)}"
        )
    bad = ~(torch.isfinite(weights) & (weights > 0))
    if bad.any():
        index = int(bad.nonzero()[0])
        raise ValueError(
            f"GRPOVI weights must be finite and > 0, got {weights[index].item()!r} at index {index}"
        )
    return weights


def _tie_blocks(sorted_rewards: torch.Tensor, split_ties: bool) -> torch.Tensor:
    """Block id [n] (0, 0, 1, 2, 2, …) per sorted position; one block per element if split."""
    if split_ties:
        return torch.arange(sorted_rewards.numel(), device=sorted_rewards.device)
    new_block = torch.ones_like(sorted_rewards, dtype=torch.long)
    new_block[1:] = (sorted_rewards[1:] != sorted_rewards[:-1]).long()
    return torch.cumsum(new_block, 0) - 1


def _greedy_fill(block_weights: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Fill blocks in order to 1 until weighted ``mass`` is used: y [K] = (1, …, 1, τ, 0, …, 0).

    j = number of blocks whose prefix weight P_{j} fits within ``mass``; τ = (mass - P_j) / w_j,
    clamped into [0, 1] against rounding. Exactly one entry can be fractional.
    """
    prefix = torch.cumsum(block_weights, 0)
    fitted = torch.searchsorted(prefix, mass.reshape(1), right=True)
    split = min(int(fitted[0]), block_weights.numel() - 1)
    filled = prefix[split - 1] if split > 0 else mass.new_zeros(())
    fill = torch.zeros_like(block_weights)
    fill[:split] = 1.0
    fill[split] = ((mass - filled) / block_weights[split]).clamp(0.0, 1.0)
    return fill


def grpovi_adjust(
    rewards: torch.Tensor,
    *,
    low: float,
    high: float,
    weights: torch.Tensor | None = None,
    split_ties: bool = False,
) -> torch.Tensor:
    """Variance-maximising reward adjustment for one group (GRPOVI, arXiv 2505.23247).

    Args:
        rewards: [n] rewards of one group, each in [low, high].
        low, high: the reward model's range m < M.
        weights: [n] positive weights p (default uniform); only their ratios matter.
        split_ties: let equal rewards take different values (see module doc for the tie order).

    Returns:
        [n] adjusted rewards z, in ``rewards``' dtype (default float dtype for integer input).
    """
    low, high = float(low), float(high)
    _check_bounds(low, high)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [n] for one group, got {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    values = rewards.detach().to(torch.float64)
    _check_rewards(values, low, high, rewards.dtype)
    weights = _check_weights(weights, values)
    if values.numel() == 0 or bool((values == values[0]).all()):
        return rewards.detach().to(out_dtype).clone()
    unit = (values.clamp(low, high) - low) / (high - low)  # rewards mapped to [0, 1]
    order = torch.sort(-unit, stable=True).indices  # descending; ties: lower index first
    blocks = _tie_blocks(unit[order], split_ties)
    block_weights = unit.new_zeros(int(blocks[-1]) + 1).index_add(0, blocks, weights[order])
    mass = (weights * unit).sum().clamp(min=0.0).minimum(block_weights.sum())
    adjusted = torch.empty_like(unit)
    adjusted[order] = _greedy_fill(block_weights, mass)[blocks]
    return (low + (high - low) * adjusted).to(out_dtype)


def grpovi_adjust_groups(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    low: float,
    high: float,
    weights: torch.Tensor | None = None,
    split_ties: bool = False,
) -> torch.Tensor:
    """``grpovi_adjust`` applied to each group of a flat batch.

    Args:
        rewards: [B]; group_ids: [B] long, arbitrary labels; weights: [B] or None.

    Returns:
        [B] adjusted rewards, same dtype rule as ``grpovi_adjust``.
    """
    index, num_groups = group_index(group_ids)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    adjusted = torch.empty(rewards.shape, dtype=out_dtype, device=rewards.device)
    for group in range(num_groups):
        rows = (index == group).nonzero().squeeze(-1)
        group_weights = None if weights is None else weights[rows]
        adjusted[rows] = grpovi_adjust(
            rewards[rows], low=low, high=high, weights=group_weights, split_ties=split_ties
        )
    return adjusted


def sequence_weights_from_logprobs(
    seq_logprobs: torch.Tensor, *, group_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """GRPOVI weights p_i ∝ π_ref(y_i): softmax of sequence log-probs within each group.

    Raw sequence probabilities are extremely skewed (log-probs of long responses differ by
    hundreds of nats), and would underflow; since the GRPOVI optimum is invariant to scaling p by
    a constant, plait normalises within each group (subtract the max, exp, divide by the sum) in
    float64. Weights that still underflow are raised to the smallest positive normal number of
    the output dtype, since GRPOVI needs p > 0; such a response has no practical influence.

    Args:
        seq_logprobs: [n] (or [B] with ``group_ids``) log π_ref(y_i), e.g. ``sequence_logprob``.
        group_ids: [B] long labels; None treats the whole input as one group.

    Returns:
        weights, same shape and dtype as ``seq_logprobs`` (float64 for integer input), each
        group summing to ~1, all > 0.
    """
    out_dtype = seq_logprobs.dtype if seq_logprobs.is_floating_point() else torch.float64
    logits = seq_logprobs.detach().to(torch.float64)
    if group_ids is None:
        group_ids = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
    index, num_groups = group_index(group_ids)
    group_max = group_reduce(logits, index, num_groups, "amax")
    unnormalised = torch.exp(logits - group_max[index])
    group_total = logits.new_zeros(num_groups).index_add(0, index, unnormalised)
    weights = unnormalised / group_total[index]
    return weights.clamp(min=torch.finfo(out_dtype).tiny).to(out_dtype)
