"""Counter-based sampling: a request's random draws depend only on its seed and
the index of the token being drawn, never on the batch it shares or the process
that runs it.

This is what lets a job give the same samples on 1 rank or N ranks, and resume
with a different number of ranks: a prompt's completions are a function of
``(seed, token index)`` alone. The draws are vectorised over the batch (one
integer hash per row, then one inverse-CDF lookup), so seeded sampling costs
about what shared-generator sampling does.

Example:
    >>> u = counter_uniform(torch.tensor([7, 7]), torch.tensor([0, 1]))   # two draws
    >>> tokens = sample_inverse_cdf(probs, u)                              # probs [B, V]
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_TWO53 = float(2**53)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xorshift-multiply, two rounds)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """A Python int seed of any size as two 32-bit words."""
    seed %= 2**64
    return seed & _M32, seed >> 32


def counter_uniform(seed_lo: torch.Tensor, counter: torch.Tensor,
                    seed_hi: torch.Tensor | None = None) -> torch.Tensor:
    """One uniform draw in ``[0, 1)`` (float64, 53 random bits) per row.

    Args:
        seed_lo, seed_hi: [B] int64, the 32-bit halves of each row's seed.
        counter: [B] int64, the index of the draw (the token position).
    """
    seed_lo = seed_lo.long() & _M32
    seed_hi = torch.zeros_like(seed_lo) if seed_hi is None else seed_hi.long() & _M32
    h = _mix32(seed_hi ^ 0x68E31DA4)
    h = _mix32(h ^ seed_lo)
    h = _mix32(h ^ (counter.long() & _M32))
    a = _mix32(h ^ 0x1B56C4E9)
    b = _mix32((h + 0x9E3779B9) & _M32)
    return ((a >> 5) * 67108864 + (b >> 6)).double() / _TWO53


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token index per row with ``P(i) = probs[i] / sum(probs)``, drawn by inverse CDF
    from ``u`` in ``[0, 1)``; a zero-probability token is never chosen.

    Args:
        probs: [B, V] non-negative.
        u: [B] uniforms.
    Returns:
        [B] int64.
    """
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    # first index whose cdf exceeds the target: zero-mass tokens share their
    # predecessor's cdf and so can never be the first to exceed it
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp(max=probs.shape[-1] - 1)
