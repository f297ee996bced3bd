#!/usr/bin/env python
"""RL step vs TRL: seconds per GRPO step and held-out accuracy,
plait vs TRL's ``GRPOTrainer``, on the tiny default model and task.

Both trainers start from the same saved Hugging Face directory (plait's tiny model after
plait's SFT warm start, built once and cached), train for ``--steps`` steps of
8 prompts x 8 samples on 2-digit addition, and are then evaluated by the same code
(``plait.recipes.evaluate.evaluate_job``: greedy, 500 held-out "test" prompts, with the
reference ``hf`` rollout engine so the metric does not depend on the engine under test).
plait trains with its default config apart from the settings below (so with its default
rollout engine, recorded as ``rollout_engine`` in the JSON); ``--plait-override KEY=VALUE``
changes that for experiments.

Run it with the benchmark virtualenv, which holds both plait and TRL
(see ``benchmarks/README.md``)::

    /work/venv-trl/bin/python benchmarks/rl_step_vs_trl.py --steps 100 --threads 2 \\
        --out runs/bench_rl_step_vs_trl/results.json

Each trainer runs in its own subprocess (``--worker``), one after the other, with the same
torch thread count, in ``--rounds`` rounds (plait, each ``--plait-variant``, TRL); a ratio
is the median over rounds of the two sides' median seconds per step within one round, so
a machine whose speed drifts over minutes moves both sides of each ratio alike. The
first round's models are evaluated. Seconds per step is the wall time between consecutive step ends inside
the training loop (the first step is measured from the start of the loop), so model
loading, data preparation, evaluation and the final save are excluded, and everything the
loop does per step (sampling, rewards, update, per-step bookkeeping) is included.

Setting mapping (plait key -> TRL ``GRPOConfig`` field):

=========================================  ===============================================
plait                                      TRL
=========================================  ===============================================
model.path = shared start dir              model instance loaded from the same dir
model.chat_template = never                plain-string prompts (TRL applies no template)
algo.prompts_per_step 8 x group_size 8     per_device_train_batch_size 64,
                                           gradient_accumulation_steps 1,
                                           generation_batch_size 64, num_generations 8
algo.micro_batch_size 64                   (the 64 rows are one forward/backward in both)
algo.epochs 1, mini_batches 1              num_iterations 1 (one update per batch)
advantage grpo: (r - mean_g)/(std_g+1e-6)  scale_rewards "group": (r - mean_g)/(std_g+1e-4)
algo.loss_agg token-mean                   loss_type "dapo" (sum over tokens / number of
                                           completion tokens in the whole 64-row batch)
algo.clip_low/high 0.2                     epsilon 0.2 (ratio is 1 on-policy in both)
algo.kl_coef 0 (no reference model)        beta 0.0 (no reference model)
rollout temperature 1.0, top_p 1, top_k 0  temperature 1.0, top_p 1.0, top_k 0, min_p None,
                                           repetition_penalty 1.0
rollout.max_new_tokens 5                   max_completion_length 5
reward: the task's verify (in-process)     reward_funcs=[exact_match] calling task.verify
optim AdamW (foreach kernel, the CPU       optim "adamw_torch_fused" (TRL's default), same
default), lr 1e-4, betas (.9,.999),        lr, betas, eps, weight_decay 0
eps 1e-8, weight_decay 0
optim.max_grad_norm 1.0                    max_grad_norm 1.0
optim warmup 5 then constant:              the same LambdaLR (plait's lr_multiplier); see
lr x (step+1)/5 for steps 0-4, then 1      "Not matched exactly" below
model.dtype float32                        bf16 False, fp16 False, use_cpu True
dropout off (policy.eval())                disable_dropout True (the tiny model has none)
no gradient checkpointing                  (activation|gradient)_checkpointing False
                                           (TRL's default is on)
train.threads N                            torch.set_num_threads(N) in the worker
train.seed = --seed (default 0)            seed = --seed; train rows from the same
                                           task.make_rows(50000, seed, "train")
=========================================  ===============================================

Not matched exactly (documented, not fixable without changing either library):

* Schedule: TRL's built-in ``constant_with_warmup`` gives lr 0 on the first optimizer step
  (lr x step/5), plait gives lr x (step+1)/5. The TRL side therefore overrides
  ``Trainer.create_scheduler`` (a small subclass) with plait's multiplier, so both see the
  same five warmup learning rates; the optimizer itself is still created by TRL.
* Optimizer implementation: each library's default ``torch.optim.AdamW`` kernel, the same
  update up to rounding: TRL's ``adamw_torch_fused`` (transformers' default with torch
  >= 2.8), plait's ``optim.implementation=auto``, which is ``foreach`` on the CPU (bit
  for bit the per-parameter loop's results; the fused CPU kernel rounds differently).
  On this model one step takes ~0.7 ms fused, ~2.8 ms foreach, ~3.2 ms looped, so the
  choice favours TRL by ~2 ms a step.
* Advantage epsilon: 1e-4 in TRL, 1e-6 in plait (both use the unbiased group std).
* Prompt order: both draw from the same 50,000 train rows, but each shuffles with its own
  sampler (TRL's ``RepeatSampler`` vs plait's ``PromptIterator``), so the 800 prompts seen
  differ; sampling RNG streams differ too. Accuracy after 100 steps is one seed's outcome.
* Logging: TRL runs with report_to "none", save_strategy "no", no progress bar and
  logging_steps larger than the run (its per-step metric bookkeeping still runs); plait
  keeps its defaults (metrics.jsonl and TensorBoard every step), with its progress shown as
  status lines (``run.progress=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

# One source for the settings both trainers share.
TASK = {"name": "addition", "digits": 2}
SEED = 0  # shared start (SFT) and held-out rows; --seed sets the RL runs' seed
NUM_TRAIN = 50_000
NUM_EVAL = 500
PROMPTS_PER_STEP = 8
GROUP_SIZE = 8
MAX_NEW_TOKENS = 5
TEMPERATURE = 1.0
LR = 1e-4
WARMUP_STEPS = 5
MAX_GRAD_NORM = 1.0
CLIP = 0.2
SFT = {"steps": 400, "batch_size": 64, "lr": 2e-3}  # the default job's warm start

START_MARKER = "benchmark_start.json"


# --------------------------------------------------------------------------- helpers


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def summarize(step_seconds: list[float]) -> dict:
    if not step_seconds:
        return {"sec_per_step_mean": None, "sec_per_step_median": None}
    rest = step_seconds[1:]
    return {
        "sec_per_step_mean": statistics.fmean(step_seconds),
        "sec_per_step_median": statistics.median(step_seconds),
        "sec_per_step_mean_excl_first": statistics.fmean(rest) if rest else None,
        "loop_seconds": sum(step_seconds),
    }


def step_durations(loop_start: float, step_ends: list[float]) -> list[float]:
    """Seconds of each step: from the previous step's end (or the loop start) to its end."""
    marks = [loop_start, *step_ends]
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def plait_config(path: Path, tree: dict, overrides: list[str] | tuple[str, ...] = ()):
    """Write ``tree`` as a plait YAML config at ``path`` and load it (validated), with
    ``key=value`` overrides on top."""
    import yaml

    from plait.config import load_config

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_config(path, list(overrides))


