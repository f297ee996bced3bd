"""Gradient accumulation over micro-batches gives the update of one big batch."""

import pytest
import torch

from plait.config import load_config
from plait.recipes.rl import RLTrainer
from plait.telemetry.timing import StageTimer


def one_update(overrides):
    """The accumulated gradients of one optimizer step (compared before AdamW, which
    amplifies float rounding in near-zero gradients), and the batch they came from."""
    trainer = RLTrainer(load_config(None, overrides))
    grads = {}
    apply_gradients = trainer.apply_gradients

    def record_then_apply(stats):
        for prefix, model in trainer.named_trainable_models():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    grads[f"{prefix}.{name}"] = p.grad.detach().clone()
        return apply_gradients(stats)

    trainer.apply_gradients = record_then_apply
    try:
        trainer.warm_start()
        timer = StageTimer()
        batch, _ = trainer.collect(timer)
        trainer.score_forwards(batch, timer)
        trainer.compute_advantages(batch)
        trainer.update(batch, step=0)
        return grads, batch
    finally:
        trainer.close()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_micro_batches_equal_one_batch(tiny_job, reward_spec, tmp_path, agg):
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "optim.lr=1e-2", f"algo.loss_agg={agg}",
            "algo.kl_coef=0.05", "algo.entropy_coef=0.01", "optim.max_grad_norm=null"]
    whole, batch = one_update([*base, f"run.dir={tmp_path / 'a'}", "algo.micro_batch_size=64"])
    split, batch2 = one_update([*base, f"run.dir={tmp_path / 'b'}", "algo.micro_batch_size=3"])
    assert torch.equal(batch.response_ids, batch2.response_ids)  # same rollout
    assert batch.response_lengths.unique().numel() > 1  # padding differs across micro-batches
    assert whole.keys() == split.keys() and len(whole) > 0
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # a real gradient
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-7)


def test_ppo_critic_micro_batches(tiny_job, reward_spec, tmp_path):
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "algo.name=ppo", "algo.group_size=1",
            "algo.prompts_per_step=12", "optim.max_grad_norm=null"]
    whole, _ = one_update([*base, f"run.dir={tmp_path / 'a'}", "algo.micro_batch_size=12"])
    split, _ = one_update([*base, f"run.dir={tmp_path / 'b'}", "algo.micro_batch_size=5"])
    assert any(name.startswith("critic.") for name in whole)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-7)
