"""GRPOVI reward variance increase: brute-force vertex enumeration, worked example, edge cases.

The brute force does not use the solver's structure (sorting, prefix sums, one split point).
It enumerates every labelling of the responses as {at m, at M, free}, where all free
responses share one value t solved from the expectation constraint, and keeps the feasible
labellings (bounds and every order constraint checked explicitly). Every vertex of the feasible
polytope is such a labelling: at a vertex, coordinates strictly inside (m, M) are tied to each
other by active order constraints, and with one equality constraint only one shared free value
can remain. So the best feasible labelling is the optimum.
"""

import itertools

import numpy as np
import pytest
import torch

from plait.algos.grpovi import (
    grpovi_adjust,
    grpovi_adjust_groups,
    sequence_weights_from_logprobs,
)

_LABELLINGS = {n: np.array(list(itertools.product((0, 1, 2), repeat=n))) for n in range(1, 9)}


def _order_pairs(rewards, ties):
    """(i, k, equal) for every constraint z_i >= z_k (equal: z_i == z_k).

    ties: "equal" keeps tied rewards equal, "free" leaves them unconstrained,
    "index" orders them by index (lower index >= higher index).
    """
    pairs = []
    for i, k in itertools.permutations(range(len(rewards)), 2):
        if rewards[i] > rewards[k]:
            pairs.append((i, k, False))
        elif rewards[i] == rewards[k] and ties == "equal":
            pairs.append((i, k, True))
        elif rewards[i] == rewards[k] and ties == "index" and i < k:
            pairs.append((i, k, False))
    return pairs


def brute_force_objective(rewards, weights, low, high, ties, tol=1e-12):
    """max Σ p z² over all feasible {m, M, shared free t} labellings (see module docstring)."""
    rewards, weights = np.asarray(rewards, float), np.asarray(weights, float)
    labels = _LABELLINGS[len(rewards)]
    target = weights @ rewards
    fixed_values = np.where(labels == 0, low, high) * (labels != 2)
    free_weight = (labels == 2) @ weights
    fixed_sum = fixed_values @ weights
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(free_weight > 0, (target - fixed_sum) / free_weight, low)
    z = np.where(labels == 2, t[:, None], fixed_values)
    feasible = (t >= low - tol) & (t <= high + tol)
    feasible &= np.abs(z @ weights - target) <= 1e-9 * max(1.0, abs(target))
    for i, k, equal in _order_pairs(rewards, ties):
        feasible &= np.abs(z[:, i] - z[:, k]) <= tol if equal else z[:, i] >= z[:, k] - tol
    assert feasible.any(), "the brute force must find a feasible point (r itself is feasible)"
    return ((z[feasible] ** 2) @ weights).max()


def assert_constraints(z, rewards, weights, low, high, ties):
    z, rewards, weights = z.numpy(), np.asarray(rewards, float), np.asarray(weights, float)
    assert (z >= low - 1e-12).all() and (z <= high + 1e-12).all()
    assert weights @ z == pytest.approx(weights @ rewards, abs=1e-9)
    for i, k, equal in _order_pairs(rewards, ties):
        if equal:
            assert z[i] == pytest.approx(z[k], abs=1e-12)
        else:
            assert z[i] >= z[k] - 1e-12


def _random_instance(rng):
    size = int(rng.integers(1, 9))
    low = float(rng.choice([0.0, -1.0, -2.5, 3.0]))
    high = low + float(rng.uniform(0.5, 3.0))
    if rng.random() < 0.5:  # ties: draw from a small set, bounds included
        levels = np.linspace(low, high, int(rng.integers(2, 5)))
        rewards = rng.choice(levels, size=size)
    else:
        rewards = rng.uniform(low, high, size=size)
    weights = np.ones(size) if rng.random() < 0.5 else rng.uniform(0.1, 3.0, size=size)
    return rewards, weights, low, high


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        rewards, weights, low, high = _random_instance(rng)
        uniform = bool((weights == 1).all())
        for split_ties in (False, True):
            z = grpovi_adjust(
                torch.tensor(rewards),
                low=low,
                high=high,
                weights=None if uniform else torch.tensor(weights),
                split_ties=split_ties,
            )
            if (rewards == rewards[0]).all():  # all-equal groups are returned unchanged
                assert np.array_equal(z.numpy(), rewards)
                continue
            # split_ties with uniform weights: optimal over *all* tie orders; otherwise for the
            # documented order (lower index ranks higher)
            ties = "equal" if not split_ties else ("free" if uniform else "index")
            assert_constraints(z, rewards, weights, low, high, ties)
            expected = brute_force_objective(rewards, weights, low, high, ties)
            objective = float(weights @ z.numpy() ** 2)
            assert objective == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_worked_example():
    # mean 0.425 kept: (1 + 0 + 0.7 + 0) / 4
    z = grpovi_adjust(torch.tensor([0.9, 0.2, 0.5, 0.1], dtype=torch.float64), low=0, high=1)
    assert torch.allclose(z, torch.tensor([1.0, 0.0, 0.7, 0.0], dtype=torch.float64), atol=1e-12)


def test_ties_kept_equal_or_split_by_index():
    # two 0.5s and a 0.2, mean 0.4: blocks (0.5, 0.5 | 0.2) -> fill 1.2 of mass: 0.6, 0.6, 0
    rewards = torch.tensor([0.5, 0.2, 0.5], dtype=torch.float64)
    assert torch.allclose(
        grpovi_adjust(rewards, low=0, high=1), torch.tensor([0.6, 0.0, 0.6]).double()
    )
    # split: index 0 ranks above index 2 -> 1, then 0.2, then 0
    split = grpovi_adjust(rewards, low=0, high=1, split_ties=True)
    assert torch.allclose(split, torch.tensor([1.0, 0.0, 0.2]).double())


