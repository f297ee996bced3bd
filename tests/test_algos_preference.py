"""Preference losses against values computed by hand (math module, not torch)."""

import math

import pytest
import torch

from plait.algos.preference import (
    advantage_model_loss,
    bradley_terry_loss,
    dpo_loss,
    pairwise_calibration,
    simpo_loss,
)


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_bradley_terry_by_hand():
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 1.5])
    loss, stats = bradley_terry_loss(chosen, rejected)
    want = (softplus(-1.0) + softplus(1.0)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(0.0)
    loss.backward()  # d/ds_c of -log σ(s_c - s_r) / P = -(1 - σ(gap)) / P
    sigmoid = 1 / (1 + math.exp(-1.0))
    assert chosen.grad.tolist() == pytest.approx([-(1 - sigmoid) / 2, -sigmoid / 2], abs=1e-6)


def test_bradley_terry_margin_and_centring_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]))
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(1.0)) / 2, abs=1e-6)
    # each pair its own prompt: means 1.5 and 1.0, mean square 1.625
    loss, stats = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    base = (softplus(-1.0) + softplus(1.0)) / 2
    assert stats["center_penalty"].item() == pytest.approx(1.625)
    assert loss.item() == pytest.approx(base + 0.1 * 1.625, abs=1e-6)
    # both pairs from one prompt: one mean over its four scores, 1.25
    loss, stats = bradley_terry_loss(chosen, rejected, center_coef=0.1,
                                     prompt_ids=torch.tensor([7, 7]))
    assert stats["center_penalty"].item() == pytest.approx(1.5625)
    assert loss.item() == pytest.approx(base + 0.1 * 1.5625, abs=1e-6)
    # three pairs, two prompts: means (1+2+3+0)/4 = 1.5 and (4+6)/2 = 5
    _, stats = bradley_terry_loss(torch.tensor([1.0, 3.0, 4.0]), torch.tensor([2.0, 0.0, 6.0]),
                                  prompt_ids=torch.tensor([0, 0, 9]))
    assert stats["center_penalty"].item() == pytest.approx((1.5 ** 2 + 5.0 ** 2) / 2)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)


def test_advantage_model_loss_by_hand():
    # prompt 0: responses A (key 0) = 1, B (1) = 3, C (2) = -2 in pairs (A > C), (B > A);
    # prompt 5: responses D (3) = 6, E (4) = 0 in the pair (E > D)
    chosen = torch.tensor([1.0, 3.0, 0.0], requires_grad=True)
    rejected = torch.tensor([-2.0, 1.0, 6.0])
    args = dict(prompt_ids=torch.tensor([0, 0, 5]), chosen_keys=torch.tensor([0, 1, 4]),
                rejected_keys=torch.tensor([2, 0, 3]))
    pair = (softplus(-3.0) + softplus(-2.0) + softplus(6.0)) / 3
    # A counts once in prompt 0's mean: (1 + 3 - 2) / 3; prompt 5's: 3
    center = ((2 / 3) ** 2 + 3.0 ** 2) / 2
    loss, stats = advantage_model_loss(chosen, rejected, center_coef=0.5, **args)
    assert stats["center_penalty"].item() == pytest.approx(center)
    assert loss.item() == pytest.approx(pair + 0.5 * center, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(2 / 3)
    assert stats["advantage_std"].item() == pytest.approx(
        torch.tensor([1.0, 3.0, -2.0, 6.0, 0.0]).std().item())
    # bound 2.5: excesses 0.5 (B, 3) and 3.5 (D, 6) over the five distinct responses
    loss, stats = advantage_model_loss(chosen, rejected, center_coef=0.0, bound=2.5,
                                       bound_coef=2.0, **args)
    bound = (0.5 ** 2 + 3.5 ** 2) / 5
    assert stats["bound_penalty"].item() == pytest.approx(bound)
    assert loss.item() == pytest.approx(pair + 2.0 * bound, abs=1e-6)
    # the gradient of the centring term: d/da of 0.5 * mean_x (m_x)^2 for A (in pair 1 as
    # chosen): 0.5 * (2 m_0 / 3) / 2 prompts, plus the pair terms' -(1 - σ(3)) / 3 and
    # (pair 2, as rejected) but A's score in pair 2 is another tensor, so it is not here
    loss, _ = advantage_model_loss(chosen, rejected, center_coef=0.5, **args)
    loss.backward()
    sigmoid = 1 / (1 + math.exp(-3.0))
    assert chosen.grad[0].item() == pytest.approx(
        -(1 - sigmoid) / 3 + 0.5 * 2 * (2 / 3) / 3 / 2, abs=1e-6)


def test_advantage_model_shares_add_up_to_the_batch():
    chosen, rejected = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([-2.0, 1.0, 6.0])
    keys = dict(chosen_keys=torch.tensor([0, 1, 4]), rejected_keys=torch.tensor([2, 0, 3]))
    prompts = torch.tensor([0, 0, 5])
    whole, _ = advantage_model_loss(chosen, rejected, prompt_ids=prompts, bound=2.0, **keys)
    parts = [advantage_model_loss(chosen[s], rejected[s], prompt_ids=prompts[s],
                                  chosen_keys=keys["chosen_keys"][s],
                                  rejected_keys=keys["rejected_keys"][s], bound=2.0,
                                  totals=(3, 2, 5))[0]
             for s in (slice(0, 2), slice(2, 3))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)


def test_a_tie_counts_half():
    _, stats = bradley_terry_loss(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert stats["accuracy"].item() == 0.75


def test_dpo_and_ipo_by_hand():
    policy_chosen = torch.tensor([-3.0], requires_grad=True)
    policy_rejected = torch.tensor([-5.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0]), torch.tensor([-4.5])
    # h = (−3 − −4) − (−5 − −4.5) = 1.5
    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.15), abs=1e-6)
    assert stats["chosen_reward"].item() == pytest.approx(0.1)
    assert stats["rejected_reward"].item() == pytest.approx(-0.05)
    assert stats["reward_margin"].item() == pytest.approx(0.15)
    assert stats["reward_accuracy"].item() == 1.0
    loss.backward()  # -β (1 - σ(β h))
    assert policy_chosen.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.15))),
                                                      abs=1e-6)
    smoothed, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
                           label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-0.15) + 0.1 * softplus(0.15),
                                            abs=1e-6)
    ipo, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
                      loss_type="ipo")
    assert ipo.item() == pytest.approx((1.5 - 5.0) ** 2, abs=1e-5)


