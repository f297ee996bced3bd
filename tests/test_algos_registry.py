"""The algorithm registries: every name the config accepts has an implementation, and a
registered estimator is what the advantage stage runs."""

import dataclasses
import typing

import torch

from plait import algos
from plait.config import AlgoConfig, derive, load_config
from plait.parallel.dist import Dist
from plait.train.experience import Experience
from plait.train.scoring import Advantages


def _choices(field: str) -> set[str]:
    hints = typing.get_type_hints(AlgoConfig)
    return set(typing.get_args(hints[field]))


def test_config_choices_are_the_registered_names():
    assert _choices("advantage") - {"auto"} == set(algos.ESTIMATORS)
    assert _choices("ratio_level") == set(algos.LOG_RATIOS)
    assert algos.NEEDS_CRITIC == {"gae"}


def _batch() -> Experience:
    ids = torch.ones(4, 3, dtype=torch.long)
    return Experience(prompt_ids=ids, prompt_mask=torch.ones_like(ids), response_ids=ids,
                      response_mask=torch.tensor([[1.0, 1, 0]] * 4),
                      group_ids=torch.tensor([0, 0, 1, 1]),
                      rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]))


def test_a_registered_estimator_is_what_the_advantage_stage_runs():
    seen = []

    @algos.register_estimator("test-constant")
    def constant(inputs: algos.AdvantageInputs):
        seen.append(inputs)
        return torch.full_like(inputs.mask, 2.0) * inputs.mask, None

    try:
        config = load_config(None, ["algo.reward_range=[0, 1]"])
        settings = dataclasses.replace(derive(config), advantage="test-constant")
        batch = _batch()
        stats = Advantages(config, settings, Dist.single(), (0.0, 1.0))(batch)
        assert stats == {}
        assert torch.equal(batch.advantages, torch.tensor([[2.0, 2.0, 0.0]] * 4))
        assert torch.equal(seen[0].rewards, batch.rewards) and seen[0].kl is None
    finally:
        del algos.ESTIMATORS["test-constant"]


def test_the_grpo_estimator_by_hand():
    """Group 0 rewards (1, 0): mean 0.5, unbiased std 0.7071 -> +-0.7071; group 1 ties -> 0."""
    config = load_config(None, ["algo.reward_range=[0, 1]"])
    batch = _batch()
    Advantages(config, derive(config), Dist.single(), (0.0, 1.0))(batch)
    expected = torch.tensor([0.5 / (0.5 ** 0.5 + 1e-6), -0.5 / (0.5 ** 0.5 + 1e-6), 0.0, 0.0])
    torch.testing.assert_close(batch.advantages[:, 0], expected)
    assert torch.equal(batch.advantages[:, 2], torch.zeros(4))  # masked position
    # a batch that comes with advantages (computed by its source) keeps them
    before = batch.advantages.clone()
    batch.rewards = torch.zeros(4)
    Advantages(config, derive(config), Dist.single(), (0.0, 1.0))(batch)
    assert torch.equal(batch.advantages, before)
