"""plait dpo end to end: the loss starts at log 2 (the policy is its reference, whose
cached log-probabilities match the policy's own), the policy learns the pairs (DPO, IPO,
SimPO), its output loads as a transformers model, a killed run resumes exactly."""

import math

import pytest
import torch
from helpers_jobs import kill_in_step
from transformers import AutoModelForCausalLM

from plait import algos
from plait.config import load_config
from plait.recipes.dpo import DPOTrainer, train_dpo
from plait.telemetry.metrics import read_metrics

DPO_JOB = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.task=reverse",
    "train.threads=2", "run.tensorboard=false", "run.progress=false",
    "pairs.num_pairs=512", "pairs.num_eval_pairs=128", "dpo.batch_size=32", "dpo.lr=3e-3",
    "rollout.max_new_tokens=10",
]


def dpo_job(run_dir, *extra):
    return load_config(None, [*DPO_JOB, f"run.dir={run_dir}", *extra])


def test_the_first_loss_is_log_2_and_the_reference_is_computed_once(tmp_path):
    with DPOTrainer(dpo_job(tmp_path / "run", "dpo.steps=1")) as trainer:
        assert trainer.reference_logps.shape == (512 + 128, 2)
        assert not hasattr(trainer, "reference")  # only its log-probabilities are kept
        rows = trainer.train_rows[:16]
        loss, stats = trainer.loss(rows)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
        assert stats["reward_margin"].item() == pytest.approx(0.0, abs=1e-5)


def test_packed_shared_prompt_log_probs_equal_each_row_on_its_own(tmp_path):
    """The pair's prompt once, both responses packed after it == the padded forward of
    every [prompt | response] row, values and gradients."""
    from plait.models.reward_model import padded_batch
    from plait.train.forward import position_ids_from_mask

    with DPOTrainer(dpo_job(tmp_path / "run", "dpo.steps=1")) as trainer:
        odd = {key: trainer.train_rows[0][key] for key in ("prompt", "rejected")}
        rows = trainer.train_rows[:12] + [{**odd, "chosen": "x", "_pair": 0}]
        policy = trainer.policy.train()
        summed, counts = trainer.logps(policy, rows)
        packed = torch.autograd.grad(summed.sum(), list(policy.parameters()))
        encoded = [trainer.encode(row) for row in rows]
        sequences = [c for c, _ in encoded] + [r for _, r in encoded]
        ids, mask = padded_batch(sequences, trainer.tokenizer.pad_token_id)
        logits = policy(input_ids=ids, attention_mask=mask,
                        position_ids=position_ids_from_mask(mask), use_cache=False).logits
        token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        starts = torch.tensor([trainer.encode.prompt_length(row) for row in rows] * 2)
        response = (torch.arange(1, ids.shape[1])[None] >= starts[:, None]) & mask[:, 1:].bool()
        expected = (token * response).sum(-1)
        n = len(rows)
        torch.testing.assert_close(summed, torch.stack([expected[:n], expected[n:]], -1),
                                   atol=1e-4, rtol=1e-5)
        assert counts.tolist() == torch.stack([response[:n].sum(-1), response[n:].sum(-1)],
                                              -1).float().tolist()
        padded = torch.autograd.grad(expected.sum(), list(policy.parameters()))
        for a, b in zip(packed, padded, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sharing_the_responses_common_start_keeps_the_sigmoid_loss_and_its_gradient(
        tmp_path):
    """DPO's sigmoid loss computes the tokens both responses begin with once: its loss,
    margin and gradient equal those of whole responses after the prompt; IPO (per-token
    averages) keeps whole responses."""
    with DPOTrainer(dpo_job(tmp_path / "run", "dpo.steps=1")) as trainer:
        rows = trainer.train_rows[:24]
        prompt = [len(trainer.encode.encode.prompt(row["prompt"])) for row in rows]
        shared = [trainer.encode.prompt_length(row) for row in rows]
        assert sum(s > p for s, p in zip(shared, prompt, strict=True)) >= 4
        policy = trainer.policy.train()
        reference = torch.randn(len(rows), 2)  # a reference unlike the policy
        summed, _ = trainer.logps(policy, rows)
        loss, stats = algos.dpo_loss(summed[:, 0], summed[:, 1], reference[:, 0],
                                     reference[:, 1], beta=0.5)
        grads = torch.autograd.grad(loss, list(policy.parameters()))
        trainer.encode.share_prefix, trainer.encode._cache = False, {}
        assert [trainer.encode.prompt_length(row) for row in rows] == prompt
        whole, _ = trainer.logps(policy, rows)
        assert not torch.allclose(whole, summed)  # the shared tokens were left out
        expected, expected_stats = algos.dpo_loss(whole[:, 0], whole[:, 1], reference[:, 0],
                                                  reference[:, 1], beta=0.5)
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats["reward_margin"], expected_stats["reward_margin"],
                                   atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, torch.autograd.grad(expected, list(policy.parameters())),
                        strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with DPOTrainer(dpo_job(tmp_path / "ipo", "dpo.steps=1", "dpo.loss=ipo")) as trainer:
        assert not trainer.encode.share_prefix


@pytest.mark.parametrize("loss, extra", [
    ("sigmoid", ("dpo.beta=0.5",)), ("ipo", ("dpo.beta=0.5",)), ("simpo", ("dpo.beta=2.0",))])
def test_the_policy_learns_the_pairs(tmp_path, loss, extra):
    """From the untrained tiny model, 300 steps: held-out pairs ranked as labelled rise
    from chance (about 0.66-0.70 at the seed; the task is hard for a model this small)."""
    run = tmp_path / loss
    summary = train_dpo(dpo_job(run, f"dpo.loss={loss}", "dpo.steps=300", "dpo.eval_every=150",
                                "pairs.num_pairs=4096", *extra))
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.1, summary
    assert summary["accuracy_vs_truth_after"] == summary["accuracy_after"]  # no label noise
    assert summary["loss_after"] < summary["loss_before"]
    assert 0.0 <= summary["true_score_after"] <= 1.0
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 150, 300]
    model = AutoModelForCausalLM.from_pretrained(run / "dpo_model")
    saved = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_000300" / "policy")
    for (name, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_a_killed_run_resumes_exactly(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["dpo.steps=6", "dpo.eval_every=0", "train.save_every=3", "train.keep_last=0",
              "pairs.num_pairs=128", "pairs.num_eval_pairs=32"]
    train_dpo(dpo_job(straight, *common))
    overrides = [*DPO_JOB, f"run.dir={resumed}", *common]
    proc = kill_in_step("dpo", "DPOTrainer", "train_dpo", overrides, step=4)  # after step 3's checkpoint
    assert proc.returncode == -9, proc.stderr[-2000:]
    capsys.readouterr()
    train_dpo(load_config(None, overrides))
    assert f"resumed from {resumed / 'checkpoints' / 'step_000003'} at step 3" in \
        capsys.readouterr().out
    one = AutoModelForCausalLM.from_pretrained(straight / "dpo_model").state_dict()
    two = AutoModelForCausalLM.from_pretrained(resumed / "dpo_model").state_dict()
    midway = AutoModelForCausalLM.from_pretrained(
        straight / "checkpoints" / "step_000003" / "policy").state_dict()
    assert any(not torch.equal(midway[k], one[k]) for k in one)  # it trained after step 3
    for name in one:
        assert torch.equal(one[name], two[name]), name
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl")
             if "loss/preference" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
