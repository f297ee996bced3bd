"""Overlap: rollout workers apart with ``max_staleness=1`` vs the colocated synchronous
job, on the same 2 processes, same job, same number of samples.

All variants start from one SFT warm start of the default job (made once, then
``model.path`` points at it) and run the same GRPO steps:

- ``colocated-2``: 2 ranks, each generating and training its half (synchronous);
- ``disagg-k0``: 1 trainer rank + 1 rollout worker, synchronous (max_staleness=0);
- ``disagg-k1``: 1 trainer rank + 1 rollout worker, the next batch generates while
  this one trains (max_staleness=1, decoupled PPO correction);
- ``disagg-k1-stream``: as ``disagg-k1`` with groups sent to the trainer as they
  finish, and trained on while the rest generates (``runtime.stream_groups=true``);
- ``disagg-k1-partial``: as ``disagg-k1`` with ``runtime.partial_rollout`` (the worker's
  engine is never drained: the next batch joins this one's long tail as soon as its
  weights allow, and new weights are taken mid-generation);
- ``colocated-1``: 1 process with 2 threads, for reference;
- ``dynamic-2``: 2 processes whose split (0 or 1 generating) is revised from the
  measured stage times (``placement.jsonl`` lists the changes).

Reports the median and the mean seconds per step (the first 5 steps excluded), the mean
training reward over the last 20 steps, and the held-out greedy accuracy at the
end, and the ratio of each variant's step time to ``colocated-2``'s. With
``--rounds N`` every variant runs N times, one after the other in each round, and
the ratio reported is the median of the in-round ratios (``variants`` in the JSON
is the first round, ``rounds`` holds them all).

    python benchmarks/overlap.py --steps 200 --out benchmarks/results/overlap_cpu.json
    python benchmarks/overlap.py --job repeat --steps 100 --out benchmarks/results/overlap_repeat_cpu.json
    python benchmarks/overlap.py --job repeat --variants colocated-2 disagg-k1 --rounds 3 --steps 150 --set rollout.compile=true
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "colocated-2": ["runtime.num_ranks=2", "train.threads=1"],
    "disagg-k0": ["runtime.placement=disaggregated", "runtime.max_staleness=0",
                  "train.threads=1"],
    "disagg-k1": ["runtime.placement=disaggregated", "runtime.max_staleness=1",
                  "train.threads=1"],
    "disagg-k1-stream": ["runtime.placement=disaggregated", "runtime.max_staleness=1",
                         "runtime.stream_groups=true", "train.threads=1"],
    "disagg-k1-partial": ["runtime.placement=disaggregated", "runtime.max_staleness=1",
                          "runtime.partial_rollout=true", "train.threads=1"],
    "colocated-1": ["train.threads=2"],
    "dynamic-2": ["runtime.placement=dynamic", "runtime.num_ranks=2", "train.threads=1"],
}


JOBS = {
    "addition": [],
    "repeat": ["data.task=repeat", "data.task_args={max_count: 120}",
               "rollout.max_new_tokens=128", "model.tiny.max_position_embeddings=256",
               "algo.prompts_per_step=4", "algo.micro_batch_tokens=2048", "data.num_eval=200"],
}


def plait(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "plait.cli", "train", *args],
                          capture_output=True, text=True,
                          env={**os.environ, "PLAIT_PROGRESS": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")


def run_variant(name: str, run_dir: Path, common: list[str], sft: Path, steps: int) -> dict:
    """One variant's job from the shared SFT checkpoint, and its figures."""
    start = time.time()
    shape = tuple(a for a in common if a.startswith("model.tiny."))  # of the SFT model
    plait(*(a for a in common if a not in shape), f"run.dir={run_dir}",
          f"model.path={sft / 'sft_model'}", "sft={steps: 0}",
          f"train.steps={steps}", *VARIANTS[name])
    wall = time.time() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "time/step" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    changes = run_dir / "placement.jsonl"
    return {
        "placement_changes": [json.loads(line) for line in changes.read_text().splitlines()]
        if changes.is_file() else [],
        "step_s_median": statistics.median(r["time/step"] for r in steps_[5:]),
        "step_s_mean": statistics.fmean(r["time/step"] for r in steps_[5:]),
        "reward_last20": statistics.fmean(r["reward/mean"] for r in steps_[-20:]),
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "samples": sum(r["samples"] for r in steps_),
        "wall_s": round(wall, 1),
        "rollout_wait_s_median": statistics.median(
            r.get("time/rollout_wait", 0.0) for r in steps_[5:]),
        # stage medians (on a trainer: generate is 0 when workers generate)
        **{f"{stage}_s_median": statistics.median(r.get(f"time/{stage}", 0.0)
                                                  for r in steps_[5:])
           for stage in ("generate", "update", "old_logprobs")},
        # the rollout worker's stages (generate, weights_wait, cycle, send, ...)
        **{f"{key.removeprefix('rollout/')}_median": statistics.median(
            r.get(key, 0.0) for r in steps_[5:])
           for key in sorted({k for r in steps_ for k in r if k.startswith("rollout/worker_")})},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--job", choices=list(JOBS), default="addition",
                        help="'addition': the default job (short answers: training-bound); "
                        "'repeat': long-tailed answers up to 120 tokens, 32 samples a step (generation-bound)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every variant (e.g. algo.epochs=2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, one after the other in each "
                        "round; ratios are taken within a round and their median reported (this "
                        "machine's speed drifts over minutes)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    common = ["examples/grpo_addition.yaml", "run.overwrite=true", "run.tensorboard=false",
              "run.progress=false", "train.save_every=0", "train.eval_every=0",
              *JOBS[args.job], *args.set]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="plait-overlap-") as tmp:
        sft = Path(tmp) / "sft"
        plait(*common, f"run.dir={sft}", "train.steps=0")
        for index in range(args.rounds):
            rows = {}
            for name in args.variants:
                rows[name] = row = run_variant(name, Path(tmp) / name, common, sft, args.steps)
                print(f"round {index + 1} {name:17s} step={row['step_s_median']:.3f} s "
                      f"(mean {row['step_s_mean']:.3f} s)  "
                      f"reward(last 20)={row['reward_last20']:.3f}  "
                      f"acc {row['accuracy_before']:.3f} -> {row['accuracy_after']:.3f}  "
                      f"wall={row['wall_s']:.0f} s", flush=True)
            base = rows.get("colocated-2")
            if base:
                for row in rows.values():
                    row["step_ratio_vs_colocated_2"] = row["step_s_median"] / base["step_s_median"]
                    row["mean_step_ratio_vs_colocated_2"] = row["step_s_mean"] / base["step_s_mean"]
            rounds.append(rows)
    result = {"benchmark": "overlap", "job": args.job, "overrides": args.set,
              "steps": args.steps, "variants": rounds[0], "rounds": rounds,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "command": "python benchmarks/overlap.py " + " ".join(sys.argv[1:])}
    if "colocated-2" in args.variants:
        for key in ("step_ratio_vs_colocated_2", "mean_step_ratio_vs_colocated_2"):
            result[f"{key}_median"] = {
                name: statistics.median(r[name][key] for r in rounds) for name in args.variants}
        for name, ratio in result["step_ratio_vs_colocated_2_median"].items():
            per_round = ", ".join(f"{r[name]['step_ratio_vs_colocated_2']:.2f}" for r in rounds)
            means = ", ".join(f"{r[name]['mean_step_ratio_vs_colocated_2']:.2f}" for r in rounds)
            print(f"{name:17s} {ratio:.2f}x colocated-2's median step time (rounds: {per_round}); "
                  f"{result['mean_step_ratio_vs_colocated_2_median'][name]:.2f}x its mean step "
                  f"time (rounds: {means})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
