"""Per-group reductions over a flat batch labelled by ``group_ids`` (private helpers).

Groups are arbitrary integer labels: not necessarily contiguous, sorted, or of equal size.
"""

from __future__ import annotations

import torch


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary labels ``group_ids`` [B] to dense indices [B] in ``0..G-1``; return (index, G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    return inverse, num_groups


def group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of ``values`` [B] per group: [G]."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)


def group_stats(values: torch.Tensor, group_ids: torch.Tensor):
    """Per-row group statistics of ``values`` [B] (integer values are cast to float).

    Returns (count [B], centred [B], centred_sq_sum [B]): the size of the row's group,
    x - mean_group, and Σ (x - mean)² over the group. Values are shifted by their group's minimum
    before averaging, so a group of equal values is centred to exactly 0 (a plain mean can be off
    by an ulp, which std-normalisation would blow up to an O(1) advantage).
    """
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    index, num_groups = group_index(group_ids)
    shifted = values - group_reduce(values, index, num_groups, "amin")[index]
    count = group_sum(torch.ones_like(values), index, num_groups)[index]
    centred = shifted - group_sum(shifted, index, num_groups)[index] / count
    centred_sq_sum = group_sum(centred.square(), index, num_groups)[index]
    return count, centred, centred_sq_sum


def group_reduce(values: torch.Tensor, index: torch.Tensor, num_groups: int, how: str):
    """Per-group "amax" or "amin" of float ``values`` [B]: [G]."""
    fill = -torch.inf if how == "amax" else torch.inf
    out = values.new_full((num_groups,), fill)
    return out.scatter_reduce(0, index, values, reduce=how, include_self=True)
