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
    pytest.param(("algo.kl_coef=0.05", "algo.micro_batch_tokens=40"), marks=pytest.mark.slow),
    # PPO: a sharded critic, two epochs (old log-probs from the gathered policy)
    ("algo.name=ppo", "algo.group_size=2", "algo.epochs=2", "algo.micro_batch_size=3"),
    # the SFT warm start sharded too (each rank a share of every batch), the reference
    # then read from the saved warm-started model
    pytest.param(("sft.steps=4", "sft.batch_size=6", "algo.kl_coef=0.05"), marks=pytest.mark.slow),
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


@pytest.mark.parametrize("first,second", [(FSDP, ()), pytest.param((), FSDP, marks=pytest.mark.slow)],
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


def test_bfloat16_compute_gathers_bfloat16_over_float32_shards(tmp_path):
    """model.dtype=bfloat16 under FSDP: parameters are gathered (and layers compute) in
    bfloat16, while the shards, their gradients and so the optimizer stay float32."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model
    from plait.parallel import fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        tokenizer = build_char_tokenizer()
        spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                             num_kv_heads=1)
        model = build_tiny_model(spec, tokenizer, seed=0)
        reference = build_tiny_model(spec, tokenizer, seed=0)
        fsdp.shard(model, DeviceMesh("cpu", [0]), torch.bfloat16)
        assert {p.to_local().dtype for p in model.parameters()} == {torch.float32}
        with fsdp.gathered(model):
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        ids = torch.tensor([tokenizer("12+34=46")["input_ids"]])
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        logits.float().logsumexp(-1).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and g.to_local().dtype == torch.float32
                   for g in grads.values())
        # the same model computing in float32 gives about the same gradients
        reference(input_ids=ids).logits.logsumexp(-1).sum().backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads[name].full_tensor(), p.grad, rtol=0.1, atol=0.05)
    finally:
        dist.destroy_process_group()


def test_sharded_bfloat16_job_trains(tiny_job, reward_spec, tmp_path):
    """Two sharded ranks computing in bfloat16 train (finite steps, weights moved) and
    save float32 weights: the shards stay float32."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    proc = run_cli("train", *job(tiny_job, reward_spec, run_dir, *FSDP, "model.dtype=bfloat16"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "grad_norm/policy" in line]
    assert len(steps) == 3 and all(0 < m["grad_norm/policy"] < 1e3 for m in steps)
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "policy"
    saved = load_file(str(ckpt / "model.safetensors"))
    start = load_file(str(run_dir / "tiny_model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert max(float((saved[k] - start[k]).abs().max()) for k in saved) > 1e-3
