#!/usr/bin/env python
"""Preference training vs TRL: seconds per step and held-out result of ``plait rm`` vs
``trl.RewardTrainer`` and ``plait dpo`` vs ``trl.DPOTrainer``, same model, pairs and
settings, one run.

Both sides start from the same saved Hugging Face directories (plait's tiny model after
``plait sft`` on the built-in ``reverse`` task; for reward models, that model with one
seeded scalar head, saved once) and train on the same pairs of the task (edits of the
answer ranked by the hidden true score), given to TRL as the token ids plait trains on
(reward model) or as strings that TRL tokenizes into the same ids (DPO; checked). Each
trainer runs in its own subprocess with the same torch thread count; seconds per step
are the times between consecutive step ends inside the training loop (model loading,
data preparation, DPO's reference log-probs, evaluation and saving excluded). The saved
models of both sides are then evaluated by the same code: held-out pairwise accuracy
(reward model: score order; DPO: implicit-reward order, policy vs start log-probs) and,
for DPO, the greedy answers' hidden true score on held-out prompts.

``--plait-variant NAME:KEY=VALUE[,...]`` adds a plait side with those settings (e.g.
``compiled:train.compile=true``), ``--trl-compile`` a TRL side with ``torch_compile=True``.
Each worker compiles into an empty on-disk cache, so its first step's time (reported
apart, as is the whole run's) holds a cold compilation. ``--rounds N`` runs every side N
times a seed in alternating order and compares times within each round, so that the
host's drift between minutes cancels out.

Settings (plait key -> TRL field): batch_size 32 -> per_device_train_batch_size 32;
lr -> learning_rate; optim constant schedule, no warmup -> lr_scheduler_type constant,
warmup_steps 0; AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0, one fused kernel
(plait's default) -> the same (adamw_torch_fused, TRL's default); max_grad_norm 1.0 ->
1.0; dpo.beta 0.1 sigmoid -> beta 0.1, loss_type
sigmoid; reference log-probs once -> precompute_ref_log_probs True; float32, CPU,
no gradient checkpointing, no dropout.

    /work/venv-trl/bin/python benchmarks/preference_vs_trl.py --seeds 0 1 2 --steps 100 \\
        --rounds 3 \\
        --out benchmarks/results/preference_vs_trl_cpu.json \\
        --plait-variant compiled:train.compile=true --trl-compile
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

JOBS = ("rm", "dpo")
LR = {"rm": 1e-4, "dpo": 5e-5}
BATCH = 32


def _plait(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "PLAIT_PROGRESS": "0"}, cwd=cwd)
    if proc.returncode != 0:
        sys.exit(f"failed: plait {' '.join(args)}\n{proc.stderr[-3000:]}")


def prepare(work: Path, sft_steps: int, pairs: int, eval_pairs: int) -> dict:
    """The shared start: an SFT model, a reward-model start from it, train/eval pairs."""
    start = work / "start"
    done = start / "ready.json"
    if done.is_file():
        return json.loads(done.read_text())
    start.mkdir(parents=True, exist_ok=True)
    _plait("sft", "data.task=reverse", f"sft.steps={sft_steps}", "sft.eval_every=0",
           "run.tensorboard=false", "run.overwrite=true", f"run.dir={start / 'sft'}")
    from plait.data.tasks import make_task
    from plait.models.loading import load_tokenizer
    from plait.models.reward_model import load_reward_model

    policy = start / "sft" / "sft_model"
    tokenizer = load_tokenizer(policy, "policy")
    rm = load_reward_model(policy, pad_token_id=tokenizer.pad_token_id, seed=0)
    rm.save_pretrained(start / "rm_init")
    tokenizer.save_pretrained(start / "rm_init")
    task = make_task("reverse")
    for name, rows in (("train", task.make_pairs(pairs, seed=0)),
                       ("eval", task.make_pairs(eval_pairs, seed=0, split="test"))):
        (start / f"{name}.jsonl").write_text("".join(
            json.dumps({k: row[k] for k in ("prompt", "answer", "chosen", "rejected",
                                            "chosen_score", "rejected_score")}) + "\n"
            for row in rows))
    info = {"policy": str(policy), "rm_init": str(start / "rm_init"),
            "train": str(start / "train.jsonl"), "eval": str(start / "eval.jsonl")}
    done.write_text(json.dumps(info))
    return info


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------- workers


def worker_plait(job: str, info: dict, steps: int, seed: int, threads: int, out: Path,
                 settings: list[str] = ()) -> list[float]:
    from plait.config import load_config
    from plait.models.loading import save_model_dir

    module = __import__(f"plait.recipes.{'reward_model' if job == 'rm' else 'dpo'}",
                        fromlist=["x"])
    trainer_class = module.RewardModelTrainer if job == "rm" else module.DPOTrainer
    ends: list[float] = []
    step = trainer_class.step

    def timed(self):
        result = step(self)
        ends.append(time.perf_counter())
        return result

    trainer_class.step = timed
    model = info["rm_init"] if job == "rm" else info["policy"]
    config = load_config(None, [
        "data.task=reverse", f"model.path={model}", f"pairs.train_path={info['train']}",
        f"pairs.eval_path={info['eval']}", f"{job}.steps={steps}", f"{job}.batch_size={BATCH}",
        f"{job}.lr={LR[job]}", f"{job}.eval_every=0", "train.save_every=0",
        f"train.threads={threads}", f"train.seed={seed}", "run.tensorboard=false",
        "run.progress=false", "run.overwrite=true", f"run.dir={out}", "data.num_eval=8",
        *settings])
    with trainer_class(config) as trainer:
        began = time.perf_counter()
        trainer.global_step = 0
        while trainer.global_step < steps:
            trainer.step()
            trainer.global_step += 1
        trained = trainer.model if job == "rm" else trainer.policy
        save_model_dir(trained, trainer.tokenizer,
                       out / ("reward_model" if job == "rm" else "dpo_model"))
    return [b - a for a, b in zip([began, *ends], ends, strict=False)]


def worker_trl(job: str, info: dict, steps: int, seed: int, threads: int, out: Path,
               settings: list[str] = ()) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    torch.set_num_threads(threads)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    common = dict(output_dir=str(out), per_device_train_batch_size=BATCH,
                  learning_rate=LR[job], max_steps=steps, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                  adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0,
                  logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                  bf16=False, seed=seed, data_seed=seed, disable_dropout=True,
                  gradient_checkpointing=False, dataloader_num_workers=0, max_length=None,
                  torch_compile="torch_compile=true" in settings)
    rows = _rows(info["train"])
    if job == "rm":
        from trl import RewardConfig, RewardTrainer

        from plait.recipes.pairs import PairEncoder

        tokenizer = AutoTokenizer.from_pretrained(info["rm_init"])
        model = AutoModelForSequenceClassification.from_pretrained(info["rm_init"],
                                                                   num_labels=1)
        encode = PairEncoder(tokenizer, "auto", 10_000)
        data = Dataset.from_list([dict(zip(("chosen_ids", "rejected_ids"), encode(r),
                                           strict=True)) for r in rows])
        trainer = RewardTrainer(model=model, args=RewardConfig(**common,
                                                               center_rewards_coefficient=None),
                                train_dataset=data, processing_class=tokenizer,
                                callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        from plait.models.reward_model import ResponseEncoder

        tokenizer = AutoTokenizer.from_pretrained(info["policy"])
        model = AutoModelForCausalLM.from_pretrained(info["policy"])
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                  for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1,
                                                         loss_type=["sigmoid"],
                                                         precompute_ref_log_probs=True),
                             train_dataset=data, processing_class=tokenizer,
                             callbacks=[Clock()])
        encode = ResponseEncoder(tokenizer, "auto")
        first = trainer.train_dataset[0]
        ours = encode(rows[0]["prompt"], rows[0]["chosen"])
        if first["prompt_ids"] + first["chosen_ids"] != ours:  # the same data, token for token
            sys.exit(f"TRL tokenized pair 1 as {first['prompt_ids'] + first['chosen_ids']}, "
                     f"plait as {ours}")
    trainer.train()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


# ---------------------------------------------------------------------- evaluation


def evaluate(job: str, model_dir: Path, info: dict) -> dict:
    """The same held-out measures for either side's saved model."""
    import torch
    from transformers import AutoModelForCausalLM

    from plait.data.tasks import make_task
    from plait.models.loading import load_tokenizer
    from plait.models.reward_model import (
        ResponseEncoder,
        load_reward_model,
        padded_batch,
        sequence_scores,
    )
    from plait.train.forward import position_ids_from_mask

    rows = _rows(info["eval"])
    tokenizer = load_tokenizer(model_dir, "model")
    encode = ResponseEncoder(tokenizer, "auto")
    truth = torch.tensor([r["chosen_score"] > r["rejected_score"] for r in rows])
    sequences = [encode(r["prompt"], r["chosen"]) for r in rows] + \
        [encode(r["prompt"], r["rejected"]) for r in rows]
    ids, mask = padded_batch(sequences, tokenizer.pad_token_id)
    n = len(rows)
    with torch.no_grad():
        if job == "rm":
            model = load_reward_model(model_dir, pad_token_id=tokenizer.pad_token_id).eval()
            scores = sequence_scores(model, ids, mask)
            margin = scores[:n] - scores[n:]
        else:
            def logps(model) -> torch.Tensor:
                logits = model(input_ids=ids, attention_mask=mask,
                               position_ids=position_ids_from_mask(mask), use_cache=False).logits
                token = torch.log_softmax(logits[:, :-1].float(), -1).gather(
                    -1, ids[:, 1:, None]).squeeze(-1)
                starts = torch.tensor([len(encode.prompt(r["prompt"])) for r in rows] * 2)
                response = (torch.arange(1, ids.shape[1])[None] >= starts[:, None]) & \
                    mask[:, 1:].bool()
                return (token * response).sum(-1)

            policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            reference = AutoModelForCausalLM.from_pretrained(info["policy"]).eval()
            ratio = logps(policy) - logps(reference)
            margin = ratio[:n] - ratio[n:]
    result = {"accuracy": float(((margin > 0) == truth).double().mean())}
    if job == "dpo":  # greedy answers to held-out prompts, scored by the hidden truth
        task = make_task("reverse")
        prompts = task.make_rows(200, seed=0, split="test")
        scores = []
        with torch.no_grad():
            for row in prompts:
                prompt = torch.tensor([encode.prompt(row["prompt"])])
                out = policy.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      do_sample=False, max_new_tokens=10,
                                      pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
                scores.append(task.verify(text, row["answer"]))
        result["true_score"] = sum(scores) / len(scores)
    return result