def test_binary_rewards_are_a_fixed_point():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rewards = torch.tensor(
            rng.integers(0, 2, size=int(rng.integers(1, 12))), dtype=torch.float64
        )
        weights = torch.tensor(rng.uniform(0.1, 3.0, size=rewards.numel()))
        for split_ties in (False, True):
            z = grpovi_adjust(rewards, low=0, high=1, weights=weights, split_ties=split_ties)
            assert torch.allclose(z, rewards, atol=1e-12)
    # the same holds for any two-level reward at the bounds
    rewards = torch.tensor([-2.0, 3.0, 3.0, -2.0])
    assert torch.allclose(grpovi_adjust(rewards, low=-2, high=3), rewards)


def test_invariant_to_weight_scaling():
    rng = np.random.default_rng(1)
    rewards = torch.tensor(rng.uniform(0, 1, size=7))
    weights = torch.tensor(rng.uniform(0.1, 3.0, size=7))
    reference = grpovi_adjust(rewards, low=0, high=1, weights=weights)
    for scale in (1e-6, 0.3, 1e8):
        scaled = grpovi_adjust(rewards, low=0, high=1, weights=weights * scale)
        assert torch.allclose(scaled, reference, atol=1e-12)


def test_all_equal_and_trivial_groups_unchanged():
    for rewards in ([0.3, 0.3, 0.3], [0.7], []):
        r = torch.tensor(rewards, dtype=torch.float64)
        for split_ties in (False, True):
            assert torch.equal(grpovi_adjust(r, low=0, high=1, split_ties=split_ties), r)


def test_dtypes_and_tolerance():
    z = grpovi_adjust(torch.tensor([0.9, 0.2, 0.5, 0.1]), low=0, high=1)
    assert z.dtype == torch.float32
    z = grpovi_adjust(torch.tensor([1, 0, 0]), low=0, high=1)  # integer rewards -> float
    assert z.is_floating_point() and z.tolist() == [1.0, 0.0, 0.0]
    # rounding just past a bound is accepted and clamped
    z = grpovi_adjust(torch.tensor([1.0 + 1e-12, 0.5, 0.0], dtype=torch.float64), low=0, high=1)
    assert z.max().item() <= 1.0


def test_errors():
    rewards = torch.tensor([0.1, 0.5, 1.5])
    with pytest.raises(ValueError, match=r"1\.5.*index 2.*\[0\.0, 1\.0\]"):
        grpovi_adjust(rewards, low=0, high=1)
    with pytest.raises(ValueError, match="outside"):
        grpovi_adjust(torch.tensor([0.1, float("nan")]), low=0, high=1)
    with pytest.raises(ValueError, match="low < high"):
        grpovi_adjust(torch.tensor([0.5, 0.5]), low=1, high=1)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="> 0"):
            grpovi_adjust(torch.tensor([0.1, 0.5]), low=0, high=1, weights=torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="shape"):
        grpovi_adjust(torch.tensor([0.1, 0.5]), low=0, high=1, weights=torch.ones(3))


def test_adjust_groups_matches_per_group():
    rewards = torch.tensor([0.9, 0.3, 0.2, 0.5, 0.3, 0.1, 0.8], dtype=torch.float64)
    group_ids = torch.tensor([7, 2, 7, 7, 2, 7, 5])
    weights = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    adjusted = grpovi_adjust_groups(rewards, group_ids, low=0, high=1, weights=weights)
    for label in (7, 2, 5):
        rows = group_ids == label
        expected = grpovi_adjust(rewards[rows], low=0, high=1, weights=weights[rows])
        assert torch.equal(adjusted[rows], expected)
    assert adjusted[6].item() == 0.8  # size-1 group unchanged


def test_sequence_weights_from_logprobs():
    # softmax within the group: (1, 3) / 4
    logprobs = torch.tensor([-100.0, -100.0 + np.log(3.0)], dtype=torch.float64)
    assert torch.allclose(
        sequence_weights_from_logprobs(logprobs), torch.tensor([0.25, 0.75]).double()
    )
    # per group; a hopeless response underflows to the smallest positive weight, never 0
    weights = sequence_weights_from_logprobs(
        torch.tensor([-5.0, -2000.0, -1.0, -1.0 + float(np.log(4.0))]),
        group_ids=torch.tensor([3, 3, 8, 8]),
    )
    assert torch.allclose(weights, torch.tensor([1.0, 0.0, 0.2, 0.8]))
    assert weights[1] > 0 and weights.dtype == torch.float32
    rewards = torch.tensor([0.9, 0.2], dtype=torch.float64)
    grpovi_adjust(rewards, low=0, high=1, weights=weights[:2])  # accepted
    # normalising gives the same solution as the raw probabilities (when those are representable)
    logprobs = torch.tensor([-1.0, -2.5, -0.5, -3.0], dtype=torch.float64)
    rewards = torch.tensor([0.9, 0.2, 0.5, 0.1], dtype=torch.float64)
    raw = grpovi_adjust(rewards, low=0, high=1, weights=logprobs.exp())
    normalised = grpovi_adjust(
        rewards, low=0, high=1, weights=sequence_weights_from_logprobs(logprobs)
    )
    assert torch.allclose(raw, normalised, atol=1e-12)
