"""Gradient accumulation over micro-batches gives the update of one big batch."""

import pytest
import torch

from plait.config import load_config
from plait.recipes.rl import RLTrainer
from plait.telemetry.timing import StageTimer
from plait.train.update import GroupwiseUpdate


def one_update(overrides, *, by_group=False, with_stats=False):
    """The accumulated gradients of one optimizer step (compared before AdamW, which
    amplifies float rounding in near-zero gradients), and the batch they came from.
    ``by_group``: the step of rollout workers' groups trained as they arrive
    (:class:`GroupwiseUpdate`, groups in reverse order, each scored and given advantages
    alone)."""
    trainer = RLTrainer(load_config(None, overrides))
    grads, stats = {}, {}
    apply_gradients = trainer.updater.apply_gradients

    def record_then_apply(step_stats):
        for prefix, model in trainer.named_trainable_models():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    grads[f"{prefix}.{name}"] = p.grad.detach().clone()
        stats.update(step_stats)
        return apply_gradients(step_stats)

    trainer.updater.apply_gradients = record_then_apply
    try:
        trainer.warm_start()
        timer = StageTimer()
        batch, _ = trainer.source.collect(0, timer)
        if by_group:
            update = GroupwiseUpdate(trainer.updater)
            for group in batch.group_ids.unique().flip(0):
                part = batch.select((batch.group_ids == group).nonzero().squeeze(-1))
                trainer.scorer.score_forwards(part, timer)
                trainer.advantages(part, across_ranks=False)
                update.add(part)
            update.finish()
        else:
            trainer.scorer.score_forwards(batch, timer)
            trainer.advantages(batch)
            trainer.updater.update(batch, step=0)
        return (grads, batch, stats) if with_stats else (grads, batch)
    finally:
        trainer.close()


@pytest.mark.parametrize("split_by", ["algo.micro_batch_size=3", "algo.micro_batch_tokens=40"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_micro_batches_equal_one_batch(tiny_job, reward_spec, tmp_path, agg, split_by):
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "optim.lr=1e-2", f"algo.loss_agg={agg}",
            "algo.kl_coef=0.05", "algo.entropy_coef=0.01", "optim.max_grad_norm=null"]
    whole, batch = one_update([*base, f"run.dir={tmp_path / 'a'}", "algo.micro_batch_size=64"])
    split, batch2 = one_update([*base, f"run.dir={tmp_path / 'b'}", split_by])
    assert torch.equal(batch.response_ids, batch2.response_ids)  # same rollout
    assert batch.response_lengths.unique().numel() > 1  # padding differs across micro-batches
    assert whole.keys() == split.keys() and len(whole) > 0
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # a real gradient
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-7)


IN_LOSS = ("algo.kl_coef=0.05", "algo.kl_mode=loss", "algo.entropy_coef=0.01")


@pytest.mark.parametrize("agg, extra", [
    ("token-mean", IN_LOSS), ("seq-mean-token-mean", IN_LOSS), ("seq-mean-token-sum", IN_LOSS),
    ("seq-mean-token-sum-norm", IN_LOSS),
    ("token-mean", ()), ("seq-mean-token-mean", ()),  # zero-advantage groups skipped
])
def test_groups_trained_as_they_arrive_equal_one_batch(tiny_job, reward_spec, tmp_path, agg,
                                                       extra):
    """runtime.stream_groups: forward/backward passes run group by group, each part's loss
    normalised by 1 and the summed gradients by the batch's count at the end, give the
    whole batch's gradients and logged statistics (KL and entropy in the loss; or, without
    them, groups whose rewards tie skipped by both)."""
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digits_on_even_prompts')}'}}]",
            "algo.reward_range=[0, 1]", "optim.lr=1e-2", f"algo.loss_agg={agg}", *extra,
            "optim.max_grad_norm=null", "algo.prompts_per_step=6", "algo.micro_batch_size=5"]
    whole, batch, stats = one_update([*base, f"run.dir={tmp_path / 'a'}"], with_stats=True)
    parts, batch2, stats2 = one_update([*base, f"run.dir={tmp_path / 'b'}"], by_group=True,
                                       with_stats=True)
    assert torch.equal(batch.response_ids, batch2.response_ids)  # same rollout
    assert whole.keys() == parts.keys() and len(whole) > 0
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # a real gradient
    for name, value in whole.items():
        torch.testing.assert_close(parts[name], value, rtol=1e-4, atol=1e-7)
    assert stats.keys() == stats2.keys()
    if not extra:
        assert 0 < stats["update/rows_skipped_frac"] < 1  # some groups skipped, some trained
    for key in stats:
        assert stats2[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-7), key


