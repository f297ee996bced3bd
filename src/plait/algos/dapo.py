"""DAPO reward shaping and the dynamic-sampling filter (Yu et al. 2025, arXiv 2503.14476).

- Soft overlong punishment (DAPO Sec. 3.4): a length-dependent penalty added to the reward.
- Dynamic sampling (DAPO Sec. 3.2): groups whose rewards are all equal give zero GRPO advantage
  and are dropped; ``group_has_signal`` is the filter. Drawing more prompts until the batch is
  full is the trainer's job, not this module's.

Deviation: DAPO states the filter as "0 < #correct < G" for 0/1 accuracy rewards; plait's filter
works for any real reward by asking whether the group's rewards differ by more than ``atol``.
"""

from __future__ import annotations

import torch

from plait.algos._groups import group_index, group_reduce


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_length: int,
    buffer_length: int,
    penalty: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, Sec. 3.4), to be added to the reward.

    With L_max = ``max_length``, L_cache = ``buffer_length``:
        0                                  if L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache·p  if L_max - L_cache < L <= L_max
        -p                                 if L > L_max

    Args:
        response_lengths: [B] response lengths in tokens.

    Returns:
        [B] float penalties in [-penalty, 0].
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(
            f"need 0 < buffer_length <= max_length, got buffer_length={buffer_length}, "
            f"max_length={max_length}"
        )
    lengths = response_lengths.to(torch.get_default_dtype())
    expected_max = max_length - buffer_length
    in_buffer = (expected_max - lengths) / buffer_length * penalty
    shaped = torch.where(lengths <= expected_max, torch.zeros_like(lengths), in_buffer)
    return torch.where(lengths > max_length, torch.full_like(lengths, -penalty), shaped)


def group_has_signal(
    rewards: torch.Tensor, group_ids: torch.Tensor, atol: float = 1e-8
) -> torch.Tensor:
    """Dynamic-sampling filter (DAPO Sec. 3.2): True where the row's group has unequal rewards.

    Args:
        rewards: [B]; group_ids: [B] long, arbitrary labels.
        atol: a group counts as "all equal" if max - min <= atol.

    Returns:
        [B] bool. Size-1 groups are False.
    """
    index, num_groups = group_index(group_ids)
    values = rewards.to(torch.float64)
    group_max = group_reduce(values, index, num_groups, "amax")
    group_min = group_reduce(values, index, num_groups, "amin")
    return (group_max - group_min)[index] > atol