# ---------------------------------------------------------------------- driver


def run_worker(side: str, job: str, info: dict, steps: int, seed: int, threads: int,
               out: Path, settings: list[str] = ()) -> dict:
    result_file = out.with_suffix(".json")
    cache = out.parent / f"{out.name}_inductor_cache"  # empty: a cold compilation
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", side, "--job", job,
               "--info", json.dumps(info), "--steps", str(steps), "--seed", str(seed),
               "--threads", str(threads), "--worker-out", str(out)]
    for setting in settings:
        command += ["--set", setting]
    proc = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PLAIT_PROGRESS": "0", "TQDM_DISABLE": "1",
                               "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"{side} {job} seed {seed} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def run_seed(job: str, seed: int, sides: dict, info: dict, args) -> dict:
    """One job and seed: every side ``args.rounds`` times, in alternating order.

    The host's speed drifts between minutes, so each round's times are compared within
    the round (side / TRL's default, run minutes apart at most) and a side's ratio is
    the median of its in-round ratios. The first round's models are evaluated (every
    round trains the same model: same seed, same data)."""
    entry: dict = {"job": job, "seed": seed, "rounds": []}
    order = list(sides)
    for round_index in range(args.rounds):
        times = {}
        for side in (order if round_index % 2 == 0 else order[::-1]):
            kind, settings = sides[side]
            out = args.work / f"{job}_{side}_seed{seed}"
            result = run_worker(kind, job, info, args.steps, seed, args.threads, out,
                                settings)
            seconds = result["seconds_per_step"]
            times[side] = {"median_s_per_step": statistics.median(seconds[1:]),
                           "first_step_s": seconds[0], "all_steps_s": sum(seconds)}
            if round_index == 0:
                entry[side] = evaluate(job, Path(result["model_dir"]), info)
            print(job, seed, f"round {round_index}", side, times[side],
                  entry[side] if round_index == 0 else "", flush=True)
        for side in sides:  # every side against TRL's default, within the round
            times[side]["time_ratio"] = times[side]["median_s_per_step"] / \
                times["trl"]["median_s_per_step"]
            times[side]["all_steps_ratio"] = times[side]["all_steps_s"] / \
                times["trl"]["all_steps_s"]
        entry["rounds"].append(times)
    for side in sides:
        for key in ("median_s_per_step", "first_step_s", "all_steps_s", "time_ratio",
                    "all_steps_ratio"):
            entry[side][key] = statistics.median(t[side][key] for t in entry["rounds"])
        entry[side]["round_time_ratios"] = [t[side]["time_ratio"] for t in entry["rounds"]]
    entry["time_ratio"] = entry["plait"]["time_ratio"]
    return entry


