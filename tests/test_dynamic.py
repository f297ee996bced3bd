"""Dynamic placement: the split controller's decisions (pure logic), and a job whose
processes switch roles mid-run."""

import json
import os
import subprocess
import sys

from plait.runtime.dynamic import SplitController


def feed(ctl, at, **times):
    metrics = {f"time/{k}": v for k, v in times.items()}
    return ctl.observe(at, metrics)


def test_colocated_tries_a_worker_when_generation_dominates():
    ctl = SplitController(processes=2, dwell=2)
    assert feed(ctl, 0, step=1.0, generate=0.1) is None
    assert feed(ctl, 1, step=1.0, generate=0.1) is None  # generation is cheap: stay
    ctl = SplitController(processes=2, dwell=2)
    feed(ctl, 0, step=1.0, generate=0.6)
    change = feed(ctl, 1, step=1.0, generate=0.6)
    assert change is not None and change[0] == 1 and "generation" in change[1]


def test_worse_split_is_undone_and_not_retried_during_cooldown():
    ctl = SplitController(processes=2, dwell=2, cooldown=10)
    feed(ctl, 0, step=1.0, generate=0.6)
    assert feed(ctl, 1, step=1.0, generate=0.6)[0] == 1
    feed(ctl, 2, step=1.5, rollout_wait=0.0)
    change = feed(ctl, 3, step=1.5, rollout_wait=0.0)
    assert change[0] == 0 and change[1].startswith("undo")
    for at in range(4, 10):  # generation still dominates, but the move is blocked
        assert feed(ctl, at, step=1.0, generate=0.6) is None
    assert feed(ctl, 14, step=1.0, generate=0.6)[0] == 1  # cooldown over


def test_idle_sides_move_the_split():
    ctl = SplitController(processes=4, dwell=1, split=1)
    change = feed(ctl, 0, step=1.0, rollout_wait=0.5)  # trainers wait for batches
    assert change[0] == 2
    ctl = SplitController(processes=4, dwell=1, split=2)
    change = feed(ctl, 0, step=1.0, worker_idle=0.5)  # workers wait for trainers
    assert change[0] == 1
    assert feed(ctl, 1, step=1.0, worker_idle=0.5) is None  # the last worker stays
    ctl = SplitController(processes=2, dwell=1, split=1)
    assert feed(ctl, 0, step=1.0, rollout_wait=0.5) is None  # no process left to add


def test_dynamic_job_switches_roles_and_keeps_learning(tiny_job, reward_spec, tmp_path):
    """2 processes; generation-heavy settings make the controller try a rollout worker.
    Every process must end with the same weights (they all take every update)."""
    run_dir = tmp_path / "run"
    base = [a for a in tiny_job if not a.startswith(("run.dir=", "train.threads=",
                                                     "rollout.max_new_tokens="))]
    args = [*base, f"run.dir={run_dir}", "train.threads=1", "train.steps=12",
            "optim.lr=1e-2", "algo.reward_range=[0, 1]", "rollout.max_new_tokens=24",
            f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            "runtime.placement=dynamic", "runtime.num_ranks=2"]
    proc = subprocess.run([sys.executable, "-m", "plait.cli", "train", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PLAIT_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "placement/rollout_workers" in r]
    assert len(steps) == 12
    splits = [r["placement/rollout_workers"] for r in steps]
    assert 1.0 in splits, f"never tried a rollout worker: {splits}"
    events = [json.loads(line) for line in (run_dir / "placement.jsonl").read_text().splitlines()]
    assert events and all("reason" in e for e in events)
    assert "placement: from step" in proc.stdout + proc.stderr
    # stale batches (made during the previous step) were corrected and counted
    stale = [r for r in steps if r.get("rollout/staleness", 0) == 1]
    assert stale and all("policy/is_weight_mean" in r for r in stale)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward_after"] > summary["reward_before"]


def test_leaving_idle_workers_is_not_reversed_at_once():
    ctl = SplitController(processes=3, dwell=1, split=2, cooldown=5)
    assert feed(ctl, 0, step=1.0, worker_idle=0.5)[0] == 1
    assert feed(ctl, 1, step=1.0, rollout_wait=0.9) is None  # would add a worker: blocked
    assert feed(ctl, 6, step=1.0, rollout_wait=0.9)[0] == 2
