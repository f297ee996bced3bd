"""Reducing a per-token loss matrix [B, T] to a scalar, and masked statistics.

The aggregation modes follow the names used by verl (``loss_agg_mode``); their effect on the
gradient is discussed in DAPO (Yu et al. 2025, arXiv 2503.14476, Sec. 3.3, "token-level policy
gradient loss") and Dr.GRPO (Liu et al. 2025, arXiv 2503.20783, Sec. 3.1, the length bias of
per-sequence 1/|o_i| normalisation).

Gradient accumulation: every mode divides by a normaliser that depends on the whole batch
(token count, sequence count). When a mini-batch is split into micro-batches, pass the
*mini-batch's* ``num_tokens`` / ``num_seqs`` to each micro-batch call; the sum of the
micro-batch losses then equals the loss of the whole mini-batch, and so do the gradients.

Conventions (plait's choices, not from a paper):
- Fully-masked rows count as sequences in the default ``num_seqs = B`` and contribute 0.
- ``masked_mean`` / ``masked_whiten`` clamp the valid-token count to >= 1, so an all-masked
  input gives 0 instead of NaN.
- ``masked_whiten`` uses the unbiased (Bessel-corrected) variance, like torchtune's and verl's
  ``masked_whiten``.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked positions set to exactly 0 (``where``, so NaN/inf there do not leak)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    Args:
        x: any shape, e.g. [B, T].
        mask: same shape as ``x``, 0/1 (bool or numeric).
        dim: reduce over this dimension (keeps the others); ``None`` reduces everything.

    Returns:
        scalar if ``dim`` is None, else ``x`` with ``dim`` removed (e.g. [B] for dim=-1).
        The valid count is clamped to >= 1 (an all-masked slice gives 0).
    """
    count = mask.to(x.dtype)
    total = _masked_values(x, mask)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over valid positions (scalar); unbiased (n - 1) by default, 0 if n <= 1."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    sq_sum = _masked_values((x - mean) ** 2, mask).sum()
    denominator = count - 1 if unbiased else count
    return sq_sum / denominator.clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True
) -> torch.Tensor:
    """Normalise ``x`` to zero mean, unit variance over the valid positions of ``mask``.

    ``(x - mean) / sqrt(var + eps)`` with the unbiased masked variance; with
    ``shift_mean=False`` the mean is added back (only the scale changes). Masked positions of
    the output are garbage-free but not zeroed; multiply by ``mask`` if needed.

    Args:
        x, mask: same shape, e.g. [B, T].

    Returns:
        same shape as ``x``.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    return whitened if shift_mean else whitened + mean


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {LOSS_AGG_MODES}")


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    Modes (L = loss_mat · mask, len_i = Σ_t mask_it clamped to >= 1):
        token-mean:              Σ L / num_tokens                       (DAPO token-level loss)
        seq-mean-token-mean:     Σ_i (Σ_t L_it / len_i) / num_seqs      (GRPO, Shao et al. 2024)
        seq-mean-token-sum:      Σ L / num_seqs
        seq-mean-token-sum-norm: Σ L / (num_seqs · norm_constant)       (Dr.GRPO, constant normaliser)

    Args:
        loss_mat: [B, T] per-token loss.
        mask: [B, T] 0/1, valid (response) tokens.
        mode: one of ``LOSS_AGG_MODES``.
        num_tokens: global valid-token count (default ``mask.sum()``, clamped to >= 1).
        num_seqs: global sequence count (default ``B``).
        norm_constant: required for ``seq-mean-token-sum-norm``, e.g. the max response length.

    Returns:
        scalar tensor.
    """
    _check_mode(mode)
    masked_loss = _masked_values(loss_mat, mask)
    if num_seqs is None:
        num_seqs = loss_mat.shape[0]
    if mode == "token-mean":
        if num_tokens is None:
            num_tokens = mask.to(loss_mat.dtype).sum().clamp(min=1)
        return masked_loss.sum() / num_tokens
    if mode == "seq-mean-token-mean":
        seq_len = mask.to(loss_mat.dtype).sum(-1).clamp(min=1)
        return (masked_loss.sum(-1) / seq_len).sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return masked_loss.sum() / num_seqs
    if norm_constant is None:
        raise ValueError(
            "loss aggregation 'seq-mean-token-sum-norm' needs norm_constant "
            "(e.g. the maximum response length); pass norm_constant=..."
        )
    return masked_loss.sum() / (num_seqs * norm_constant)