def test_ppo_critic_micro_batches(tiny_job, reward_spec, tmp_path):
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "algo.name=ppo", "algo.group_size=1",
            "algo.prompts_per_step=12", "optim.max_grad_norm=null"]
    whole, _ = one_update([*base, f"run.dir={tmp_path / 'a'}", "algo.micro_batch_size=12"])
    split, _ = one_update([*base, f"run.dir={tmp_path / 'b'}", "algo.micro_batch_size=5"])
    assert any(name.startswith("critic.") for name in whole)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-7)


def test_token_budget_packs_by_length(tiny_job, reward_spec, tmp_path):
    _, batch = one_update([*tiny_job, f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
                           "algo.reward_range=[0, 1]"])
    parts = batch.micro_batch_indices(64, token_budget=40)
    assert sorted(torch.cat(parts).tolist()) == list(range(batch.batch_size))
    for idx in parts:
        micro = batch.select(idx).trimmed()
        width = micro.prompt_ids.shape[1] + micro.response_ids.shape[1]
        assert micro.batch_size == 1 or micro.batch_size * width <= 40


def test_engine_logprobs_replace_the_recompute(tiny_job, reward_spec, tmp_path):
    """With several updates per batch, the engine's sampled-token log-probs stand in for
    the old-log-prob pass; the update matches the recomputed one."""
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "algo.epochs=2", "optim.max_grad_norm=null"]
    recomputed, batch = one_update([*base, f"run.dir={tmp_path / 'a'}"])
    engine, batch2 = one_update([*base, f"run.dir={tmp_path / 'b'}", "algo.use_engine_logprobs=true"])
    mask = batch.response_mask.bool()
    torch.testing.assert_close(batch2.old_logprobs[mask], batch.old_logprobs[mask],
                               atol=1e-5, rtol=1e-5)
    for name, value in recomputed.items():
        torch.testing.assert_close(engine[name], value, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("algo", [["algo.kl_coef=0.1"],
                                  ["algo.name=ppo", "algo.group_size=1", "algo.prompts_per_step=16"]])
def test_fused_forwards_equal_the_batch_pass(tiny_job, reward_spec, tmp_path, algo):
    """Reference log-probs and critic values computed on groups as they finish (while
    the engine refills its 4 slots) equal those of one pass over the whole batch."""
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "rollout.batch_size=4", "algo.micro_batch_size=4",
            *algo]
    batches = {}
    for fuse in (True, False):
        trainer = RLTrainer(load_config(None, [*base, f"run.dir={tmp_path / str(fuse)}",
                                               f"rollout.fuse_forwards={str(fuse).lower()}"]))
        try:
            trainer.warm_start()
            timer = StageTimer()
            batch, _ = trainer.source.collect(0, timer)
            assert ("fused_forwards" in timer.times) == fuse
            trainer.scorer.score_forwards(batch, timer)
            batches[fuse] = batch
        finally:
            trainer.close()
    fused, plain = batches[True], batches[False]
    assert torch.equal(fused.response_ids, plain.response_ids)
    mask = plain.response_mask.bool()
    for name in ("ref_logprobs", "values"):
        if getattr(plain, name) is not None:
            torch.testing.assert_close(getattr(fused, name)[mask], getattr(plain, name)[mask],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pack", ["algo.pack_group_tokens=512", "algo.pack_group_tokens=0"])
@pytest.mark.parametrize("split_by", ["algo.micro_batch_size=64", "algo.micro_batch_size=5"])
def test_shared_prompt_forward_gives_the_full_forward_update(tiny_job, reward_spec, tmp_path,
                                                              split_by, pack):
    """Each prompt run once for its group, packed with its responses (the default) or with
    the responses against its cached keys and values (with KL to the reference, so the
    reference pass shares too), gives the gradients of every [prompt | response] row run
    in full."""
    base = [*tiny_job[:-1], f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.reward_range=[0, 1]", "optim.lr=1e-2", "algo.kl_coef=0.05",
            "optim.max_grad_norm=null", split_by]
    full, batch = one_update([*base, f"run.dir={tmp_path / 'a'}",
                              "algo.share_prompt_forward=false"])
    shared, batch2 = one_update([*base, f"run.dir={tmp_path / 'b'}", pack])
    assert torch.equal(batch.response_ids, batch2.response_ids)
    mask = batch.response_mask.bool()  # (positions past a response's end are never read)
    torch.testing.assert_close(batch2.ref_logprobs[mask], batch.ref_logprobs[mask], rtol=1e-5,
                               atol=1e-5)
    assert max(float(g.abs().max()) for g in full.values()) > 1e-3
    for name, value in full.items():
        torch.testing.assert_close(shared[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("split_by", ["algo.micro_batch_size=64", "algo.micro_batch_size=3"])
def test_skipping_zero_advantage_rows_keeps_the_update(tiny_job, reward_spec, tmp_path, agg,
                                                        split_by):
    """Groups whose rewards tie have zero advantage everywhere: leaving their rows out of
    the forward and backward gives the gradients of the full batch (the normalisers still
    count them)."""
    base = [*tiny_job[:-1], "algo.prompts_per_step=8",
            f"reward.functions=[{{fn: '{reward_spec('digits_on_even_prompts')}'}}]",
            "algo.reward_range=[0, 1]", "optim.lr=1e-2", f"algo.loss_agg={agg}",
            "optim.max_grad_norm=null", split_by]
    full, batch = one_update([*base, f"run.dir={tmp_path / 'a'}",
                              "algo.skip_zero_advantage=false"])
    skipped, batch2 = one_update([*base, f"run.dir={tmp_path / 'b'}"])
    assert torch.equal(batch.response_ids, batch2.response_ids)
    zero_rows = (batch.advantages == 0).all(-1)
    assert 0 < int(zero_rows.sum()) < batch.batch_size  # some rows skipped, some trained
    assert max(float(g.abs().max()) for g in full.values()) > 1e-3
    assert full.keys() == skipped.keys()
    for name, value in full.items():
        torch.testing.assert_close(skipped[name], value, rtol=1e-4, atol=1e-7)


def test_rows_with_gradient_are_kept_when_the_loss_needs_every_row(tiny_job, reward_spec):
    """A KL or entropy term, or a critic, gives zero-advantage rows a gradient: nothing is
    skipped then; with no row left, one zero-weight row stands in."""
    from plait.rollout.base import Completion
    from plait.train.experience import experience_from_completions

    def trainer_for(extra):
        return RLTrainer(load_config(None, [*tiny_job, *extra]))

    groups = [[Completion(prompt_index=i, token_ids=[5, 6], logprobs=[-1.0, -1.0],
                          finish_reason="stop", policy_version=0) for _ in range(2)]
              for i in range(2)]
    batch = experience_from_completions([[3, 4], [3, 5]], groups, [0, 1], 0)
    batch.advantages = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    for extra, kept in (([], 2), (["algo.kl_coef=0.1"], 4), (["algo.entropy_coef=0.01"], 4),
                        (["algo.skip_zero_advantage=false"], 4)):
        trainer = trainer_for(extra)
        try:
            assert trainer.updater.rows_with_gradient(batch).batch_size == kept, extra
            batch.advantages.zero_()
            if not extra:
                ghost = trainer.updater.rows_with_gradient(batch)
                assert ghost.ghost and ghost.batch_size == 1
            batch.advantages = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0],
                                             [-1.0, -1.0]])
        finally:
            trainer.close()
