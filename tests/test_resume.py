"""Resuming continues exactly: 2k steps straight equal k steps, SIGKILL, and k more."""

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from plait.config import load_config
from plait.recipes.rl import train


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "policy" / "model.safetensors"))


def job(tiny_job, reward_spec, run_dir):
    return [*tiny_job[:-1], f"run.dir={run_dir}", "train.steps=6", "train.save_every=3",
            "train.keep_last=0", "optim.lr=3e-3", "algo.reward_range=[0, 1]",
            f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]"]


def test_kill_and_resume_matches_uninterrupted(tiny_job, reward_spec, tmp_path, capsys):
    straight = tmp_path / "straight"
    train(load_config(None, job(tiny_job, reward_spec, straight)))

    resumed = tmp_path / "resumed"
    overrides = job(tiny_job, reward_spec, resumed)
    script = textwrap.dedent(f"""
        import os, signal
        from plait.config import load_config
        from plait.recipes.rl import train

        def kill_mid_run(trainer, step, metrics):
            if step == 4:  # after the step-3 checkpoint, with step 4 done and unsaved
                os.kill(os.getpid(), signal.SIGKILL)

        train(load_config(None, {overrides!r}), callbacks=[kill_mid_run])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PLAIT_PROGRESS": "0"}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpoints = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert checkpoints == ["step_000003"], checkpoints

    capsys.readouterr()
    stepped = []
    summary = train(load_config(None, overrides),
                    callbacks=[lambda trainer, step, metrics: stepped.append(step)])
    assert summary["steps"] == 6
    # it resumed from the step-3 checkpoint: a seeded restart from scratch would end with
    # the same weights as well, but would step from 1
    out = capsys.readouterr().out
    assert f"plait: resumed from {resumed / 'checkpoints' / 'step_000003'} at step 3" in out, \
        out[-2000:]
    assert stepped == [4, 5, 6], stepped
    final_straight, final_resumed = weights(straight, 6), weights(resumed, 6)
    midway = weights(straight, 3)
    assert any(not torch.equal(midway[k], final_straight[k]) for k in midway), \
        "weights did not change after the checkpoint: the test would prove nothing"
    for key, value in final_straight.items():
        assert torch.equal(value, final_resumed[key]), key
    steps = [line for line in (resumed / "metrics.jsonl").read_text().splitlines()
             if '"reward/mean"' in line]
    assert len(steps) == 6  # the killed step 4 was not logged twice
