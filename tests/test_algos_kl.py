"""KL estimators k1 / k2 / k3 and the KL-penalised reward, against hand-computed values."""

import math

import pytest
import torch

from plait.algos.kl import KL_ESTIMATORS, kl_estimate, kl_penalty_rewards

# log_ratio = logprobs - ref_logprobs = (0.5, -1.0)
LOGPROBS = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF_LOGPROBS = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("k1", [0.5, -1.0]),
        ("k2", [0.125, 0.5]),  # ½·0.25, ½·1
        # exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5;  exp(1) - 1 - 1 = 2.7182818 - 2
        ("k3", [0.1065306597, 0.7182818285]),
    ],
)
def test_kl_estimators_hand_values(kind, expected):
    kl = kl_estimate(LOGPROBS, REF_LOGPROBS, kind)
    assert torch.allclose(kl, torch.tensor([expected], dtype=torch.float64), atol=1e-9)


def test_k3_gradient():
    # d/dℓ (e^-ℓ - 1 + ℓ) = 1 - e^-ℓ; at ℓ = 0.5: 1 - 0.6065307 = 0.3934693
    logprobs = LOGPROBS.clone().requires_grad_()
    kl_estimate(logprobs, REF_LOGPROBS, "k3")[0, 0].backward()
    assert logprobs.grad[0, 0].item() == pytest.approx(0.3934693403, abs=1e-9)


def test_k3_clamp_prevents_overflow():
    logprobs = torch.tensor([[-101.0]])  # float32, log ratio -100: e^100 overflows
    ref = torch.tensor([[-1.0]])
    assert torch.isinf(kl_estimate(logprobs, ref, "k3", clamp=None)).all()
    clamped = kl_estimate(logprobs.double(), ref.double(), "k3")
    assert clamped.item() == pytest.approx(485165174.4097903)  # e^20 - 1 - 20


def test_unbiased_estimators_match_exact_kl():
    # Monte Carlo: k1 and k3 are unbiased for KL(π ‖ π_ref) under samples of π
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum().item()  # 0.5·ln 2.5 + 0.3·ln 1 + 0.2·ln 0.4 = 0.3·ln 2.5
    assert exact == pytest.approx(0.3 * math.log(2.5))
    samples = torch.multinomial(
        pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    logprobs, ref_logprobs = pi.log()[samples], ref.log()[samples]
    for kind in ("k1", "k3"):
        estimate = kl_estimate(logprobs, ref_logprobs, kind).mean().item()
        assert estimate == pytest.approx(exact, abs=0.01)


def test_kl_penalty_rewards():
    # k1 = ((-1) - (-1.5), (-2) - (-1), 0, masked) = (0.5, -1, 0, ·); coef 0.1
    token_rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    shaped = kl_penalty_rewards(token_rewards, logprobs, ref, mask, coef=0.1, kind="k1")
    expected = torch.tensor([[-0.05, 1.1], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(shaped, expected, atol=1e-12)


def test_unknown_estimator():
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(LOGPROBS, REF_LOGPROBS, "k4")
