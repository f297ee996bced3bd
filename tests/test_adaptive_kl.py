"""The adaptive KL coefficient: the controller by hand, its run in a job, and its resume."""

import re

import pytest

from plait.algos import adaptive_kl_coef
from plait.config import ConfigError, inert_settings_note, load_config
from plait.recipes.rl import train
from plait.telemetry.metrics import read_metrics


def test_the_controller_by_hand():
    # error clipped to +0.2: 0.1 * (1 + 0.2 * 64 / 10000)
    assert adaptive_kl_coef(0.1, 0.3, 0.2, 10000, 64) == pytest.approx(0.100128, rel=1e-12)
    # error -0.05: 0.1 * (1 - 0.05 * 64 / 1000)
    assert adaptive_kl_coef(0.1, 0.19, 0.2, 1000, 64) == pytest.approx(0.09968, rel=1e-12)
    # error clipped to -0.2 when the policy sits on the reference
    assert adaptive_kl_coef(0.1, 0.0, 0.2, 100, 50) == pytest.approx(0.09, rel=1e-12)
    with pytest.raises(ValueError, match="target > 0"):
        adaptive_kl_coef(0.1, 0.1, 0.0, 100, 8)


def kl_job(tiny_job, reward_spec, run_dir, mode, steps):
    return load_config(None, [
        *tiny_job, f"run.dir={run_dir}", f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
        "algo.reward_range=[0, 1]", "optim.lr=3e-3", "algo.kl_coef=0.05", f"algo.kl_mode={mode}",
        "algo.kl_target=0.001", "algo.kl_horizon=64", f"train.steps={steps}",
        "train.save_every=2", "train.keep_last=0"])


def steps_of(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "kl_coef" in r]


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_the_coefficient_follows_the_measured_kl_and_resumes(tiny_job, reward_spec, tmp_path,
                                                               mode):
    straight = tmp_path / "straight"
    train(kl_job(tiny_job, reward_spec, straight, mode, 4))
    records = steps_of(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["kl_coef"] == 0.05
    for before, after in zip(records, records[1:], strict=False):
        assert after["kl_coef"] == pytest.approx(adaptive_kl_coef(
            before["kl_coef"], before["kl_ref"], 0.001, 64, int(before["samples"])), rel=1e-12)
    assert records[-1]["kl_coef"] != 0.05  # it moved
    # stopped after step 2 and resumed: steps 3 and 4 run with the same coefficients
    resumed = tmp_path / "resumed"
    train(kl_job(tiny_job, reward_spec, resumed, mode, 2))
    train(kl_job(tiny_job, reward_spec, resumed, mode, 4))
    again = steps_of(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(records, again, strict=True):
        assert b["kl_coef"] == a["kl_coef"] and b["loss/policy"] == a["loss/policy"]


@pytest.mark.parametrize("overrides, message", [
    (["algo.kl_target=0.01"], r"algo.kl_target=0.01 \(algo.kl_coef=0: there is no KL term"),
    (["algo.kl_coef=0.1", "algo.kl_horizon=100"], r"algo.kl_horizon=100 \(algo.kl_target is not"),
])
def test_adaptive_kl_settings_that_cannot_act_are_named(overrides, message):
    assert re.search(message, inert_settings_note(load_config(None, overrides)))


def test_a_target_of_zero_is_refused():
    with pytest.raises(ConfigError, match=r"algo.kl_target must be > 0 \(the KL"):
        load_config(None, ["algo.kl_coef=0.1", "algo.kl_target=0"])