def common_tree(threads: int, seed: int = SEED) -> dict:
    return {
        "data": {"task": TASK["name"], "task_args": {"digits": TASK["digits"]},
                 "num_train": NUM_TRAIN, "num_eval": NUM_EVAL},
        "rollout": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
                    "top_p": 1.0, "top_k": 0},
        "train": {"seed": seed, "threads": threads, "device": "cpu"},
    }


def merge(base: dict, extra: dict) -> dict:
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


# --------------------------------------------------------------------------- shared start


def prepare_start_model(workdir: Path, threads: int) -> Path:
    """plait's tiny model after plait's SFT warm start, saved once as an HF directory."""
    start = workdir / "start_model"
    wanted = {"task": TASK, "seed": SEED, "sft": SFT, "num_train": NUM_TRAIN}
    marker = start / START_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        print(f"[bench] reusing the shared start model {start}", flush=True)
        return start
    from plait.recipes.rl import train

    print(f"[bench] building the shared start: tiny model + {SFT['steps']}-step SFT warm start",
          flush=True)
    run_dir = workdir / "sft_run"
    config = plait_config(workdir / "configs" / "sft.yaml", merge(common_tree(threads), {
        "run": {"dir": str(run_dir), "overwrite": True, "resume": "never",
                "tensorboard": False, "progress": False},
        "model": {"path": "tiny", "chat_template": "never"},
        "sft": SFT,
        "train": {"steps": 0},
    }))
    train(config)
    shutil.rmtree(start, ignore_errors=True)
    shutil.copytree(run_dir / "sft_model", start)
    marker.write_text(json.dumps(wanted))
    return start


