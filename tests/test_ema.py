"""The policy's weight average (algo.ema_decay): the update by hand, the average a job
saves equals the one computed from its per-step checkpoints, it resumes exactly, and it
is evaluated beside the policy."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_runtime import run_cli
from transformers import AutoModelForCausalLM

from plait import algos
from plait.config import ConfigError, load_config


def test_ema_update_by_hand():
    average = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    algos.ema_update(average, [torch.tensor([3.0, 6.0]), torch.tensor([[8.0]])], 0.75)
    assert average[0].tolist() == [1.5, 3.0] and average[1].item() == 2.0
    algos.ema_update(average, [torch.tensor([0.0, 0.0]), torch.tensor([[0.0]])], 1.0)
    assert average[0].tolist() == [1.5, 3.0]  # decay 1: the average never moves
    with pytest.raises(ValueError, match="decay"):
        algos.ema_update(average, average, 1.5)


def _job(tiny_job, reward_spec, run_dir, *extra):
    base = [a for a in tiny_job if not a.startswith(("run.dir=", "train.threads="))]
    return [*base, f"run.dir={run_dir}", "train.threads=1", "optim.lr=1e-2",
            f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "algo.ema_decay=0.6", "train.save_every=1", "train.keep_last=0", *extra]


def test_the_saved_average_is_the_average_of_the_steps_and_resumes_exactly(tiny_job,
                                                                            reward_spec,
                                                                            tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *_job(tiny_job, reward_spec, run, "train.steps=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = [load_file(str(run / "tiny_model" / "model.safetensors"))] + [
        load_file(str(run / "checkpoints" / f"step_{s:06d}" / "policy" / "model.safetensors"))
        for s in (1, 2, 3)]
    saved = load_file(str(run / "ema_model" / "model.safetensors"))
    for key, value in saved.items():
        expected = weights[0][key].double()
        for step in weights[1:]:
            expected = 0.6 * expected + 0.4 * step[key].double()
        assert torch.allclose(value.double(), expected, atol=1e-6), key
    moved = max(float((saved[k] - weights[3][k]).abs().max()) for k in saved)
    assert moved > 1e-4  # the average is not the last policy
    checkpoint = load_file(str(run / "checkpoints" / "step_000003" / "ema" / "model.safetensors"))
    assert all(torch.equal(checkpoint[k], saved[k]) for k in saved)
    AutoModelForCausalLM.from_pretrained(run / "ema_model")  # a plain transformers model
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_after_ema"] <= 1.0 and "reward_after_ema" in summary
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert "eval_ema/accuracy" in last
    # stopped after step 2 and resumed: the same average
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step_000003")
    proc = run_cli("train", *_job(tiny_job, reward_spec, again, "train.steps=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    resumed = load_file(str(again / "ema_model" / "model.safetensors"))
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)


def test_sharded_ranks_refuse_an_average():
    with pytest.raises(ConfigError, match="algo.ema_decay keeps a whole copy"):
        load_config(None, ["algo.ema_decay=0.9", "runtime.data_parallel=fsdp",
                           "runtime.num_ranks=2"])
