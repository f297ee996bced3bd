"""Loss aggregation, PPO / dual-clip / clip-higher / GSPO policy loss, value loss, entropy.

Expected numbers are worked out by hand in the comments, not recomputed by the code under test.
"""

import math

import pytest
import torch

from plait.algos.aggregation import (
    LOSS_AGG_MODES,
    aggregate_loss,
    masked_mean,
    masked_whiten,
)
from plait.algos.policy_loss import (
    entropy_from_logits,
    ppo_policy_loss,
    sequence_logprob,
    value_loss,
)

pytestmark = pytest.mark.usefixtures("float64_default")


# ---------------------------------------------------------------------------------------------
# aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 3.6),  # (1+2+4+5+6) / 5 = 18/5
        ("seq-mean-token-mean", 3.25),  # (3/2 + 15/3) / 2 = (1.5 + 5) / 2
        ("seq-mean-token-sum", 9.0),  # (3 + 15) / 2
        ("seq-mean-token-sum-norm", 3.0),  # 18 / (2 · 3), norm_constant = 3
    ],
)
def test_aggregate_loss_hand_values(mode, expected):
    loss = aggregate_loss(LOSS, MASK, mode, norm_constant=3)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 1.8),  # 18 / num_tokens=10
        ("seq-mean-token-mean", 1.625),  # 6.5 / num_seqs=4
        ("seq-mean-token-sum", 4.5),  # 18 / 4
        ("seq-mean-token-sum-norm", 0.9),  # 18 / (4 · 5)
    ],
)
def test_aggregate_loss_global_normalisers(mode, expected):
    loss = aggregate_loss(LOSS, MASK, mode, num_tokens=10, num_seqs=4, norm_constant=5)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_aggregate_loss_ignores_nan_in_masked_positions():
    loss_mat = LOSS.clone()
    loss_mat[0, 2] = float("nan")
    for mode in LOSS_AGG_MODES:
        assert torch.isfinite(aggregate_loss(loss_mat, MASK, mode, norm_constant=3))


def test_aggregate_loss_errors():
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(LOSS, MASK, "sum")


def test_masked_mean_and_whiten():
    assert masked_mean(LOSS, MASK).item() == pytest.approx(3.6)
    assert torch.allclose(masked_mean(LOSS, MASK, dim=-1), torch.tensor([1.5, 5.0]))
    # [1, 2, 3] valid: mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert torch.allclose(masked_whiten(x, mask)[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-7)
    assert torch.allclose(
        masked_whiten(x, mask, shift_mean=False)[:3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-7
    )
    assert masked_mean(x, torch.zeros(4)).item() == 0.0  # all masked: 0, not NaN


# ---------------------------------------------------------------------------------------------
# micro-batch equivalence: Σ micro-batch losses with global normalisers == full-batch loss


def _random_batch(seed, batch=6, length=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2])
    mask = (torch.arange(length) < lengths[:, None]).long()
    logprobs = (-torch.rand(batch, length, generator=gen) * 2).requires_grad_()
    old_logprobs = logprobs.detach() + 0.3 * torch.randn(batch, length, generator=gen)
    advantages = torch.randn(batch, length, generator=gen)
    return logprobs, old_logprobs, advantages, mask


