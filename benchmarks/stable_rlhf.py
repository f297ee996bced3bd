#!/usr/bin/env python
"""The advantage model and selective rehearsal against plain RLHF, on the built-in
``mixed`` preference task (by default three sub-tasks, reverse / sort / add, whose pairs
carry label noise 0 / 0.1 / 0.25; ``--sources`` and ``--noise`` choose others, e.g.
``--sources reverse copy --noise copy=0.25``), per seed:

1. ``plait sft`` on the mixed task;
2. ``plait rm`` twice on pairs of the SFT policy's own samples (several per prompt):
   a reward model (``rm.objective=reward``) and an advantage model
   (``rm.objective=advantage``; also at ``rm.center_coef=0.1`` as ``am01``); their
   held-out score distribution per sub-task;
3. PPO against each (by default no KL penalty, so over-optimisation can show), against the
   advantage model with selective rehearsal (``rehearsal.coef``) or PTX
   (``algo.ptx_coef``, on the task's training answers); REINFORCE++ (``-rpp``: no
   critic, no per-prompt baseline) against either: the held-out greedy answers' hidden
   true score and exact accuracy per sub-task over the steps (the earlier skill is what
   the SFT model could do), the learned score beside it, and seconds per step.

PPO runs go two at a time, one thread each, pairs chosen so that a run and its
rehearsal twin share the machine (their step times compare). Writes ``--out`` (JSON)
and a PNG beside it.

    python benchmarks/stable_rlhf.py --seeds 0 1 2 --out benchmarks/results/stable_rlhf_cpu.json
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

SOURCES = ["reverse", "sort", "add"]  # the sub-tasks of the run (--sources)
MODELS = {"rm": ["rm.objective=reward"], "am": ["rm.objective=advantage"],
          "am01": ["rm.objective=advantage", "rm.center_coef=0.1"]}
REHEARSE = ["rehearsal.coef=0.5", "rehearsal.size=64", "rehearsal.clusters=6",
            "rehearsal.pool_steps=4"]
PTX = ["algo.ptx_coef=0.5", "algo.ptx_batch_size=16"]
# REINFORCE++: no critic and no per-prompt baseline, rewards whitened over the batch, so a
# sub-task's score level reaches its advantages
RPP = ["algo.name=grpo", "algo.advantage=reinforce++"]
# variant -> (the learned model it trains against, extra settings); run two at a time
VARIANTS = {"rm": ("rm", []), "rm-sr": ("rm", REHEARSE), "am": ("am", []),
            "am-sr": ("am", REHEARSE), "am-ptx": ("am", PTX), "am01": ("am01", []),
            "rm-rpp": ("rm", RPP), "am-rpp": ("am", RPP)}
PAIRS = (("rm", "rm-sr"), ("am", "am-sr"), ("am-ptx", "am01"), ("rm-rpp", "am-rpp"))


def plait(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "plait.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PLAIT_PROGRESS": "0"})


def wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(proc.args)}\n{err[-3000:]}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def score_distribution(run_dir: Path) -> dict:
    """The learned model's held-out scores at the end: per sub-task mean and std, and
    both in units of its overall std (so models of different scales compare)."""
    final = [r for r in metrics(run_dir) if "eval/score_mean" in r][-1]
    std = final["eval/score_std"]
    out = {"accuracy_vs_truth": final["eval/accuracy_vs_truth"], "score_std": std}
    for source in SOURCES:
        out[f"mean/{source}"] = final[f"eval/score_mean/{source}"]
        out[f"std/{source}"] = final[f"eval/score_std/{source}"]
        out[f"accuracy_vs_truth/{source}"] = final[f"eval/accuracy_vs_truth/{source}"]
    means = [out[f"mean/{s}"] for s in SOURCES]
    out["means_range_in_std"] = (max(means) - min(means)) / std
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--rm-steps", type=int, default=1500)
    parser.add_argument("--pairs", type=int, default=16000)
    parser.add_argument("--samples", type=int, default=6,
                        help="policy samples a prompt the pairs come from")
    parser.add_argument("--pairs-per-prompt", type=int, default=3)
    parser.add_argument("--rl-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl", type=float, default=0.0, help="algo.kl_coef of the RL runs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES),
                        help="the mixed task's sub-tasks (data.task_args.sources)")
    parser.add_argument("--noise", nargs="*", default=[], metavar="SOURCE=SHARE",
                        help="label-flip share of a sub-task (data.task_args.noise)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the SFT and learned models of an earlier run in --work")
    parser.add_argument("--work", type=Path, default=Path("runs/stable_rlhf"))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/stable_rlhf_cpu.json"))
    args = parser.parse_args()
    SOURCES[:] = args.sources
    noise = ", ".join(f"{source}: {float(share)}" for source, share in
                      (item.split("=") for item in args.noise))
    task_args = f"data.task_args={{sources: [{', '.join(SOURCES)}], noise: {{{noise}}}}}"
    common = ["data.task=mixed", task_args, "rollout.max_new_tokens=10", "run.progress=false",
              "run.tensorboard=false", "run.overwrite=true"]
    runs, models = [], []
    # the learned models the chosen variants train against
    needed = [name for name in MODELS if any(VARIANTS[v][0] == name for v in args.variants)]
    for seed in args.seeds:
        base = args.work / f"seed{seed}"
        sft = base / "sft"
        seeded = [*common, f"train.seed={seed}"]
        started = time.perf_counter()
        if not (args.reuse and all((base / n / "summary.json").is_file() for n in needed)):
            wait(plait("sft", *seeded, f"sft.steps={args.sft_steps}", "sft.batch_size=64",
                       "sft.lr=1e-3", "sft.packing=true", "sft.max_length=64",
                       "sft.eval_every=0", "train.threads=2", f"run.dir={sft}"))
            learned = [*seeded, f"model.path={sft / 'sft_model'}", "pairs.source=policy",
                       f"pairs.samples_per_prompt={args.samples}",
                       f"pairs.pairs_per_prompt={args.pairs_per_prompt}",
                       f"pairs.num_pairs={args.pairs}", "pairs.num_eval_pairs=600",
                       f"rm.steps={args.rm_steps}", "rm.batch_size=32", "rm.lr=3e-4",
                       "rm.eval_every=0", "train.threads=1"]
            names = needed
            for i in range(0, len(names), 2):
                wait(*(plait("rm", *learned, *MODELS[n], f"run.dir={base / n}")
                       for n in names[i:i + 2]))
        for name in needed:
            models.append({"seed": seed, "model": name,
                           **score_distribution(base / name)})
            print(json.dumps(models[-1]), flush=True)
        prepared = time.perf_counter() - started
        for pair in PAIRS:
            pair = [v for v in pair if v in args.variants]
            procs = []
            for variant in pair:
                model, extra = VARIANTS[variant]
                reward = (f"reward.functions=[{{model: '{base / model / 'reward_model'}'}}, "
                          "{fn: task, weight: 0}, {fn: exact_match, weight: 0}]")
                procs.append(plait(
                    "train", *seeded, f"model.path={sft / 'sft_model'}", "sft.steps=0", reward,
                    "reward.missing_eos_penalty=1.0", "rollout.temperature=1.0",
                    "algo.name=ppo", "algo.prompts_per_step=64", "algo.group_size=1",
                    f"algo.kl_coef={args.kl}", f"optim.lr={args.lr}", "optim.warmup_steps=5",
                    f"train.steps={args.rl_steps}", "train.eval_every=15", "train.save_every=0",
                    "data.num_eval=300", "train.threads=1", *extra,
                    f"run.dir={base / ('ppo_' + variant)}"))
            wait(*procs)
            for variant in pair:
                rows = metrics(base / f"ppo_{variant}")
                evals = [r for r in rows if "eval/reward" in r]
                steps = sorted(r["time/step"] for r in rows if "time/step" in r)
                run = {"seed": seed, "variant": variant, "model": VARIANTS[variant][0],
                       "median_s_per_step": steps[len(steps) // 2],
                       "curve": [{"step": r["step"],
                                  "learned": r["eval/reward_fn/reward_model"],
                                  "true": r["eval/reward_fn/task"],
                                  **{f"true/{s}": r[f"eval/reward_fn/task/{s}"]
                                     for s in SOURCES},
                                  **{f"exact/{s}": r[f"eval/reward_fn/exact_match/{s}"]
                                     for s in SOURCES}} for r in evals]}
                first, last = run["curve"][0], run["curve"][-1]
                run["true_before"], run["true_after"] = first["true"], last["true"]
                run["true_best"] = max(c["true"] for c in run["curve"])
                run["step_of_best"] = max(run["curve"], key=lambda c: c["true"])["step"]
                run["learned_change"] = last["learned"] - first["learned"]
                for s in SOURCES:
                    run[f"exact_before/{s}"] = first[f"exact/{s}"]
                    run[f"exact_after/{s}"] = last[f"exact/{s}"]
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
        print(f"seed {seed}: SFT and learned models {prepared:.0f} s, all "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    summary = {"models": {}, "variants": {}}
    for name in needed:
        mine = [m for m in models if m["model"] == name]
        summary["models"][name] = {
            key: [statistics.mean(m[key] for m in mine), min(m[key] for m in mine),
                  max(m[key] for m in mine)]
            for key in ("accuracy_vs_truth", "means_range_in_std", "score_std")}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        keys = ["true_before", "true_after", "true_best", "learned_change",
                "median_s_per_step", *(f"exact_{w}/{s}" for w in ("before", "after")
                                       for s in SOURCES)]
        summary["variants"][variant] = {
            key: [statistics.mean(r[key] for r in mine), min(r[key] for r in mine),
                  max(r[key] for r in mine)] for key in keys}
        summary["variants"][variant]["step_of_best"] = [r["step_of_best"] for r in mine]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "summary": summary, "models": models, "runs": runs},
                                   indent=1))
    plot(models, runs, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(models: list[dict], runs: list[dict], path: Path) -> None:
    """Three panels: the learned models' per-sub-task mean scores (in units of each
    model's overall std), the held-out true score over PPO steps per variant (mean of
    seeds), and each sub-task's exact accuracy before and after PPO per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    names = list(dict.fromkeys(m["model"] for m in models))
    width = 0.8 / len(SOURCES)
    for i, source in enumerate(SOURCES):
        values = [[m[f"mean/{source}"] / m["score_std"] for m in models if m["model"] == n]
                  for n in names]
        ax.bar([x + i * width for x in range(len(names))], [statistics.mean(v) for v in values],
               width, yerr=[statistics.pstdev(v) for v in values], label=source, capsize=3)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks([x + width for x in range(len(names))], names)
    ax.set_ylabel("held-out mean score / overall std")
    ax.set_title("score level per sub-task (mean of seeds)")
    ax.legend(fontsize=8)
    ax = axes[1]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        steps = [c["step"] for c in mine[0]["curve"]]
        ax.plot(steps, [statistics.mean(r["curve"][i]["true"] for r in mine)
                        for i in range(len(steps))], label=variant,
                linestyle="--" if "sr" in variant or "ptx" in variant else "-")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out true score (greedy)")
    ax.set_title("true score against each learned reward")
    ax.legend(fontsize=8)
    ax = axes[2]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        mine = [r for r in runs if r["variant"] == variant]
        change = [statistics.mean(r[f"exact_after/{s}"] - r[f"exact_before/{s}"] for r in mine)
                  for s in SOURCES]
        ax.bar([x + i * width for x in range(len(SOURCES))], change, width, label=variant)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(SOURCES))], SOURCES)
    ax.set_ylabel("exact accuracy after - before")
    ax.set_title("what the SFT model could do, after PPO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
