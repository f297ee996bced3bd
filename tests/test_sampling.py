"""Counter-based sampling: right distribution, deterministic per (seed, counter),
never a zero-probability token."""

import torch

from plait.rollout.sampling import counter_uniform, sample_inverse_cdf, split_seed


def test_uniforms_are_uniform_and_deterministic():
    seeds = torch.arange(20000)
    u = counter_uniform(seeds, torch.zeros_like(seeds))
    assert torch.equal(u, counter_uniform(seeds, torch.zeros_like(seeds)))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # ten equal bins: each within 5 sigma of 2000
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert (counts - 2000).abs().max() < 5 * (2000 * 0.9) ** 0.5
    # neighbouring counters and neighbouring seeds are uncorrelated
    v = counter_uniform(seeds, torch.ones_like(seeds))
    w = counter_uniform(seeds + 1, torch.zeros_like(seeds))
    for other in (v, w):
        corr = torch.corrcoef(torch.stack([u, other]))[0, 1]
        assert abs(float(corr)) < 0.03


def test_high_seed_word_matters():
    lo, hi = split_seed(5 + (3 << 32))
    assert (lo, hi) == (5, 3)
    a = counter_uniform(torch.tensor([5]), torch.tensor([0]), torch.tensor([3]))
    b = counter_uniform(torch.tensor([5]), torch.tensor([0]), torch.tensor([4]))
    assert float(a) != float(b)


def test_inverse_cdf_matches_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    n = 30000
    u = counter_uniform(torch.arange(n), torch.full((n,), 7))
    tokens = sample_inverse_cdf(probs.expand(n, -1), u)
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert freq[1] == 0 and freq[3] == 0
    assert torch.allclose(freq, probs.double(), atol=0.015)


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 2.0, 0.0]])
    assert sample_inverse_cdf(probs, torch.tensor([0.0, 0.0])).tolist() == [2, 1]
    almost_one = torch.tensor([1 - 2**-53] * 2, dtype=torch.float64)
    assert sample_inverse_cdf(probs, almost_one).tolist() == [2, 2]