MICRO_SPLITS = [slice(0, 2), slice(2, 3), slice(3, 6)]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_micro_batches_match_full_batch(mode):
    params, _, weights, mask = _random_batch(0)
    full = aggregate_loss(params.square() * weights, mask, mode, norm_constant=5)
    (full_grad,) = torch.autograd.grad(full, params)
    total = 0.0
    for rows in MICRO_SPLITS:
        loss_mat = params[rows].square() * weights[rows]
        total = total + aggregate_loss(
            loss_mat, mask[rows], mode, num_tokens=mask.sum(), num_seqs=6, norm_constant=5
        )
    (micro_grad,) = torch.autograd.grad(total, params)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(micro_grad, full_grad, atol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_ppo_loss_micro_batches_match_full_batch(mode, ratio_level):
    logprobs, old, adv, mask = _random_batch(1)
    kwargs = {"agg": mode, "ratio_level": ratio_level, "norm_constant": 5, "dual_clip": 3.0}
    full, _ = ppo_policy_loss(logprobs, old, adv, mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    total = 0.0
    for rows in MICRO_SPLITS:
        micro, _ = ppo_policy_loss(
            logprobs[rows],
            old[rows],
            adv[rows],
            mask[rows],
            num_tokens=mask.sum(),
            num_seqs=6,
            **kwargs,
        )
        total = total + micro
    (micro_grad,) = torch.autograd.grad(total, logprobs)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(micro_grad, full_grad, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# PPO clipped surrogate


def _logprobs_for_ratios(ratios):
    """logprobs / old_logprobs whose ratio is exactly `ratios` (old = -1)."""
    old = torch.full((1, len(ratios)), -1.0)
    logprobs = (old + torch.log(torch.tensor([ratios]))).requires_grad_()
    return logprobs, old


def test_ppo_clip_active_and_inactive():
    # ratio, A  -> unclipped -A·ρ, clipped -A·clip(ρ, 0.8, 1.2), loss = max
    # 1.1, +1   -> -1.1, -1.1   -> -1.1  inactive
    # 1.5, +1   -> -1.5, -1.2   -> -1.2  clip active (no gradient)
    # 0.5, +1   -> -0.5, -0.8   -> -0.5  inactive (pessimistic bound takes unclipped)
    # 0.9, -1   ->  0.9,  0.9   ->  0.9  inactive
    # 0.5, -1   ->  0.5,  0.8   ->  0.8  clip active
    # 1.5, -1   ->  1.5,  1.2   ->  1.5  inactive
    # token-mean = (-1.1 - 1.2 - 0.5 + 0.9 + 0.8 + 1.5) / 6 = 0.4 / 6
    logprobs, old = _logprobs_for_ratios([1.1, 1.5, 0.5, 0.9, 0.5, 1.5])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    mask = torch.ones(1, 6)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask)
    assert loss.item() == pytest.approx(0.4 / 6, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)  # (1.1+1.5+0.5+0.9+0.5+1.5) / 6
    # k3 of KL(old ‖ new): mean of ρ - 1 - ln ρ:
    # 1.1: .0046898  1.5: .0945349  0.5: .1931472  0.9: .0053605 -> sum .5854145 / 6
    assert stats["approx_kl"].item() == pytest.approx(0.0975691, abs=1e-7)
    assert not stats["clipfrac"].requires_grad
    (grad,) = torch.autograd.grad(loss, logprobs)
    # d/dlogπ of -A·ρ is -A·ρ; divided by 6 tokens; zero where clipped
    expected = torch.tensor([[-1.1, 0.0, -0.5, 0.9, 0.0, 1.5]]) / 6
    assert torch.allclose(grad, expected, atol=1e-12)


def test_ppo_clip_higher_is_asymmetric():
    # ratio 1.25, A=+1: symmetric 0.2 clips to 1.2 (-1.2); clip_high 0.28 leaves it (-1.25)
    # ratio 1.5,  A=+1: -1.2 vs -1.28
    # ratio 0.75, A=-1: lower clip 0.8 in both cases: 0.8
    logprobs, old = _logprobs_for_ratios([1.25, 1.5, 0.75])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    symmetric, sym_stats = ppo_policy_loss(logprobs, old, adv, mask)
    higher, high_stats = ppo_policy_loss(logprobs, old, adv, mask, clip_high=0.28)
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3, abs=1e-12)
    assert higher.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3, abs=1e-12)
    assert sym_stats["clipfrac"].item() == pytest.approx(1.0)
    assert high_stats["clipfrac"].item() == pytest.approx(2 / 3)


def test_ppo_dual_clip():
    # c = 3. ratio 5, A=-1: max(5, 1.2) = 5, capped at -c·A = 3   (dual clip active, no grad)
    #        ratio 2, A=-1: max(2, 1.2) = 2 < 3, kept             (grad -A·ρ = 2)
    #        ratio 5, A=+1: max(-5, -1.2) = -1.2, dual clip n/a   (ratio clip active)
    logprobs, old = _logprobs_for_ratios([5.0, 2.0, 5.0])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    plain, _ = ppo_policy_loss(logprobs, old, adv, mask)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, dual_clip=3.0)
    assert plain.item() == pytest.approx((5 + 2 - 1.2) / 3, abs=1e-12)
    assert loss.item() == pytest.approx((3 + 2 - 1.2) / 3, abs=1e-12)
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.allclose(grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]), atol=1e-12)


