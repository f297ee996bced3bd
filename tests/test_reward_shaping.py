"""Reward shaping before the advantages: running normalisation from earlier steps only,
clipping, the overlong penalty; statistics that combine steps exactly as the whole
history would, and live in the trainer state."""

import math

import pytest
import torch

from plait.config import load_config
from plait.train.experience import Experience
from plait.train.scoring import RewardShaper


def batch_of(lengths):
    n, width = len(lengths), max(lengths)
    mask = torch.tensor([[1.0] * k + [0.0] * (width - k) for k in lengths])
    return Experience(prompt_ids=torch.zeros(n, 1, dtype=torch.long),
                      prompt_mask=torch.ones(n, 1, dtype=torch.long),
                      response_ids=torch.zeros(n, width, dtype=torch.long),
                      response_mask=mask, group_ids=torch.arange(n))


def test_first_step_passes_then_earlier_steps_standardise():
    state = {}
    shape = RewardShaper(load_config(None, ["reward.normalize=true"]), state=lambda: state)
    first = torch.tensor([1.0, 3.0])
    assert torch.equal(shape(first, batch_of([1, 1])), first)  # no statistics yet
    metrics = {"samples": 2.0, **shape.step_sums()}
    logged = shape.update(metrics)
    assert logged == {"reward_raw/mean": 2.0, "reward_raw/std": 1.0}
    assert "reward_raw/sum" not in metrics  # the sums are consumed, not logged
    # step 2 uses step 1's mean 2 and std 1 (population), by hand
    second = torch.tensor([0.0, 2.0, 5.0])
    out = shape(second, batch_of([1, 1, 1]))
    assert out.tolist() == pytest.approx([-2.0, 0.0, 3.0], abs=1e-6)
    shape.update(shape.step_sums())
    everything = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0], dtype=torch.float64)
    count, mean, m2 = state["reward_stats"]
    assert count == 5 and mean == pytest.approx(float(everything.mean()))
    assert m2 / count == pytest.approx(float(everything.var(unbiased=False)))
    # a new shaper reading the same state (a resumed run) continues the statistics
    again = RewardShaper(load_config(None, ["reward.normalize=true"]), state=lambda: state)
    value = again(torch.tensor([mean]), batch_of([1]))
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_sums_over_ranks_give_the_one_rank_statistics():
    """Two ranks' step sums, added as the step metrics are, equal one rank's."""
    config = load_config(None, ["reward.normalize=true"])
    one_state, two_state = {}, {}
    one = RewardShaper(config, state=lambda: one_state)
    a, b = RewardShaper(config, state=lambda: two_state), RewardShaper(config)
    rewards = torch.tensor([0.5, -1.0, 2.0, 4.0])
    one(rewards, batch_of([1] * 4))
    a(rewards[:3], batch_of([1] * 3))
    b(rewards[3:], batch_of([1]))
    sa, sb = a.step_sums(), b.step_sums()
    one.update(one.step_sums())
    a.update({k: sa[k] + sb[k] for k in sa})
    assert two_state["reward_stats"] == pytest.approx(one_state["reward_stats"])


def test_clip_and_overlong_penalty_follow_normalisation():
    config = load_config(None, ["reward.clip=1.5", "algo.overlong_buffer=2",
                                "algo.overlong_penalty=1.0", "rollout.max_new_tokens=4"])
    shape = RewardShaper(config)
    out = shape(torch.tensor([3.0, -3.0, 0.5]), batch_of([4, 1, 3]))
    # clipped to ±1.5, then the penalty: 4 tokens of 4 with a 2-token buffer costs 1.0,
    # 3 tokens cost 0.5, 1 token nothing
    assert out.tolist() == pytest.approx([0.5, -1.5, 0.0])
    assert shape.step_sums() == {}  # no statistics without normalize
    assert math.isclose(RewardShaper(load_config(None, [])).__call__(
        torch.tensor([7.0]), batch_of([1])).item(), 7.0)


def test_missing_eos_penalty_falls_on_cut_completions_only():
    config = load_config(None, ["reward.clip=1.0", "reward.missing_eos_penalty=0.25"])
    batch = batch_of([4, 2, 4])
    batch.truncated = torch.tensor([True, False, False])  # the third ended at its 4th token
    out = RewardShaper(config)(torch.tensor([3.0, 0.5, 0.5]), batch)
    assert out.tolist() == pytest.approx([0.75, 0.5, 0.5])  # clipped to 1, then the penalty


def test_completions_record_whether_they_were_cut():
    from plait.rollout.base import Completion
    from plait.train.experience import experience_from_completions

    def completion(tokens, reason):
        return Completion(prompt_index=0, token_ids=tokens, logprobs=None, finish_reason=reason,
                          policy_version=0, text="")

    batch = experience_from_completions([[1, 2]], [[completion([5, 6], "length"),
                                                    completion([7], "stop")]], [0], 0)
    assert batch.truncated.tolist() == [True, False]


def test_a_clipped_reward_has_the_clip_as_its_range():
    from plait.runtime.inputs import reward_range

    config = load_config(None, ["reward.functions=[{fn: 'helpers_rewards:digit_fraction'}]",
                                "reward.clip=2.0", "reward.missing_eos_penalty=0.5",
                                "algo.reward_adjust=grpovi"])
    assert reward_range(config, None) == (-2.5, 2.0)  # the cut answer's penalty below
