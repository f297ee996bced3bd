"""Sharded trainer ranks (runtime.data_parallel=fsdp, FSDP2 on gloo): the same update as
one unsharded rank, and checkpoints that resume in any layout."""

import json

import pytest
from test_runtime import assert_same_weights, job, run_cli
from transformers import AutoConfig, AutoModelForCausalLM

FSDP = ("runtime.num_ranks=2", "runtime.data_parallel=fsdp")


@pytest.mark.parametrize("extra", [
    # KL to a sharded reference (gathered for its pass), micro-batches by a token budget,
    # so the two ranks can cut different numbers of micro-batches
    ("algo.kl_coef=0.05", "algo.micro_batch_tokens=40"),
    # PPO: a sharded critic, two epochs (old log-probs from the gathered policy)
    ("algo.name=ppo", "algo.group_size=2", "algo.epochs=2", "algo.micro_batch_size=3"),
    # the SFT warm start sharded too (each rank a share of every batch), the reference
    # then read from the saved warm-started model
    ("sft.steps=4", "sft.batch_size=6", "algo.kl_coef=0.05"),
], ids=["grpo-kl-token-budget", "ppo-critic", "sft-then-grpo"])
def test_sharded_ranks_give_the_one_rank_update(tiny_job, reward_spec, tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli("train", *job(tiny_job, reward_spec, one, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, two, *extra, *FSDP))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, two)
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1[1:4], m2[1:4], strict=True):
        assert b["samples"] == a["samples"]
        assert b["loss/policy"] == pytest.approx(a["loss/policy"], abs=1e-5)
        assert b["grad_norm/policy"] == pytest.approx(a["grad_norm/policy"], rel=1e-4)
    # the checkpoint is a plain Hugging Face model, not a sharded one
    ckpt = sorted((two / "checkpoints").glob("step_*"))[-1] / "policy"
    assert AutoConfig.from_pretrained(ckpt).architectures == ["Qwen2ForCausalLM"]
    AutoModelForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("first,second", [(FSDP, ()), ((), FSDP)],
                         ids=["fsdp-then-one-rank", "one-rank-then-fsdp"])
def test_checkpoints_resume_across_layouts(tiny_job, reward_spec, tmp_path, first, second):
    """Weights and AdamW states saved in one layout continue exactly in the other."""
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    common = ("train.save_every=2", "train.keep_last=0")
    proc = run_cli("train", *job(tiny_job, reward_spec, straight, *common, "train.steps=4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, switched, *common, "train.steps=2",
                                 *first))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, switched, *common, "train.steps=4",
                                 *second))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_weights(straight, switched)


def test_sharding_is_refused_under_dynamic_placement():
    from plait.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fsdp does not run under runtime.placement=dynamic"):
        load_config(None, ["runtime.num_ranks=2", "runtime.data_parallel=fsdp",
                           "runtime.placement=dynamic"])