def test_ppo_argument_errors():
    logprobs, old = _logprobs_for_ratios([1.0])
    adv, mask = torch.ones(1, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logprobs, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="ratio_level"):
        ppo_policy_loss(logprobs, old, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="clip_low"):
        ppo_policy_loss(logprobs, old, adv, mask, clip_low=1.0)


# ---------------------------------------------------------------------------------------------
# GSPO (sequence-level ratio, GSPO-token form)


def _gspo_batch():
    # row 0: log ratios (0.1, -0.3, 0.5), mean 0.1 -> s_0 = e^0.1 = 1.1051709 (inside [0.8, 1.2])
    # row 1: log ratios (0.6, 0.2, [masked 5.0]), mean 0.4 -> s_1 = e^0.4 = 1.4918247 (clipped)
    old = torch.full((2, 3), -2.0)
    logprobs = (old + torch.tensor([[0.1, -0.3, 0.5], [0.6, 0.2, 5.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old, torch.ones(2, 3), mask


def test_gspo_sequence_ratio_value_and_token_mean_gradient():
    logprobs, old, adv, mask = _gspo_batch()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, ratio_level="sequence")
    # token-mean over 5 tokens: (3·(-1.1051709) + 2·(-1.2)) / 5 = -1.1431026
    assert loss.item() == pytest.approx(-1.1431025508, abs=1e-9)
    # every token of a row carries s_i: (3·1.1051709 + 2·1.4918247) / 5
    assert stats["ratio_mean"].item() == pytest.approx(1.2598324299, abs=1e-9)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    (grad,) = torch.autograd.grad(loss, logprobs)
    # GSPO-token: d/dlogπ_t = -A·s_i / 5 on row 0 (= -0.2210342), 0 on the clipped row 1
    expected = torch.tensor([[-0.2210341836] * 3, [0.0, 0.0, 0.0]])
    assert torch.allclose(grad, expected, atol=1e-9)


def test_gspo_with_seq_mean_token_mean_equals_sequence_level_gspo():
    # Sequence-level GSPO: J = (1/B) Σ_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean log ratio)
    # dJ/dlogπ_t = (1/B)·A_i·s_i·(1/|y_i|): row 0 -> -(1/2)·1.1051709/3 = -0.1841952 for the loss
    logprobs, old, adv, mask = _gspo_batch()
    loss, _ = ppo_policy_loss(
        logprobs, old, adv, mask, ratio_level="sequence", agg="seq-mean-token-mean"
    )
    # value: (-1.1051709 + -1.2) / 2
    assert loss.item() == pytest.approx(-1.1525854590, abs=1e-9)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[-0.1841951530] * 3, [0.0, 0.0, 0.0]])
    assert torch.allclose(grad, expected, atol=1e-9)


def test_gspo_per_token_advantages():
    # A row 0 = (1, 2, -1): s_0 inside the clip range, so loss_t = -A_t·s_0, grad -A_t·s_0 / 3
    logprobs, old, _, mask = _gspo_batch()
    adv = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, ratio_level="sequence")
    assert loss.item() == pytest.approx(-2 * 1.1051709181 / 3, abs=1e-9)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.tensor([[-1.1051709181, -2.2103418361, 1.1051709181], [0.0, 0.0, 0.0]]) / 3
    assert torch.allclose(grad, expected, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# value loss


def _value_batch():
    # token 0: old 1, V 2,   R 3 -> V_clip 1.2: max((2-3)², (1.2-3)²) = max(1, 3.24) -> clipped
    # token 1: old 1, V 2,   R 0 -> V_clip 1.2: max(4, 1.44) = 4                     -> unclipped
    # token 2: old 1, V 1.1, R 1 -> V_clip 1.1: both 0.01                            -> unclipped
    # token 3: masked
    values = torch.tensor([[2.0, 2.0, 1.1, 100.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    return values, old, returns, mask


def test_value_loss_unclipped():
    values, old, returns, mask = _value_batch()
    loss, stats = value_loss(values, old, returns, mask)
    # 0.5 · (1 + 4 + 0.01) / 3
    assert loss.item() == pytest.approx(0.835, abs=1e-12)
    assert stats["vf_clipfrac"].item() == 0.0


def test_value_loss_clipped():
    values, old, returns, mask = _value_batch()
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # 0.5 · (3.24 + 4 + 0.01) / 3 = 3.625 / 3
    assert loss.item() == pytest.approx(3.625 / 3, abs=1e-12)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, values)
    # clipped token: V_clip saturated -> 0; others (V - R) / 3
    assert torch.allclose(grad, torch.tensor([[0.0, 2.0 / 3, 0.1 / 3, 0.0]]), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# entropy and sequence log-prob


def test_entropy_hand_values():
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4 = 1.3862944
                [0.0, math.log(3.0), -math.inf, -math.inf],  # p = (1/4, 3/4): 0.5623351
                [1000.0, 1000.0, -math.inf, 0.0],  # ≈ (1/2, 1/2): ln 2 = 0.6931472
            ]
        ]
    )
    entropy = entropy_from_logits(logits)
    expected = torch.tensor([[1.3862943611, 0.5623351446, 0.6931471806]])
    assert torch.allclose(entropy, expected, atol=1e-9)


def test_entropy_matches_direct_computation():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    direct = -(probs * torch.log(probs)).sum(-1)
    assert torch.allclose(entropy_from_logits(logits), direct, atol=1e-12)


def test_entropy_gradient_is_finite_with_masked_vocab():
    logits = torch.tensor([[[0.0, 1.0, -math.inf]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sequence_logprob():
    token_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.equal(sequence_logprob(token_logprobs, mask), torch.tensor([-6.0, -1.0]))


def test_off_policy_weights_hand_values():
    from plait.algos import off_policy_weights

    prox = torch.log(torch.tensor([[0.5, 0.3, 0.9, 0.2]]))
    behav = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.4]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # pi_prox / pi_behav = 1, 3, 3, (0.5 masked)
    w, stats = off_policy_weights(prox, behav, mask, "decoupled", cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert float(stats["is_capped_frac"]) == pytest.approx(2 / 3)
    w, stats = off_policy_weights(prox, behav, mask, "tis", cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 2.0, 0.0]]))
    assert float(stats["is_weight_mean"]) == pytest.approx(5 / 3)
    w, _ = off_policy_weights(prox, behav, mask, "decoupled", cap=4.0)
    assert torch.allclose(w, torch.tensor([[1.0, 3.0, 3.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="unknown off-policy mode"):
        off_policy_weights(prox, behav, mask, "nope")


def test_decoupled_ppo_loss_hand_value():
    """loss = -mean_t w_t * min(r_t A_t, clip(r_t) A_t), r against the proximal policy."""
    from plait.algos import off_policy_weights

    logprobs = torch.log(torch.tensor([[0.6, 0.2]])).requires_grad_()
    prox = torch.log(torch.tensor([[0.5, 0.25]]))
    behav = torch.log(torch.tensor([[0.25, 0.25]]))
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    w, _ = off_policy_weights(prox, behav, mask, "tis", cap=5.0)  # [2, 1]
    loss, _ = ppo_policy_loss(logprobs, prox, adv, mask, token_weights=w)
    # token 0: r = 1.2 (within 1.2 clip), -A r = -1.2, weight 2 -> -2.4
    # token 1: r = 0.8, A < 0: max(0.8, clip 0.8) = 0.8, weight 1 -> 0.8
    assert float(loss.detach()) == pytest.approx((-2.4 + 0.8) / 2, abs=1e-6)
    plain, _ = ppo_policy_loss(logprobs, prox, adv, mask)
    same, _ = ppo_policy_loss(logprobs, prox, adv, mask, token_weights=torch.ones(1, 2))
    assert float(same.detach()) == pytest.approx(float(plain.detach()))