def parse_variants(texts: list[str]) -> dict[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` arguments as ``{NAME: [KEY=VALUE, ...]}``."""
    variants: dict[str, list[str]] = {}
    for text in texts:
        name, _, overrides = text.partition(":")
        settings = [o.strip() for o in overrides.split(",") if o.strip()]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or not settings or \
                any("=" not in o for o in settings):
            raise SystemExit(f"--plait-variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        if name in ("plait", "trl", "trl-compiled") or name in variants:
            raise SystemExit(f"--plait-variant {text!r}: the name {name!r} is taken")
        variants[name] = settings
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every side this many times a seed, in alternating "
                             "order; ratios are medians of in-round ratios")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--eval-pairs", type=int, default=512)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_preference_vs_trl"))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/preference_vs_trl_cpu.json"))
    parser.add_argument("--plait-variant", action="append", default=[],
                        help="NAME:KEY=VALUE[,KEY=VALUE...]: one more plait side")
    parser.add_argument("--trl-compile", action="store_true",
                        help="one more TRL side with torch_compile=True")
    parser.add_argument("--worker", choices=("plait", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        info = json.loads(args.info)
        fn = worker_plait if args.worker == "plait" else worker_trl
        seconds = fn(args.job, info, args.steps, args.seed, args.threads, args.worker_out,
                     args.set)
        model_dir = args.worker_out / ("reward_model" if args.job == "rm" else "dpo_model") \
            if args.worker == "plait" else args.worker_out / "model"
        result = {"seconds_per_step": seconds, "model_dir": str(model_dir)}
        args.worker_out.with_suffix(".json").write_text(json.dumps(result))
        return 0
    import torch
    import transformers
    import trl

    variants = parse_variants(args.plait_variant)
    sides = {"plait": ("plait", []), **{name: ("plait", settings)
                                        for name, settings in variants.items()},
             "trl": ("trl", [])}
    if args.trl_compile:
        sides["trl-compiled"] = ("trl", ["torch_compile=true"])
    info = prepare(args.work, args.sft_steps, args.pairs, args.eval_pairs)
    runs = [run_seed(job, seed, sides, info, args) for seed in args.seeds
            for job in args.jobs]
    summary = {}
    for job in args.jobs:
        mine = [r for r in runs if r["job"] == job]
        ratios = [r["time_ratio"] for r in mine]
        summary[job] = {"time_ratio_median": statistics.median(ratios),
                        "time_ratio_range": [min(ratios), max(ratios)]}
        for side in sides:
            ratios = [r[side]["time_ratio"] for r in mine]
            whole = [r[side]["all_steps_ratio"] for r in mine]
            summary[job][f"{side}_time_ratio_median"] = statistics.median(ratios)
            summary[job][f"{side}_time_ratio_range"] = [min(ratios), max(ratios)]
            summary[job][f"{side}_all_steps_ratio_median"] = statistics.median(whole)
            summary[job][f"{side}_first_step_s_median"] = statistics.median(
                r[side]["first_step_s"] for r in mine)
            for key in ("accuracy", "true_score"):
                values = [r[side][key] for r in mine if key in r[side]]
                if values:
                    summary[job][f"{side}_{key}_mean"] = statistics.mean(values)
                    summary[job][f"{side}_{key}_range"] = [min(values), max(values)]
    report = {"summary": summary, "runs": runs, "sides": sides, "steps": args.steps,
              "threads": args.threads, "rounds": args.rounds,
              "pairs": args.pairs, "eval_pairs": args.eval_pairs, "batch_size": BATCH,
              "lr": LR, "versions": {"torch": torch.__version__, "trl": trl.__version__,
                                     "transformers": transformers.__version__},
              "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
