"""The RLHF pipeline on the built-in preference task, end to end: SFT, a reward model,
then GRPO or PPO against the reward model, per seed and per KL setting.

The ``reverse`` task keeps a hidden true score of every response, so the run shows what
RLHF is meant to show and what it risks: the reward model's held-out accuracy against the
truth, the policy's true score before and after RL against the learned reward, and the
reward model's score beside the true score over the RL steps (over-optimisation: the
learned score rising while the true one falls). Each stage is the command a user runs::

    plait train data.task=reverse sft.steps=N train.steps=0 ...      (SFT)
    plait rm data.task=reverse model.path=SFT/sft_model ...          (reward model)
    plait train ... "reward.functions=[{model: RM/reward_model}, {fn: task, weight: 0}]"

(the task's verifier at weight 0 is logged, not trained on). Writes ``--out`` (JSON) and
a PNG of the score curves beside it.

    python benchmarks/rlhf_pipeline.py --seeds 0 1 2 --kl 0 0.1 --out benchmarks/results/rlhf_pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def plait(*args: str) -> float:
    """Run one plait command; its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "PLAIT_PROGRESS": "0"})
    if proc.returncode != 0:
        sys.exit(f"failed: plait {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kl", type=float, nargs="+", default=[0.0, 0.1],
                        help="algo.kl_coef values of the RL stage")
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--rm-steps", type=int, default=400)
    parser.add_argument("--rl-steps", type=int, default=150)
    parser.add_argument("--pair-source", default="policy", choices=["policy", "edits"])
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides of the RL stage")
    parser.add_argument("--work", default="runs/rlhf_pipeline")
    parser.add_argument("--out", default="benchmarks/results/rlhf_pipeline_cpu.json")
    args = parser.parse_args()
    work = Path(args.work)
    common = ["data.task=reverse", "rollout.max_new_tokens=10", "run.progress=false",
              "run.tensorboard=false", "run.overwrite=true", "train.threads=2"]
    rl = ["sft.steps=0", "rollout.temperature=1.0", "algo.prompts_per_step=16",
          "algo.group_size=8", "algo.loss_agg=token-mean", "optim.lr=1e-4",
          "optim.warmup_steps=5", "optim.max_grad_norm=1.0", f"train.steps={args.rl_steps}",
          "train.eval_every=25", "train.save_every=0", "data.num_eval=200", *args.set]
    runs = []
    for seed in args.seeds:
        base = work / f"seed{seed}"
        sft, rm = base / "sft", base / "rm"
        seconds = {"sft": plait("train", *common, f"train.seed={seed}",
                                f"sft.steps={args.sft_steps}", "train.steps=0",
                                f"run.dir={sft}")}
        seconds["rm"] = plait("rm", *common, f"train.seed={seed}",
                              f"model.path={sft / 'sft_model'}", f"rm.steps={args.rm_steps}",
                              f"pairs.source={args.pair_source}", f"run.dir={rm}")
        rm_summary = json.loads((rm / "summary.json").read_text())
        for kl in args.kl:
            out = base / f"rl_kl{kl:g}"
            reward = (f"reward.functions=[{{model: '{rm / 'reward_model'}'}}, "
                      "{fn: task, weight: 0}]")
            seconds[f"rl_kl{kl:g}"] = plait(
                "train", *common, *rl, f"train.seed={seed}", f"model.path={sft / 'sft_model'}",
                f"algo.kl_coef={kl}", reward, f"run.dir={out}")
            rows = metrics(out)
            evals = [m for m in rows if "eval/reward_fn/task" in m]
            runs.append({
                "seed": seed, "kl_coef": kl,
                "rm_accuracy_vs_truth": rm_summary["accuracy_vs_truth_after"],
                "true_score_before": evals[0]["eval/reward_fn/task"],
                "true_score_after": evals[-1]["eval/reward_fn/task"],
                "rm_score_before": evals[0]["eval/reward_fn/reward_model"],
                "rm_score_after": evals[-1]["eval/reward_fn/reward_model"],
                "eval_curve": [(m["step"], m["eval/reward_fn/reward_model"],
                                m["eval/reward_fn/task"]) for m in evals],
                "train_curve": [(m["step"], m["reward_fn/reward_model"], m["reward_fn/task"])
                                for m in rows if "reward_fn/task" in m],
                "seconds": dict(seconds),
            })
            print(json.dumps({k: v for k, v in runs[-1].items() if "curve" not in k}),
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(runs: list[dict], path: Path) -> None:
    """The reward model's score and the true score over RL steps, one panel per KL
    setting, one line per seed (the training batches' means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kls = sorted({r["kl_coef"] for r in runs})
    fig, axes = plt.subplots(1, len(kls), figsize=(5.5 * len(kls), 4), squeeze=False)
    for ax, kl in zip(axes[0], kls, strict=True):
        twin = ax.twinx()
        for r in (r for r in runs if r["kl_coef"] == kl):
            steps = [s for s, _, _ in r["train_curve"]]
            ax.plot(steps, [m for _, m, _ in r["train_curve"]], color="tab:orange", alpha=0.7,
                    label="reward model score" if r["seed"] == runs[0]["seed"] else None)
            twin.plot(steps, [t for _, _, t in r["train_curve"]], color="tab:blue", alpha=0.7,
                      label="true score" if r["seed"] == runs[0]["seed"] else None)
        ax.set_title(f"GRPO against the reward model, KL coef {kl:g}")
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward model score", color="tab:orange")
        twin.set_ylabel("hidden true score", color="tab:blue")
        twin.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
