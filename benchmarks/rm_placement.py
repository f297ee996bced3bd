#!/usr/bin/env python
"""PPO against a learned reward model, the reward model time-shared or apart: step time
and the reward model's share of the step.

- ``colocated``: one process generates, scores with the reward model (each group as it
  streams out of the engine), and trains, in turn (train.threads 2);
- ``partial-k0`` / ``partial-k1``: a trainer rank and a rollout worker (one thread
  each); the worker generates, scores with the reward model and computes the reference
  log-probs, the trainer trains; k1 lets the next batch generate while this one trains
  (``runtime.max_staleness=1``).

All start from the same SFT model and reward model on the built-in ``reverse`` task
(made once with ``plait sft`` and ``plait rm``) and run the same PPO steps. Reported per
variant: median seconds per step (steps 4+), the reward model's compute per step and the
wait for it after generation (where it scores: the trainer, or the rollout worker), and
what the trainer waits for (rewards when colocated, its batch when apart), also as
shares of the trainer's step.

    python benchmarks/rm_placement.py --steps 40 --rounds 2 --out benchmarks/results/rm_placement_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "colocated": ["train.threads=2"],
    "partial-k0": ["train.threads=1", "runtime.placement=partial", "runtime.max_staleness=0"],
    "partial-k1": ["train.threads=1", "runtime.placement=partial", "runtime.max_staleness=1"],
}


def plait(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "PLAIT_PROGRESS": "0"})
    if proc.returncode != 0:
        sys.exit(f"failed: plait {' '.join(args)}\n{proc.stderr[-3000:]}")


def prepare(work: Path) -> Path:
    """The SFT model and the reward model (made once)."""
    common = ["data.task=reverse", "run.tensorboard=false", "run.overwrite=true"]
    if not (work / "sft" / "sft_model").is_dir():
        plait("sft", *common, "sft.steps=150", "sft.eval_every=0", f"run.dir={work / 'sft'}")
    if not (work / "rm" / "reward_model").is_dir():
        plait("rm", *common, f"model.path={work / 'sft' / 'sft_model'}", "rm.steps=200",
              "pairs.source=policy", f"run.dir={work / 'rm'}")
    return work / "sft" / "sft_model"


def measure(run_dir: Path, skip: int = 3) -> dict:
    """Medians over steps after ``skip``: the trainer's step, the reward model's compute
    per step and the wait for it after generation (on the trainer, or on the rollout
    worker when it scores), and what the trainer waits for its batch."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r and r["step"] > skip]

    def median(*keys: str) -> float:
        return statistics.median(next((r[k] for k in keys if k in r), 0.0) for r in steps)

    step = median("time/step")
    compute = median("time/reward_compute", "rollout/worker_reward_compute_s")
    wait = median("time/reward_wait", "rollout/worker_reward_wait_s")
    trainer_wait = median("time/reward_wait", "time/rollout_wait")
    return {"s_per_step": step, "reward_compute_s": compute, "reward_wait_s": wait,
            "trainer_wait_s": trainer_wait, "reward_compute_share": compute / step,
            "trainer_wait_share": trainer_wait / step,
            "true_score_last": rows[-1].get("eval/reward_fn/task"), "steps": len(steps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_rm_placement"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rm_placement_cpu.json"))
    args = parser.parse_args(argv)
    policy = prepare(args.work)
    reward = args.work / "rm" / "reward_model"
    job = ["data.task=reverse", f"model.path={policy}", "sft.steps=0", "algo.name=ppo",
           "algo.advantage=gae", "algo.prompts_per_step=16", "algo.group_size=4",
           "rollout.max_new_tokens=10", "optim.lr=2e-5", "algo.kl_coef=0.05",
           f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0",
           "data.num_eval=64", "run.tensorboard=false", "run.progress=false",
           "run.overwrite=true",
           f"reward.functions=[{{model: '{reward}'}}, {{fn: task, weight: 0}}]"]
    runs = []
    for round_index in range(args.rounds):
        for variant in args.variants:
            run_dir = args.work / f"{variant}_r{round_index}"
            started = time.perf_counter()
            plait("train", *job, *VARIANTS[variant], f"run.dir={run_dir}")
            result = {"variant": variant, "round": round_index,
                      "wall_s": time.perf_counter() - started, **measure(run_dir)}
            print(json.dumps(result), flush=True)
            runs.append(result)
    summary = {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {key: statistics.median(r[key] for r in mine)
                            for key in ("s_per_step", "reward_compute_s", "reward_wait_s",
                                        "trainer_wait_s", "reward_compute_share",
                                        "trainer_wait_share")}
        ratios = [r["s_per_step"] / next(c["s_per_step"] for c in runs
                                         if c["variant"] == "colocated"
                                         and c["round"] == r["round"]) for r in mine] \
            if "colocated" in args.variants else []
        if ratios:
            summary[variant]["step_ratio_to_colocated"] = statistics.median(ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs, "steps": args.steps,
                                    "date": time.strftime("%Y-%m-%d")}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