def test_dpo_starts_at_log_two_when_the_policy_is_the_reference():
    logps = torch.tensor([-7.0, -2.0, -11.0])
    loss, stats = dpo_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_accuracy"].item() == 0.5  # every implicit reward ties at 0


def test_simpo_by_hand():
    loss, stats = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.5]),
                             beta=2.0, gamma=0.5)
    # β(ā_c − ā_r) − γ: 1.5 and −1.5
    assert loss.item() == pytest.approx((softplus(-1.5) + softplus(1.5)) / 2, abs=1e-6)
    assert stats["reward_margin"].item() == pytest.approx((2.0 - 1.0) / 2)
    assert stats["reward_accuracy"].item() == 0.5


@pytest.mark.parametrize("call, message", [
    (lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(3)), "differ in shape"),
    (lambda: bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1)), r"one value per pair"),
    (lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_coef=-1), "center_coef"),
    (lambda: dpo_loss(*[torch.zeros(2)] * 4, beta=0.0), "beta must be > 0"),
    (lambda: dpo_loss(*[torch.zeros(2)] * 4, beta=0.1, loss_type="hinge"), "loss_type"),
    (lambda: dpo_loss(*[torch.zeros(2)] * 4, beta=0.1, loss_type="ipo", label_smoothing=0.1),
     "sigmoid"),
    (lambda: simpo_loss(torch.zeros(2), torch.zeros(2), beta=1.0, gamma=-1), "gamma"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_calibration_by_hand():
    # gaps 0 (tie), ln 3 (p = 0.75, right), -ln 3 (p = 0.25: confidence 0.75, wrong),
    # ln 19 (p = 0.95, right)
    gaps = torch.tensor([0.0, math.log(3), -math.log(3), math.log(19)], dtype=torch.float64)
    ece, table = pairwise_calibration(gaps, torch.zeros(4, dtype=torch.float64), bins=5)
    # bins of width 0.1 on [0.5, 1]: 0.5 -> bin 0; 0.75 -> bin 2 (twice); 0.95 -> bin 4
    assert [(row["low"], row["pairs"]) for row in table] == [(0.5, 1), (0.7, 2), (0.9, 1)]
    assert [row["accuracy"] for row in table] == [0.5, 0.5, 1.0]
    assert table[1]["confidence"] == pytest.approx(0.75)
    want = 1 / 4 * abs(0.5 - 0.5) + 2 / 4 * abs(0.5 - 0.75) + 1 / 4 * abs(1.0 - 0.95)
    assert ece == pytest.approx(want, abs=1e-12)
    perfect, _ = pairwise_calibration(torch.tensor([100.0]), torch.tensor([0.0]))
    assert perfect == pytest.approx(0.0, abs=1e-12)