def evaluate(model_dir: Path, workdir: Path, threads: int, name: str) -> dict:
    """Greedy accuracy on the 500 held-out prompts, by plait's evaluation code."""
    from plait.recipes.evaluate import evaluate_job

    config = plait_config(workdir / "configs" / f"eval_{name}.yaml", merge(common_tree(threads), {
        "run": {"dir": str(workdir / "eval" / name), "tensorboard": False, "progress": False},
        "model": {"path": str(model_dir), "chat_template": "never"},
        "data": {"num_train": PROMPTS_PER_STEP},  # train rows are unused here
        # the reference engine, so the metric does not depend on the engine under test
        "rollout": {"engine": "hf"},
    }))
    result = evaluate_job(config)
    return {"accuracy": result["eval/accuracy"], "reward": result["eval/reward"],
            "response_length": result["eval/response_length"],
            "num_prompts": result["num_prompts"], "model": str(model_dir)}


# --------------------------------------------------------------------------- plait worker


def worker_plait(steps: int, threads: int, workdir: Path, start: Path, seed: int,
                 overrides: list[str]) -> dict:
    set_threads(threads)
    from plait.recipes.rl import RLTrainer
    from plait.train.checkpoint import latest_checkpoint

    run_dir = workdir / "plait_run"
    config = plait_config(workdir / "configs" / "plait_rl.yaml", merge(common_tree(threads, seed), {
        "run": {"dir": str(run_dir), "overwrite": True, "resume": "never", "progress": False},
        "model": {"path": str(start), "chat_template": "never"},
        "sft": {"steps": 0},
        "algo": {"name": "grpo", "prompts_per_step": PROMPTS_PER_STEP, "group_size": GROUP_SIZE,
                 "advantage": "grpo", "loss_agg": "token-mean", "epochs": 1, "mini_batches": 1,
                 "micro_batch_size": PROMPTS_PER_STEP * GROUP_SIZE, "clip_low": CLIP,
                 "clip_high": CLIP, "kl_coef": 0.0, "entropy_coef": 0.0},
        "optim": {"lr": LR, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                  "warmup_steps": WARMUP_STEPS, "schedule": "constant",
                  "max_grad_norm": MAX_GRAD_NORM},
        "train": {"steps": steps, "eval_every": 0, "save_every": 0},
    }), overrides)

    class TimedRLTrainer(RLTrainer):
        loop_start: float | None = None

        def step(self, step: int) -> dict[str, float]:
            if self.loop_start is None:
                self.loop_start = time.perf_counter()
            lrs.append(self.optimizers["policy"].param_groups[0]["lr"])
            return super().step(step)

    ends, rewards, own_step_times, lrs, thread_counts = [], [], [], [], set()

    def on_step(trainer, global_step: int, metrics: dict) -> None:
        import torch

        ends.append(time.perf_counter())
        rewards.append(metrics.get("reward/mean"))
        own_step_times.append(metrics.get("time/step"))
        thread_counts.add(torch.get_num_threads())

    with TimedRLTrainer(config, callbacks=[on_step]) as trainer:
        summary = trainer.run()
        loop_start = trainer.loop_start
    final = latest_checkpoint(run_dir / "checkpoints") / "policy"
    return {"step_seconds": step_durations(loop_start, ends) if ends else [],
            "own_step_time": own_step_times, "train_reward": rewards, "lr_used": lrs,
            "threads_seen": sorted(thread_counts), "final_model": str(final),
            "rollout_engine": getattr(config.rollout, "engine", None),
            "overrides": overrides, "plait_summary": summary}


