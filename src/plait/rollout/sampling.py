"""Counter-based sampling: a request's random draws depend only on its seed and
the index of the token being drawn, never on the batch it shares or the process
that runs it; and the engine's per-run sampling of its rows (temperature, top-k, top-p
in HF's order, each token's log-probability), eager or inside a compiled decode step.

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

import math
from dataclasses import dataclass

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


# ---------------------------------------------------------------- the engine's draws


@dataclass
class SamplingPlan:
    """Per-run device tensors of the running rows' sampling settings, made by
    :func:`sampling_plan`."""

    greedy: torch.Tensor                       # [n] bool
    all_greedy: bool
    temperature: torch.Tensor                  # [n, 1]
    positions: torch.Tensor                    # [n] position of the first token of the run
    longest: int                               # max of positions
    greedy_rows: torch.Tensor | None = None
    shared_rows: torch.Tensor | None = None    # unseeded sampled rows (global generator)
    seeded_rows: torch.Tensor | None = None
    seeded_all: bool = False
    seed_words: torch.Tensor | None = None     # [m, 3]: seed low, seed high, tokens so far
    top_k: torch.Tensor | None = None          # [n, 1] (vocab size = off)
    top_p: torch.Tensor | None = None          # [n, 1]
    drawn: int = 0                             # tokens sampled since the plan was made
    uniforms: torch.Tensor | None = None       # [m, chunk] seeded draws ahead
    uniforms_from: int = 0                     # the token offset of uniforms[:, 0]
    # compiled engines: each row's (temperature, greedy, seed low, seed high) for draw,
    # float64 [n, 4] (unseeded rows as greedy), and its tokens so far, int64 [n]; whether
    # the draw is the plan's own (no unseeded sampled rows, no top-k/top-p) and whether it
    # samples (a seeded row that is not greedy)
    settings: torch.Tensor | None = None
    counters: torch.Tensor | None = None
    drawable: bool = False
    sample: bool = False


def sampling_plan(running, device: torch.device, vocab: int, compiled: bool) -> SamplingPlan:
    """The sampling settings of ``running`` (the engine's requests, in slot order) as
    device tensors, built once per decode run (host lists turned into device tensors would
    otherwise copy every step); ``compiled``: also what a compiled decode step draws with."""
    params = [r.params for r in running]
    is_greedy = [p.greedy for p in params]
    where = [r.length for r in running]
    plan = SamplingPlan(
        greedy=torch.tensor(is_greedy, device=device),
        all_greedy=all(is_greedy),
        temperature=torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                 device=device).unsqueeze(-1),
        positions=torch.tensor(where, device=device), longest=max(where))
    if any(is_greedy) and not plan.all_greedy:
        plan.greedy_rows = torch.tensor([i for i, g in enumerate(is_greedy) if g],
                                        device=device)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        plan.top_k, plan.top_p = filter_settings(top_k, top_p, vocab, device)
    sampled = [i for i, g in enumerate(is_greedy) if not g]
    seeded = [i for i in sampled if running[i].seed_words is not None]
    shared = [i for i in sampled if running[i].seed_words is None]
    if shared:
        plan.shared_rows = torch.tensor(shared, device=device)
    if seeded:  # counter-based: the draw depends on (seed, token index) only
        plan.seeded_all = len(seeded) == len(running)
        plan.seeded_rows = torch.tensor(seeded, device=device)
        plan.seed_words = torch.tensor(
            [(*running[i].seed_words, len(running[i].tokens)) for i in seeded],
            device=device)
    if compiled:  # what the compiled step draws with
        plan.drawable = not shared and plan.top_k is None
        plan.sample = plan.drawable and bool(seeded)
        plan.settings = torch.tensor(
            [(1.0, 1.0, 0, 0) if r.params.greedy or r.seed_words is None else
             (r.params.temperature, 0.0, *r.seed_words) for r in running],
            dtype=torch.float64, device=device)
        plan.counters = torch.tensor([len(r.tokens) for r in running], device=device)
    return plan


def seeded_uniforms(plan: SamplingPlan, offset: int, chunk: int = 64) -> torch.Tensor:
    """The seeded rows' draws for token ``offset`` of the plan: counter-based uniforms
    computed ``chunk`` tokens at a time (one hash pass instead of one per step)."""
    column = offset - plan.uniforms_from
    if plan.uniforms is None or column >= plan.uniforms.shape[1]:
        words = plan.seed_words
        ahead = torch.arange(chunk, device=words.device)
        plan.uniforms = counter_uniform(words[:, 0:1], words[:, 2:3] + offset + ahead,
                                        words[:, 1:2])
        plan.uniforms_from, column = offset, 0
    return plan.uniforms[:, column]


def sample(logits: torch.Tensor, plan: SamplingPlan, offset: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled token and its log-probability for each running request, ``offset``
    tokens into a decode run (no host-to-device copy, no device sync)."""
    processed = logits / plan.temperature.to(logits.dtype)
    if plan.top_k is not None:
        processed = filter_top_k_top_p(processed, plan.top_k, plan.top_p, plan.greedy)
    logp = torch.log_softmax(processed, dim=-1)
    if plan.all_greedy:
        tokens = logits.argmax(-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        if plan.greedy_rows is not None:  # index rows, not a boolean mask (no sync)
            tokens[plan.greedy_rows] = logits[plan.greedy_rows].argmax(-1)
        if plan.shared_rows is not None:
            rows = plan.shared_rows
            tokens[rows] = torch.multinomial(logp[rows].exp(), 1).squeeze(-1)
        if plan.seed_words is not None:
            uniform = seeded_uniforms(plan, offset)
            if plan.seeded_all:  # every row: no gather
                tokens = sample_inverse_cdf(logp.exp(), uniform)
            else:
                rows = plan.seeded_rows
                tokens[rows] = sample_inverse_cdf(logp[rows].exp(), uniform)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def draw(logits: torch.Tensor, settings: torch.Tensor, counters: torch.Tensor,
         sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row, and ``[2, n]`` float64 of the tokens and their
    log-probabilities, for greedy and seeded rows without top-k/top-p: the arithmetic of
    :func:`sample`, written to run inside the compiled decode step (compiled,
    its kernels round differently: log-probs agree to float rounding, and a token differs
    only where a row's uniform falls within rounding of a boundary of its CDF).
    ``settings``: float64 ``[n, 4]``, each row's (temperature, greedy, seed low word, seed
    high word); ``counters``: int64 ``[n]``, the index of each row's token to draw.
    ``sample=False``: every row as greedy (no inverse-CDF pass over the vocabulary)."""
    temperature = settings[:, 0:1].to(logits.dtype)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    tokens = logits.argmax(-1)
    if sample:
        words = settings[:, 2:].long()
        uniform = counter_uniform(words[:, 0], counters, words[:, 1])
        tokens = torch.where(settings[:, 1] > 0, tokens, sample_inverse_cdf(logp.exp(), uniform))
    return tokens, torch.stack([tokens.double(),
                                logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()])


def filter_settings(top_k: list[int], top_p: list[float], vocab: int, device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k (0 = off, as the vocabulary size) and top-p as ``[n, 1]`` tensors."""
    return (torch.tensor([k if k > 0 else vocab for k in top_k], device=device).unsqueeze(-1),
            torch.tensor(top_p, device=device).unsqueeze(-1))


def filter_top_k_top_p(logits: torch.Tensor, top_k, top_p, greedy: torch.Tensor
                       ) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus (HF order).
    ``top_k`` / ``top_p``: per-row lists or ``[n, 1]`` tensors (top-k 0 or the vocabulary
    size = off, top-p 1 = off)."""
    vocab = logits.shape[-1]
    device = logits.device
    if not isinstance(top_k, torch.Tensor):
        top_k, top_p = filter_settings(top_k, top_p, vocab, device)
    p = top_p.to(logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    kth = sorted_logits.gather(-1, (top_k - 1).clamp(max=vocab - 1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)  # ties kept, as HF
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass before it already reaches p (keep at least one); rows
    # with top_p = 1 are left alone (cumsum rounding would otherwise trim their tail)
    before = probs.cumsum(-1) - probs
    remove_p = (before >= p) & (ranks > 0) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(remove_p, -math.inf)
    filtered = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.where(greedy.unsqueeze(-1), logits, filtered)
