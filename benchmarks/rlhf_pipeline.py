"""The RLHF pipeline on the built-in preference task, end to end: SFT, a reward model,
then GRPO against the reward model, per seed and per RL variant.

The ``reverse`` task keeps a hidden true score of every response, so the run shows what
RLHF is meant to show and what it risks: the reward model's held-out accuracy against the
truth, the policy's true score before and after RL against the learned reward (greedy
answers to held-out prompts, and the training samples' mean), and the reward model's
score beside the true score over the RL steps (over-optimisation: the learned score
rising while the true one falls). Each stage is the example a user runs::

    plait sft examples/rlhf_sft.yaml
    plait rm examples/rlhf_rm.yaml
    plait train examples/rlhf_grpo.yaml

with the seed and run directories set here, and each RL variant's overrides (``truth``
trains on the task's verifier instead: what the policy could gain with a perfect reward).
Writes ``--out`` (JSON) and a PNG of the score curves beside it.

    python benchmarks/rlhf_pipeline.py --seeds 0 1 2 --out benchmarks/results/rlhf_pipeline_cpu.json
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

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VARIANTS = {
    "rm": [],  # the example as it is: KL 0.1
    "rm-kl0": ["algo.kl_coef=0"],
    "rm-grpovi": ["algo.reward_adjust=grpovi", "reward.clip=5"],
    "truth": ["reward.functions=[{fn: task}]", "reward.missing_eos_penalty=null"],
    # no KL penalty and a 5x learning rate for twice the steps: over-optimisation
    "rm-kl0-fast": ["algo.kl_coef=0", "optim.lr=1e-4", "train.steps=200"],
}


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


def first_step_reaching(curve: list[tuple], level: float, window: int = 10) -> int | None:
    """The first step whose trailing ``window``-step mean of the sampled true score
    reaches ``level``."""
    values = [t for _, _, t in curve]
    for i in range(window - 1, len(values)):
        if statistics.mean(values[i - window + 1:i + 1]) >= level:
            return curve[i][0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rl-steps", type=int, default=100)
    parser.add_argument("--level", type=float, default=0.5,
                        help="sampled true score whose first reach is reported per run")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the SFT and reward models of an earlier run in --work")
    parser.add_argument("--work", default="runs/rlhf_pipeline")
    parser.add_argument("--out", default="benchmarks/results/rlhf_pipeline_cpu.json")
    args = parser.parse_args()
    work = Path(args.work)
    quiet = ["run.progress=false", "run.tensorboard=false", "run.overwrite=true"]
    runs = []
    for seed in args.seeds:
        base = work / f"seed{seed}"
        sft, rm = base / "sft", base / "rm"
        if args.reuse and (rm / "summary.json").is_file():
            seconds = {stage: json.loads((base / stage / "summary.json").read_text())[
                "wall_time_s"] for stage in ("sft", "rm")}  # in-process times
        else:
            seconds = {"sft": plait("sft", str(EXAMPLES / "rlhf_sft.yaml"), *quiet,
                                    f"train.seed={seed}", f"run.dir={sft}")}
            seconds["rm"] = plait("rm", str(EXAMPLES / "rlhf_rm.yaml"), *quiet,
                                  f"train.seed={seed}", f"model.path={sft / 'sft_model'}",
                                  f"run.dir={rm}")
        rm_summary = json.loads((rm / "summary.json").read_text())
        reward = (f"reward.functions=[{{model: '{rm / 'reward_model'}'}}, "
                  "{fn: task, weight: 0}]")
        for variant in args.variants:
            out = base / f"rl_{variant}"
            seconds[f"rl_{variant}"] = plait("train", str(EXAMPLES / "rlhf_grpo.yaml"), *quiet,
                                     f"train.seed={seed}", f"model.path={sft / 'sft_model'}",
                                     f"train.steps={args.rl_steps}", "train.save_every=0",
                                     reward, *VARIANTS[variant], f"run.dir={out}")
            rows = metrics(out)
            # the true score held out: logged per function beside the reward model, or as
            # the reward itself when the task's verifier is the only function
            evals = [{**m, "eval/reward_fn/task": m.get("eval/reward_fn/task",
                                                         m["eval/reward"])}
                     for m in rows if "eval/reward" in m]
            curve = [(m["step"], m.get("reward_fn/reward_model"), m["reward_fn/task"])
                     for m in rows if "reward_fn/task" in m]
            sampled = [t for _, _, t in curve]
            runs.append({
                "seed": seed, "variant": variant,
                "rm_accuracy_vs_truth": rm_summary["accuracy_vs_truth_after"],
                "true_score_before": evals[0]["eval/reward_fn/task"],
                "true_score_after": evals[-1]["eval/reward_fn/task"],
                "sampled_true_score_first5": statistics.mean(sampled[:5]),
                "sampled_true_score_last10": statistics.mean(sampled[-10:]),
                "rm_score_before": evals[0].get("eval/reward_fn/reward_model"),
                "rm_score_after": evals[-1].get("eval/reward_fn/reward_model"),
                "step_reaching_level": first_step_reaching(curve, args.level),
                "eval_curve": [(m["step"], m.get("eval/reward_fn/reward_model"),
                                m["eval/reward_fn/task"]) for m in evals],
                "train_curve": curve,
                "seconds": dict(seconds),
                "pipeline_seconds": seconds["sft"] + seconds["rm"] + seconds[f"rl_{variant}"],
            })
            print(json.dumps({k: v for k, v in runs[-1].items() if "curve" not in k}),
                  flush=True)
    summary = {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            key: [statistics.mean(r[key] for r in mine), min(r[key] for r in mine),
                  max(r[key] for r in mine)]
            for key in ("true_score_before", "true_score_after", "sampled_true_score_first5",
                        "sampled_true_score_last10", "pipeline_seconds")}
        summary[variant]["step_reaching_level"] = [r["step_reaching_level"] for r in mine]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs},
                              indent=1))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(runs: list[dict], path: Path) -> None:
    """Held-out scores over RL steps, one panel per variant, one line per seed: the
    greedy answers' hidden true score, and the reward model's score of them as a change
    from its start (each seed's reward model has its own scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.6 * len(variants), 3.8),
                             squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        twin = ax.twinx()
        for index, r in enumerate(r for r in runs if r["variant"] == variant):
            steps = [s for s, _, _ in r["eval_curve"]]
            if r["eval_curve"][0][1] is not None:
                start = r["eval_curve"][0][1]
                ax.plot(steps, [m - start for _, m, _ in r["eval_curve"]], color="tab:orange",
                        alpha=0.8, label="reward model score (change)" if index == 0 else None)
            twin.plot(steps, [t for _, _, t in r["eval_curve"]], color="tab:blue", alpha=0.8,
                      label="hidden true score" if index == 0 else None)
        ax.set_title(f"GRPO, {variant}")
        ax.set_xlabel("RL step")
        ax.set_ylabel("reward model score - at step 0", color="tab:orange")
        twin.set_ylabel("hidden true score (greedy, held out)", color="tab:blue")
        twin.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
