"""plait rm, plait dpo and plait sft on 2 ranks take the optimizer steps of 1 rank: each
rank trains its share of every batch, and the shares' losses add up to the batch's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from plait.cli import main
from plait.data.tasks import make_task
from plait.telemetry.metrics import read_metrics

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
        "train.threads=1", "run.tensorboard=false", "run.progress=false"]


def _pairs_with_shared_prompts(path):
    """Two pairs per prompt, so per-prompt centring sees groups."""
    rows = make_task("reverse").make_pairs(48, seed=3)
    out = []
    for row in rows:
        out.append({"prompt": row["prompt"], "chosen": row["chosen"],
                    "rejected": row["rejected"]})
        out.append({"prompt": row["prompt"], "chosen": row["rejected"],
                    "rejected": row["rejected"][:-1] + "q"})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def _weights(directory):
    return load_file(next(directory.glob("*.safetensors")))


def _same_run(one, two, out_dir, loss_key):
    a, b = _weights(one / out_dir), _weights(two / out_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
    loss_one = [r[loss_key] for r in read_metrics(one / "metrics.jsonl") if loss_key in r]
    loss_two = [r[loss_key] for r in read_metrics(two / "metrics.jsonl") if loss_key in r]
    assert len(loss_one) == len(loss_two) == 4
    assert loss_one == pytest.approx(loss_two, rel=1e-5, abs=1e-6)
    assert json.loads((two / "summary.json").read_text())["ranks"] == 2


def test_reward_model_on_two_ranks_equals_one(tmp_path):
    pairs = _pairs_with_shared_prompts(tmp_path / "pairs.jsonl")
    job = [*TINY, "data.task=reverse", f"pairs.train_path={pairs}", "pairs.eval_fraction=0.25",
           "rm.steps=4", "rm.batch_size=9", "rm.lr=3e-3", "rm.center_coef=0.1",
           "rm.eval_every=0", "train.save_every=0"]
    assert main(["rm", *job, f"run.dir={tmp_path / 'one'}"]) == 0
    assert main(["rm", *job, f"run.dir={tmp_path / 'two'}", "runtime.num_ranks=2"]) == 0
    _same_run(tmp_path / "one", tmp_path / "two", "reward_model", "loss/pairwise")


def test_advantage_model_on_two_ranks_equals_one(tmp_path):
    """Whole prompts a step, centring over distinct responses and the bound: each rank's
    part of the batch's loss uses the whole batch's counts."""
    pairs = _pairs_with_shared_prompts(tmp_path / "pairs.jsonl")
    job = [*TINY, "data.task=reverse", f"pairs.train_path={pairs}", "pairs.eval_fraction=0.25",
           "rm.steps=4", "rm.batch_size=9", "rm.lr=3e-3", "rm.objective=advantage",
           "rm.score_bound=0.05", "rm.eval_every=0", "train.save_every=0"]
    assert main(["rm", *job, f"run.dir={tmp_path / 'one'}"]) == 0
    assert main(["rm", *job, f"run.dir={tmp_path / 'two'}", "runtime.num_ranks=2"]) == 0
    _same_run(tmp_path / "one", tmp_path / "two", "reward_model", "loss/pairwise")
    bound = [r["train/bound_penalty"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")
             if "train/bound_penalty" in r]
    assert len(bound) == 4 and max(bound) > 0  # the bound was in play


def test_dpo_on_two_ranks_equals_one(tmp_path):
    job = [*TINY, "data.task=reverse", "pairs.num_pairs=64", "pairs.num_eval_pairs=16",
           "dpo.steps=4", "dpo.batch_size=7", "dpo.lr=1e-3", "dpo.eval_every=0",
           "train.save_every=0", "data.num_eval=8"]
    assert main(["dpo", *job, f"run.dir={tmp_path / 'one'}"]) == 0
    assert main(["dpo", *job, f"run.dir={tmp_path / 'two'}", "runtime.num_ranks=2"]) == 0
    _same_run(tmp_path / "one", tmp_path / "two", "dpo_model", "loss/preference")


def test_sft_on_two_ranks_equals_one(tmp_path):
    job = [*TINY, "data.task=reverse", "data.num_train=500", "data.num_eval=16",
           "sft.steps=4", "sft.batch_size=9", "sft.lr=3e-3", "sft.packing=true",
           "sft.max_length=40", "train.save_every=0"]
    assert main(["sft", *job, f"run.dir={tmp_path / 'one'}"]) == 0
    assert main(["sft", *job, f"run.dir={tmp_path / 'two'}", "runtime.num_ranks=2"]) == 0
    _same_run(tmp_path / "one", tmp_path / "two", "sft_model", "loss/sft")
