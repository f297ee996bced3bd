"""Eval throughput: pass@k from n sampled completions per prompt through plait's engine
vs the same eval set through Hugging Face ``generate``, side by side in one run.

Both sides run the very same ``eval.suites`` set (prompts, sampling, the task's
verifier, pass@k and maj@k code); only ``rollout.engine`` differs (``plait``: KV-cache
slots with continuous batching; ``hf``: ``model.generate`` on batches of
``rollout.batch_size`` sequences). The model is the default job's: the tiny model after
its SFT warm start on 2-digit addition (``examples/grpo_addition.yaml``), cached in
``--work``. Each side keeps one session; an untimed first pass warms it (with
``--compile`` it compiles plait's decode step, timed apart), then rounds alternate
which side runs first; the ratio is of median seconds.

    python benchmarks/eval_passk.py --prompts 500 --samples 16 --rounds 5 --compile \
        --compile-prefill --out benchmarks/results/eval_passk_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sft_model(work: Path, steps: int) -> Path:
    """The default job's SFT warm start, saved once as a model directory."""
    from plait.config import load_config
    from plait.recipes.sft import train_sft

    out = work / f"addition_sft_{steps}"
    if not (out / "sft_model" / "config.json").is_file():
        config = load_config(str(ROOT / "examples" / "grpo_addition.yaml"),
                             [f"run.dir={out}", f"sft.steps={steps}", "run.overwrite=true",
                              "run.progress=false", "run.tensorboard=false"])
        train_sft(config)
    return out / "sft_model"


def session(overrides: list[str], model: Path, args):
    """A plait eval session of the pass@k set with extra ``overrides`` (the engine)."""
    from plait.config import load_config
    from plait.recipes.session import Session

    ks = sorted({1, 4, args.samples})
    suite = (f"eval.suites=[{{name: passk, task: addition, task_args: {{digits: 2}}, "
             f"num_prompts: {args.prompts}, samples: {args.samples}, k: {ks}, "
             "greedy: false}]")
    config = load_config(str(ROOT / "examples" / "grpo_addition.yaml"), [
        f"model.path={model}", f"run.dir={args.work}/eval_run", "run.progress=false",
        "run.tensorboard=false", f"rollout.batch_size={args.batch}",
        f"train.threads={args.threads}", suite, *overrides])
    return Session(config, prepare_run_dir=False)


def timed(sess) -> dict:
    start = time.perf_counter()
    result = sess.evaluate_suites()["passk"]
    return {"seconds": time.perf_counter() - start, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="rollout.batch_size, both sides")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/plait-bench-eval")
    parser.add_argument("--compile", action="store_true",
                        help="add plait's engine with rollout.compile=true (its first call, "
                             "which compiles, is reported apart)")
    parser.add_argument("--compile-prefill", action="store_true",
                        help="add plait's engine with rollout.compile=true and "
                             "rollout.compile_prefill=true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sft_model(Path(args.work), args.sft_steps)
    sides = {"plait": ["rollout.engine=plait"], "hf": ["rollout.engine=hf"]}
    if args.compile:
        sides["plait_compiled"] = ["rollout.engine=plait", "rollout.compile=true"]
    if args.compile_prefill:
        sides["plait_compiled_prefill"] = ["rollout.engine=plait", "rollout.compile=true",
                                           "rollout.compile_prefill=true"]
    sessions = {name: session(overrides, model, args) for name, overrides in sides.items()}
    # one untimed pass each: warm caches, and the compiled side's compilation (timed apart)
    first_call = {name: timed(sess)["seconds"] for name, sess in sessions.items()}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            runs[name].append(timed(sessions[name]))
            print(f"round {r + 1} {name:14s} {runs[name][-1]['seconds']:7.2f} s  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in runs[name][-1].items()
                              if k.startswith(("pass@", "maj@"))), flush=True)
    for sess in sessions.values():
        sess.close()
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    result = {"benchmark": "eval pass@k throughput", "prompts": args.prompts,
              "samples": args.samples, "batch": args.batch, "runs": runs,
              "median_seconds": median, "first_call_seconds": first_call,
              "speedup_over_hf": {name: median["hf"] / m for name, m in median.items()
                                  if name != "hf"},
              "in_round_speedups": {name: [h["seconds"] / r["seconds"]
                                           for h, r in zip(runs["hf"], rs, strict=True)]
                                    for name, rs in runs.items() if name != "hf"},
              "completions_per_s": {name: args.prompts * args.samples / s
                                    for name, s in median.items()}}
    save(result, args.out)
    for name, speedup in result["speedup_over_hf"].items():
        print(f"{name} {median[name]:.2f} s vs HF generate {median['hf']:.2f} s: "
              f"{speedup:.2f}x faster (first call {first_call[name]:.1f} s)")


if __name__ == "__main__":
    main()
