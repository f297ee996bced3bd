"""Advantage estimators, reward placement and DAPO shaping, against hand-computed values."""

import pytest
import torch

from plait.algos.advantages import (
    broadcast_seq_advantages,
    gae_advantages,
    grpo_advantages,
    outcome_to_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from plait.algos.dapo import group_has_signal, overlong_penalty

pytestmark = pytest.mark.usefixtures("float64_default")


# ---------------------------------------------------------------------------------------------
# GAE: rewards (0, 0, 1), values (0.5, 0.6, 0.7), γ = 0.9, λ = 0.8 (γλ = 0.72)
#   t=2: δ = 1 + 0.9·0 - 0.7 = 0.3                       A = 0.3
#   t=1: δ = 0 + 0.9·0.7 - 0.6 = 0.03                    A = 0.03 + 0.72·0.3 = 0.246
#   t=0: δ = 0 + 0.9·0.6 - 0.5 = 0.04                    A = 0.04 + 0.72·0.246 = 0.21712
#   returns = A + V = (0.71712, 0.846, 1.0)
GAE_ADV = [0.21712, 0.246, 0.3]
GAE_RET = [0.71712, 0.846, 1.0]


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([GAE_ADV]), atol=1e-12)
    assert torch.allclose(ret, torch.tensor([GAE_RET]), atol=1e-12)


def test_gae_ignores_right_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([GAE_ADV + [0.0, 0.0]]), atol=1e-12)
    assert torch.allclose(ret, torch.tensor([GAE_RET + [0.0, 0.0]]), atol=1e-12)


def test_gae_skips_left_padding():
    rewards = torch.tensor([[7.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[3.0, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[0, 1, 1, 1]])
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.0] + GAE_ADV]), atol=1e-12)


def test_gae_monte_carlo_limit():
    # γ = λ = 1: A_t = Σ_{s>=t} r_s - V_t = (1 - 0.5, 1 - 0.6, 1 - 0.7)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]], requires_grad=True)
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]]), atol=1e-12)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]), atol=1e-12)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------------------------------------
# group baselines. Groups (non-contiguous labels, unequal sizes):
#   label 5: (1, 0, 0, 1)  mean 0.5, unbiased var (4 · 0.25) / 3 = 1/3, std 0.5773503
#   label 2: (0.5)         size 1 -> 0
#   label 9: (2, 4)        mean 3, unbiased var 2, std 1.4142136
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 4.0]
GROUPS = [5, 5, 5, 5, 2, 9, 9]


def test_grpo_with_std():
    adv = grpo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), eps=0.0)
    a, b = 0.8660254038, 0.7071067812  # 0.5 / sqrt(1/3) = sqrt(3)/2;  1 / sqrt(2)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0.0, -b, b]), atol=1e-9)


def test_grpo_default_eps():
    adv = grpo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS))
    assert adv[0].item() == pytest.approx(0.8660239038, abs=1e-9)  # 0.5 / (0.5773503 + 1e-6)


def test_dr_grpo_without_std():
    adv = grpo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, -1.0, 1.0]))


def test_grpo_equal_rewards_give_zero_not_nan():
    for eps in (1e-6, 0.0):
        adv = grpo_advantages(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]), eps=eps)
        assert torch.equal(adv, torch.zeros(3))
    # a plain mean of seven float32 0.3s is off by an ulp; std-normalised that became ~0.03
    rewards = torch.full((7,), 0.3, dtype=torch.float32)
    assert torch.equal(grpo_advantages(rewards, torch.zeros(7, dtype=torch.long)), torch.zeros(7))


def test_group_baselines_accept_integer_rewards():
    adv = grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]))
    assert torch.allclose(
        rloo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])), torch.tensor([1.0, -1.0])
    )


def test_rloo():
    # label 5: r=1 -> 1 - mean(0, 0, 1) = 2/3;  r=0 -> 0 - mean(1, 0, 1) = -2/3
    # label 9: 2 - 4 = -2, 4 - 2 = 2; size-1 group -> 0
    adv = rloo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS))
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, -2.0, 2.0])
    assert torch.allclose(adv, expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# REINFORCE++


def test_reinforce_pp_undiscounted():
    # returns-to-go: row 0 (1, 1, 1), row 1 (2, 2); mean 7/5 = 1.4
    # unbiased var = (3·0.16 + 2·0.36) / 4 = 0.3; std 0.5477226
    # -0.4 / 0.5477226 = -0.7302967;  0.6 / 0.5477226 = 1.0954451
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_pp_advantages(rewards, mask)
    lo, hi = -0.7302967433, 1.0954451150
    assert torch.allclose(adv, torch.tensor([[lo, lo, lo], [hi, hi, 0.0]]), atol=1e-7)


def test_reinforce_pp_discounted():
    # γ = 0.5: row 0 (0, 0, 1) -> (0.25, 0.5, 1); row 1 (0, 2) -> (1, 2); mean 4.75/5 = 0.95
    # deviations (-0.7, -0.45, 0.05, 0.05, 1.05), Σ² = 1.8, unbiased var 0.45, std 0.6708204
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    expected = torch.tensor([[-1.0434984, -0.6708204, 0.0745356], [0.0745356, 1.5652476, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# reward placement


def test_outcome_to_token_rewards():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 1, 1]])
    token_rewards = outcome_to_token_rewards(torch.tensor([2.0, 3.0, 4.0, 5.0]), mask)
    expected = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert torch.equal(token_rewards, expected)


def test_broadcast_seq_advantages():
    adv = broadcast_seq_advantages(torch.tensor([1.0, -2.0]), torch.tensor([[1, 0], [1, 1]]))
    assert torch.equal(adv, torch.tensor([[1.0, 0.0], [-2.0, -2.0]]))


# ---------------------------------------------------------------------------------------------
# DAPO


def test_overlong_penalty():
    # max 20, buffer 5: no penalty up to 15; (15 - L) / 5 in (15, 20]; -1 beyond 20
    lengths = torch.tensor([10, 15, 16, 18, 20, 21, 100])
    penalty = overlong_penalty(lengths, max_length=20, buffer_length=5)
    assert torch.allclose(penalty, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0]))
    half = overlong_penalty(torch.tensor([18, 30]), max_length=20, buffer_length=5, penalty=0.5)
    assert torch.allclose(half, torch.tensor([-0.3, -0.5]))
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_length=20, buffer_length=0)


def test_group_has_signal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 2.0, 2.0 + 1e-12])
    group_ids = torch.tensor([3, 3, 7, 7, 9, 11, 11])
    signal = group_has_signal(rewards, group_ids)
    assert signal.tolist() == [False, False, True, True, False, False, False]
    assert group_has_signal(torch.tensor([0, 1]), torch.tensor([0, 0])).tolist() == [True, True]
