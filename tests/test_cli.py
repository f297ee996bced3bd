"""The command line: clear one-line errors for bad input, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from plait.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PLAIT_PROGRESS": "0"},
                          timeout=300)


def test_config_prints_resolved(capsys):
    assert main(["config", "train.steps=3", "algo.name=ppo"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "name: ppo" in out


def test_options_lists_documented_keys(capsys):
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    assert "algo.clip_high" in out and "clip-higher" in out


@pytest.mark.parametrize("args, message", [
    (["config", "train.stesp=3"], "did you mean 'train.steps'"),
    (["config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["train", "model.path=org/some-model"], "plait loads models only from local paths"),
    (["train", "data.task=additon"], "Did you mean 'addition'"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    proc = run_cli(*args, f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, message", [
    ('{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\nnot json\n', "line 3"),
    ('{"question": "1+1=", "answer": "2"}\n{"question": 5}\n', "2"),
    ('{"question": "1+1="}\n{"q": "2+2="}\n', "2"),
])
def test_malformed_dataset_row_is_named(tmp_path, tiny_job, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    proc = run_cli("train", *tiny_job, "data.task=null", f"data.train_path={data}",
                   "data.fields={prompt: question}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "data.jsonl" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_raising_reward_names_function_and_sample(tmp_path, tiny_job, reward_spec):
    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('raise_on_third')}'}}]",
                   "train.steps=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "raise_on_third" in proc.stderr and "sample" in proc.stderr
    assert "cannot score this one" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reward_fallback_counts_failures(tmp_path, tiny_job, reward_spec):
    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('nan_reward')}'}}]",
                   "reward.on_error=fallback", "algo.reward_range=[0, 1]", "train.steps=2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("reward_failures", 0) for r in records) == 2 * 16


def test_hanging_reward_times_out(tmp_path, tiny_job, reward_spec):
    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('hang')}'}}]",
                   "reward.timeout_s=1", "train.steps=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "hang" in proc.stderr and "time limit" in proc.stderr


def test_nan_loss_stops_with_checkpoint_intact(tmp_path, tiny_job, reward_spec):
    """An absurd learning rate blows the weights up: the run stops with a clear message
    and the last checkpoint written before the blow-up is complete and loadable."""
    from transformers import AutoModelForCausalLM

    from plait.train.checkpoint import latest_checkpoint

    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
                   "algo.reward_range=[0, 1]", "train.save_every=1", "optim.max_grad_norm=null",
                   "train.steps=30", "optim.lr=1e30", "train.nan_policy=stop", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "NaN" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and ckpt.name != "step_000030"
    AutoModelForCausalLM.from_pretrained(ckpt / "policy")