# --------------------------------------------------------------------------- TRL worker


def trl_config(steps: int, output_dir: Path, seed: int):
    from trl import GRPOConfig

    batch = PROMPTS_PER_STEP * GROUP_SIZE
    # TRL turns gradient checkpointing on by default; transformers 5 renamed the field
    no_checkpointing = {"gradient_checkpointing": False}
    if "activation_checkpointing" in GRPOConfig.__dataclass_fields__:
        no_checkpointing["activation_checkpointing"] = False
    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        seed=seed,
        use_cpu=True, bf16=False, fp16=False,
        # one optimizer step = one generation batch = 8 prompts x 8 completions
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        generation_batch_size=batch, num_generations=GROUP_SIZE, num_iterations=1,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        # GRPO objective: group-std advantages, token-mean aggregation, no KL
        scale_rewards="group", loss_type="dapo", beta=0.0, epsilon=CLIP,
        mask_truncated_completions=False,
        learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP_STEPS,  # see subclass
        **no_checkpointing, disable_dropout=True,
        report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10 * steps + 1000, disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )


def worker_trl(steps: int, threads: int, workdir: Path, start: Path, seed: int,
               attention: str = "auto") -> dict:
    set_threads(threads)
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from plait.data.tasks import make_task
    from plait.models.loading import load_causal_lm, load_tokenizer, quiet_transformers
    from plait.train.optim import lr_multiplier

    task = make_task(TASK["name"], digits=TASK["digits"])
    dataset = Dataset.from_list(task.make_rows(NUM_TRAIN, seed=seed, split="train"))

    def exact_match(prompts, completions, answer, **kwargs):
        return [task.verify(completion, ans) for completion, ans in zip(completions, answer, strict=True)]

    class PlaitWarmupGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with plait's warmup: lr x (step+1)/warmup, then constant (HF's
        constant_with_warmup would give lr 0 on the first step)."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer,
                    lambda step: lr_multiplier(step, warmup_steps=WARMUP_STEPS,
                                               total_steps=num_training_steps,
                                               schedule="constant"))
            return self.lr_scheduler

    class StepClock(TrainerCallback):
        """Step end times, plus per-step values read back for the report (not timed)."""

        def __init__(self):
            self.loop_start, self.ends, self.threads = None, [], set()
            self.lrs, self.rewards, self.own_step_time = [], [], []
            self.trainer = None
            self.checkpointing = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.loop_start is None:
                self.loop_start = time.perf_counter()
                model = kwargs.get("model")
                name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") \
                    else "is_gradient_checkpointing"
                self.checkpointing = bool(getattr(model, name, False))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.lrs.append(kwargs["optimizer"].param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.threads.add(torch.get_num_threads())
            metrics = self.trainer._metrics["train"]  # flushed only at logging steps
            self.rewards.append(metrics["reward"][-1] if metrics.get("reward") else None)
            self.own_step_time.append(
                metrics["step_time"][-1] if metrics.get("step_time") else None)

    quiet_transformers()
    clock = StepClock()
    output_dir = workdir / "trl_run"
    shutil.rmtree(output_dir, ignore_errors=True)
    trainer = PlaitWarmupGRPOTrainer(
        model=load_causal_lm(start, attention), reward_funcs=[exact_match],
        args=trl_config(steps, output_dir, seed), train_dataset=dataset,
        processing_class=load_tokenizer(start), callbacks=[clock])
    clock.trainer = trainer
    trainer.train()
    final = output_dir / "final_model"
    trainer.model.save_pretrained(final, safe_serialization=True)
    trainer.processing_class.save_pretrained(final)
    return {"step_seconds": step_durations(clock.loop_start, clock.ends) if clock.ends else [],
            "own_step_time": clock.own_step_time, "train_reward": clock.rewards,
            "lr_used": clock.lrs, "gradient_checkpointing": clock.checkpointing,
            "threads_seen": sorted(clock.threads), "final_model": str(final),
            "trl_version": trl.__version__}


# --------------------------------------------------------------------------- orchestration


def run_worker(which: str, args, start: Path, name: str | None = None,
               extra: list[str] = ()) -> dict:
    """One trainer run in its own process; ``name``/``extra``: a plait variant's label
    and overrides (added to ``--plait-override``)."""
    out = args.workdir / f"worker_{name or which}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", which,
               "--steps", str(args.steps), "--threads", str(args.threads),
               "--seed", str(args.seed),
               "--workdir", str(args.workdir), "--start-model", str(start),
               "--worker-out", str(out), "--attention", args.attention]
    for override in [*args.plait_override, *extra]:
        command += ["--plait-override", override]
    print(f"[bench] {name or which}: {args.steps} steps, {args.threads} thread(s)", flush=True)
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("plait", "torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine(threads: int) -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "cpus_usable": affinity, "torch_threads": threads,
            "platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version()}


def side_result(raw: dict, accuracy: dict) -> dict:
    """One trainer's numbers. ``own_step_time_mean`` is the trainer's own per-step timer
    (plait ``time/step``, TRL ``step_time``), which covers less of the loop than ours."""
    rewards = [r for r in raw.get("train_reward", []) if r is not None]
    own = [t for t in raw.get("own_step_time", []) if t is not None]
    result = {**summarize(raw["step_seconds"]), "accuracy_after": accuracy["accuracy"],
              "eval_after": accuracy,
              "train_reward_mean": statistics.fmean(rewards) if rewards else None,
              "own_step_time_mean": statistics.fmean(own) if own else None,
              "threads_seen": raw["threads_seen"], "lr_used": raw.get("lr_used"),
              "step_seconds": raw["step_seconds"]}
    for key in ("gradient_checkpointing", "rollout_engine", "overrides"):
        if key in raw:
            result[key] = raw[key]
    return result


def print_table(results: dict) -> None:
    rows = [("", "s/step mean (round 1)", "s/step median (round 1)", "acc before",
             "acc after", "ratio")]
    ratios = results.get("ratios_over_trl", {})
    for side in ("plait", *results.get("variants", {}), "trl"):
        if side in results:
            r = results[side]
            ratio = ratios.get(side)
            rows.append((side, f"{r['sec_per_step_mean']:.3f}", f"{r['sec_per_step_median']:.3f}",
                         f"{results['accuracy_before']:.1%}", f"{r['accuracy_after']:.1%}",
                         f"{ratio['median']:.3f}x" if ratio else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nRL step vs TRL: {results['steps']} steps of {PROMPTS_PER_STEP} prompts x "
          f"{GROUP_SIZE} samples, {results['machine']['torch_threads']} torch thread(s), "
          f"{results['machine']['cpu_count']} CPUs, {len(results['rounds'])} round(s)")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    if len(results["rounds"]) > 1:
        for side, ratio in ratios.items():
            print(f"{side}/trl per round (median s/step): "
                  + ", ".join(f"{r:.3f}x" for r in ratio["rounds"]))
    if ratios:
        print("ratio = median over rounds of (side / trl) median s/step in the same round")


# names a variant may not take: the other sides and the result file's own keys
RESERVED_NAMES = {"plait", "trl", "benchmark", "steps", "seed", "attention", "machine",
                  "versions", "start_model", "accuracy_before", "eval_before", "variants",
                  "rounds", "ratios_over_trl", "ratio_plait_over_trl",
                  "accuracy_after_plait_minus_trl"}


def parse_variants(texts: list[str]) -> dict[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` arguments as ``{NAME: [KEY=VALUE, ...]}``."""
    variants = {}
    for text in texts:
        name, _, overrides = text.partition(":")
        settings = [o.strip() for o in overrides.split(",") if o.strip()]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or not settings or \
                any("=" not in o for o in settings):
            raise SystemExit(f"--plait-variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]"
                             " (NAME: letters, digits, _ or -)")
        if name in RESERVED_NAMES or name in variants:
            raise SystemExit(f"--plait-variant {text!r}: the name {name!r} is taken")
        variants[name] = settings
    return variants


def orchestrate(args) -> dict:
    """``--rounds`` rounds of: plait, each plait variant, TRL, one after the other; the
    first round's models are evaluated. Each round's ratios compare runs a minute apart,
    so a machine whose speed drifts (a shared VM) moves both sides of a ratio alike."""
    variants = parse_variants(args.plait_variant)
    if variants and args.which == "trl":
        raise SystemExit("--plait-variant needs the plait side: --which both or plait")
    args.workdir.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    start = Path(args.start_model) if args.start_model else \
        prepare_start_model(args.workdir, args.threads)
    before = evaluate(start, args.workdir, args.threads, "before")
    results = {"benchmark": "rl_step_vs_trl", "steps": args.steps, "seed": args.seed,
               "attention": args.attention,
               "machine": machine(args.threads), "versions": versions(),
               "start_model": str(start), "accuracy_before": before["accuracy"],
               "eval_before": before, "variants": variants, "rounds": []}
    sides = ["plait", "trl"] if args.which == "both" else [args.which]
    if "plait" in sides:
        sides[1:1] = list(variants)
    for round_index in range(args.rounds):
        medians, means = {}, {}
        for side in sides:
            which = "trl" if side == "trl" else "plait"
            raw = run_worker(which, args, start, side, variants.get(side, []))
            summary = summarize(raw["step_seconds"])
            medians[side], means[side] = (summary["sec_per_step_median"],
                                          summary["sec_per_step_mean"])
            if round_index == 0:
                after = evaluate(Path(raw["final_model"]), args.workdir, args.threads,
                                 f"after_{side}")
                results[side] = side_result(raw, after)
        results["rounds"].append({"sec_per_step_median": medians, "sec_per_step_mean": means})
    if "trl" in results and len(sides) > 1:
        ratios = {}
        for side in sides[:-1]:
            per_round = [r["sec_per_step_median"][side] / r["sec_per_step_median"]["trl"]
                         for r in results["rounds"]]
            per_round_mean = [r["sec_per_step_mean"][side] / r["sec_per_step_mean"]["trl"]
                              for r in results["rounds"]]
            # median: over rounds, of the in-round ratio of median s/step; mean: the same
            # with each side's mean s/step
            ratios[side] = {"median": statistics.median(per_round),
                            "mean": statistics.median(per_round_mean), "rounds": per_round}
            results[side]["accuracy_after_minus_trl"] = \
                results[side]["accuracy_after"] - results["trl"]["accuracy_after"]
        results["ratios_over_trl"] = ratios
        if "plait" in ratios:
            results["ratio_plait_over_trl"] = ratios["plait"]
            results["accuracy_after_plait_minus_trl"] = \
                results["plait"]["accuracy_after_minus_trl"]
    return results


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="RL steps per trainer")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (both sides)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--which", choices=("both", "plait", "trl"), default="both")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of both RL runs (train rows, prompt order, sampling); the "
                             "shared start and the 500 held-out prompts do not change")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_rl_step_vs_trl"),
                        help="scratch directory (shared start model is cached here)")
    parser.add_argument("--start-model", default=None,
                        help="use this HF directory as the shared start instead of building it")
    parser.add_argument("--plait-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra plait config override for the plait RL run, e.g. "
                             "rollout.engine=hf (repeatable; changes the comparison, so the "
                             "overrides are recorded in the JSON)")
    parser.add_argument("--plait-variant", action="append", default=[],
                        metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
                        help="also run plait with these overrides as side NAME, in every "
                             "round (e.g. compiled:rollout.compile=true)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds of all sides, one after the other; ratios are the "
                             "median over rounds of the in-round ratio")
    parser.add_argument("--attention", choices=("auto", "sdpa", "eager"), default="auto",
                        help="attention kernels of the model on both sides (plait's "
                             "model.attn_implementation, the model TRL is given)")
    parser.add_argument("--worker", choices=("plait", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args.worker:
        common = (args.steps, args.threads, args.workdir, Path(args.start_model), args.seed)
        overrides = [*args.plait_override, f"model.attn_implementation={args.attention}"]
        result = worker_plait(*common, overrides) if args.worker == "plait" \
            else worker_trl(*common, args.attention)
        args.worker_out.write_text(json.dumps(result, indent=2, default=str))
        return 0
    results = orchestrate(args)
    print_table(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"[bench] results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
