"""Tiny end-to-end runs that must learn, and the artefacts a run leaves behind."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from plait.config import load_config
from plait.recipes.rl import train
from plait.telemetry.metrics import read_metrics


def first_last_reward(run_dir, window=5):
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in records]
    return sum(rewards[:window]) / window, sum(rewards[-window:]) / window


def learning_job(tiny_job, reward_spec, *extra):
    return load_config(None, [
        *tiny_job, f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
        "algo.reward_range=[0, 1]", "optim.lr=3e-3", "train.steps=40", *extra])


def test_grpo_learns_and_leaves_artefacts(tiny_job, reward_spec):
    cfg = learning_job(tiny_job, reward_spec)
    summary = train(cfg)
    run_dir = cfg.run.dir and __import__("pathlib").Path(cfg.run.dir)
    first, last = first_last_reward(run_dir)
    assert last > first + 0.2, (first, last)
    assert summary["steps"] == 40
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["accuracy_after"] == summary["accuracy_after"]
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timeline = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    assert [t["step"] for t in timeline] == list(range(1, 41))
    assert {"generate", "reward", "update"} <= {name for name, _, _ in timeline[-1]["spans"]}
    assert (run_dir / "config.yaml").is_file()
    ckpt = run_dir / "checkpoints" / "step_000040" / "policy"
    AutoModelForCausalLM.from_pretrained(ckpt)  # HF-loadable weights
    step_metrics = read_metrics(run_dir / "metrics.jsonl")[-2]
    # one update per batch: the engine's log-probs are the trainer's, to float precision
    assert step_metrics["rollout/logprob_gap_mean"] < 1e-4
    for key in ("time/generate", "time/reward_wait", "time/update", "time/weight_sync", "policy/clipfrac", "lr"):
        assert key in step_metrics


@pytest.mark.parametrize("extra", [
    ["algo.name=ppo", "algo.group_size=1", "algo.prompts_per_step=16", "algo.epochs=2",
     "algo.mini_batches=2", "algo.kl_coef=0.01", "algo.kl_mode=reward"],
    ["algo.advantage=rloo", "algo.kl_coef=0.01", "algo.kl_estimator=k3"],
    ["algo.advantage=reinforce++", "algo.loss_agg=seq-mean-token-sum-norm"],
    ["algo.reward_adjust=grpovi", "algo.grpovi_weights=reference", "algo.dual_clip=3"],
    ["algo.dynamic_sampling=true", "algo.max_draws=3", "algo.clip_high=0.28",
     "algo.overlong_buffer=2", "algo.advantage=drgrpo", "algo.mini_batches=2"],
    ["model.tiny.arch=llama", "algo.advantage=drgrpo"],
    ["algo.ratio_level=sequence", "algo.clip_low=3e-4", "algo.clip_high=4e-4",
     "algo.loss_agg=seq-mean-token-mean"],
])
def test_variants_learn(tiny_job, reward_spec, extra):
    cfg = learning_job(tiny_job, reward_spec, *extra)
    train(cfg)
    first, last = first_last_reward(__import__("pathlib").Path(cfg.run.dir))
    assert last > first + 0.15, (extra, first, last)


def test_nan_loss_is_skipped_and_counted(tiny_job, reward_spec):
    """A non-finite loss skips that update (weights untouched), is counted, and the run
    goes on; a streak of max_nan_skips stops it."""
    from plait.errors import TrainingDiverged
    from plait.recipes.rl import RLTrainer

    cfg = learning_job(tiny_job, reward_spec, "train.steps=4", "train.max_nan_skips=2")
    poisoned_steps = {2}
    with RLTrainer(cfg) as trainer:
        micro_loss = trainer.updater.micro_loss

        def maybe_nan(micro, norm, stat_norm=None):
            loss, stats = micro_loss(micro, norm, stat_norm)
            if trainer.global_step in poisoned_steps:
                loss = loss * float("nan")
                stats["nonfinite"] = 1.0
            return loss, stats

        trainer.updater.micro_loss = maybe_nan
        before = {}

        def snapshot(t, step, metrics):
            before[step] = {n: p.detach().clone() for n, p in t.policy.named_parameters()}

        trainer.callbacks.append(snapshot)
        summary = trainer.run()
        assert summary["nan_skips"] == 1
        for name, value in before[2].items():  # step 3 was the poisoned update (index 2)
            assert torch.equal(value, before[3][name])
        assert any(not torch.equal(before[3][n], before[4][n]) for n in before[3])

    cfg = learning_job(tiny_job, reward_spec, "train.steps=6", "train.max_nan_skips=2",
                       "run.overwrite=true")
    poisoned_steps = {1, 2, 3, 4, 5}
    with RLTrainer(cfg) as trainer, pytest.raises(TrainingDiverged, match="NaN/inf"):
        micro_loss = trainer.updater.micro_loss
        trainer.updater.micro_loss = maybe_nan
        trainer.run()
