"""Reward-model training (``plait rm``): a scalar head on a decoder learns which of two
responses people (or a hidden scorer) prefer.

One step:

    1. the next batch of pairs    (chosen and rejected side by side, one padded batch)
    2. both responses' scores     (the decoder's last token through the head)
    3. the pairwise loss          (Bradley-Terry, optional margin and centring), an
                                  optimizer step

Held-out pairs are scored before training, every ``rm.eval_every`` steps and at the end:
pairwise accuracy against the labels, against the hidden truth when the pairs carry true
scores (the built-in ``reverse`` task's do), the score distribution (per ``source`` column
when there is one) and calibration (expected calibration error, reliability plot). The run
directory holds ``metrics.jsonl``, ``checkpoints/`` (resumed as ``plait train``'s are) and
``reward_model/``, an ``AutoModelForSequenceClassification`` directory.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from plait import algos
from plait.config import Config, ConfigError, config_to_dict, dump_yaml
from plait.data.datasets import DataError, PromptIterator, split_rows
from plait.data.preferences import load_preference_rows
from plait.errors import TrainingDiverged
from plait.models.loading import (
    PromptEncoder,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
    save_model_dir,
)
from plait.models.reward_model import (
    ResponseEncoder,
    load_reward_model,
    padded_batch,
    sequence_scores,
)
from plait.parallel.dist import Dist
from plait.recipes.checkpointing import check_resumable
from plait.rollout.base import SamplingParams
from plait.runtime import inputs
from plait.runtime.run_dir import check_run_dir, mark_run_dir
from plait.telemetry.metrics import MetricsLogger, read_metrics
from plait.telemetry.plots import plot_metrics, plot_reliability
from plait.telemetry.progress import ProgressBar
from plait.telemetry.summary import write_json_atomic, write_text_atomic
from plait.train.checkpoint import (
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from plait.train.optim import build_optimizer

NAME = "reward_model"  # the model's directory in checkpoints and in the run directory
_PANELS = (("pairwise loss", ("loss/pairwise",)),
           ("pairs judged right", ("eval/accuracy", "eval/accuracy_vs_truth", "train/accuracy")),
           ("calibration error", ("eval/ece",)))


def load_pairs(config: Config) -> tuple[list[dict], list[dict], Counter]:
    """Training and held-out pairs, and the rows dropped by reason."""
    rm = config.rm
    if rm.train_path is None:
        task = inputs.job_task(config)
        if task is None or not hasattr(task, "make_pairs"):
            raise ConfigError(f"plait rm: data.task={config.data.task!r} makes no preference "
                              "pairs; set rm.train_path to your pairs, or data.task=reverse "
                              "for the built-in ones")
        seed = config.train.seed
        if rm.pair_source == "policy":
            sample = PolicySampler(config)
            return (sample(task, rm.num_pairs, "train", noise=rm.label_noise),
                    sample(task, rm.num_eval_pairs, "test"), Counter())
        train = task.make_pairs(rm.num_pairs, seed=seed, noise=rm.label_noise)
        held_out = task.make_pairs(rm.num_eval_pairs, seed=seed, split="test")
        return train, held_out, Counter()
    options = dict(fields=rm.fields, bad_rows=rm.bad_rows)
    loaded = load_preference_rows(rm.train_path, **options)
    dropped = Counter(loaded.dropped)
    if rm.eval_path is not None:
        held = load_preference_rows(rm.eval_path, **options)
        dropped.update(held.dropped)
        return loaded.rows, held.rows, dropped
    train, held_out = split_rows(loaded.rows, rm.eval_fraction, seed=config.train.seed)
    if not held_out:
        raise DataError(f"rm.train_path: {len(loaded.rows)} pairs leave none to hold out at "
                        f"rm.eval_fraction={rm.eval_fraction}; set rm.eval_path or raise it")
    return train, held_out, dropped


class PolicySampler:
    """Preference pairs of a policy's own responses to a built-in task's prompts: each
    prompt sampled ``rm.samples_per_prompt`` times through plait's engine, and two samples
    of different true score ranked by it (labels flipped at the noise rate), as people
    rank a model's responses. Prompts whose samples all score the same give no pair."""

    def __init__(self, config: Config):
        self.config = config
        model_dir = resolve_model_dir(config.model, Path(config.run.dir))
        self.tokenizer = load_tokenizer(model_dir, "model.path")
        self.policy = load_causal_lm(model_dir, config.model.attn_implementation,
                                     key="model.path").eval()
        self.engine = inputs.engine_for(config, self.policy, self.tokenizer, model_dir,
                                        compile=False)
        self.encode = PromptEncoder(self.tokenizer, config.model.chat_template)
        rollout = self.config.rollout
        self.params = SamplingParams(max_new_tokens=rollout.max_new_tokens,
                                     temperature=rollout.temperature or 1.0,
                                     top_p=rollout.top_p, top_k=rollout.top_k,
                                     stop=tuple(rollout.stop))

    @torch.no_grad()
    def __call__(self, task, n: int, split: str, *, noise: float = 0.0) -> list[dict]:
        seed, k = self.config.train.seed, self.config.rm.samples_per_prompt
        rng = random.Random(f"plait-policy-pairs:{seed}:{split}:{noise}")
        pairs: list[dict] = []
        rows = task.make_rows(max(4 * n, 64), seed=seed, split=split)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + (split == "test"))
            for start in range(0, len(rows), 256):
                chunk = rows[start:start + 256]
                groups = self.engine.generate([self.encode(r["prompt"]) for r in chunk],
                                              self.params, k)
                for row, group in zip(chunk, groups, strict=True):
                    texts = [c.text for c in group]
                    rng.shuffle(texts)
                    pair = next((p for i, a in enumerate(texts) for b in texts[i + 1:]
                                 if (p := task.rank_pair(row, a, b, rng, noise)) is not None),
                                None)
                    if pair is not None:
                        pairs.append(pair)
                    if len(pairs) == n:
                        return pairs
        if not pairs:
            raise DataError(f"rm.pair_source=policy: the policy's {k} samples of each prompt "
                            "all score the same; raise rollout.temperature or "
                            "rm.samples_per_prompt, or use rm.pair_source=edits")
        return pairs


class PairEncoder:
    """A pair's two sequences as token ids (see :class:`ResponseEncoder`), and whether
    they fit ``max_length``."""

    def __init__(self, tokenizer, chat_template: str, max_length: int):
        self.encode, self.max_length = ResponseEncoder(tokenizer, chat_template), max_length

    def __call__(self, row: dict) -> tuple[list[int], list[int]]:
        return self.encode(row["prompt"], row["chosen"]), \
            self.encode(row["prompt"], row["rejected"])

    def fits(self, row: dict) -> bool:
        return max(map(len, self(row))) <= self.max_length


class RewardModelTrainer:
    """One ``plait rm`` job: its run directory, model, pairs, optimizer and records."""

    def __init__(self, config: Config):
        runtime = config.runtime
        if runtime.num_ranks > 1 or runtime.launcher != "local" or \
                runtime.placement != "colocated":
            raise ConfigError("plait rm runs in one process; leave runtime.num_ranks, "
                              "runtime.launcher and runtime.placement at their defaults")
        self.config = config
        self.dist = Dist.single()
        self.run_dir = Path(config.run.dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self._prepare_run_dir()
        self.device = inputs.configure_process(config, self.dist)
        model_dir = resolve_model_dir(config.model, self.run_dir)
        self.tokenizer = load_tokenizer(model_dir, "model.path")
        self.model = load_reward_model(model_dir, pad_token_id=self.tokenizer.pad_token_id,
                                       seed=config.train.seed,
                                       attn_implementation=config.model.attn_implementation,
                                       key="model.path").to(self.device)
        self.encode = PairEncoder(self.tokenizer, config.model.chat_template,
                                  config.rm.max_length)
        train, held_out, self.dropped = load_pairs(config)
        self.train_rows = self._within_length(train, "training")
        self.eval_rows = self._within_length(held_out, "held-out")
        self.pairs = PromptIterator(self.train_rows, seed=config.train.seed)
        self.optimizer, self.scheduler = build_optimizer(
            self.model.parameters(), config.optim, lr=config.rm.lr, total_steps=config.rm.steps)
        self.global_step = 0
        self.state: dict = {"evals": {}}
        self.metrics = MetricsLogger(self.run_dir, tensorboard=config.run.tensorboard)

    def _prepare_run_dir(self) -> None:
        run = self.config.run
        check_run_dir(self.config)
        if run.overwrite and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        if run.resume == "never" and latest_checkpoint(self.checkpoint_root) is not None:
            raise ConfigError(f"run.dir {str(self.run_dir)!r} already holds checkpoints and "
                              "run.resume is 'never'; pick a new run.dir or set "
                              "run.overwrite=true")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mark_run_dir(self.run_dir)

    def _within_length(self, rows: list[dict], which: str) -> list[dict]:
        """Pairs up to rm.max_length tokens; a longer one stops the job (bad_rows=error)
        naming it, or is dropped and counted."""
        kept = []
        for index, row in enumerate(rows):
            if self.encode.fits(row):
                kept.append(row)
            elif self.config.rm.bad_rows == "error":
                raise DataError(f"{which} pair {index + 1} is longer than rm.max_length="
                                f"{self.config.rm.max_length} tokens; raise it, or set "
                                "rm.bad_rows=drop to leave such pairs out")
            else:
                self.dropped["too_long"] += 1
        if not kept:
            raise DataError(f"no {which} pair is within rm.max_length="
                            f"{self.config.rm.max_length} tokens")
        return kept

    # ------------------------------------------------------------------ the step

    def scores(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and the rejected responses, ``[P]`` each."""
        encoded = [self.encode(row) for row in rows]
        ids, mask = padded_batch([c for c, _ in encoded] + [r for _, r in encoded],
                                  self.tokenizer.pad_token_id)
        scores = sequence_scores(self.model, ids.to(self.device), mask.to(self.device))
        return scores[:len(rows)], scores[len(rows):]

    def step(self) -> dict[str, float]:
        rm = self.config.rm
        rows = self.pairs.next_batch(rm.batch_size)                           # 1
        self.model.train()
        chosen, rejected = self.scores(rows)                                  # 2
        margin = None
        if rm.margin_field is not None:
            margin = torch.tensor([float(row[rm.margin_field]) for row in rows],
                                  device=chosen.device)
        loss, stats = algos.bradley_terry_loss(                               # 3
            chosen, rejected, margin=margin, center_coef=rm.center_coef,
            prompt_ids=_prompt_ids(rows, chosen.device))
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the reward-model loss became {float(loss)} at step "
                                   f"{self.global_step + 1}: lower rm.lr or set "
                                   "optim.max_grad_norm")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              clip if clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return {"loss/pairwise": loss.item(), "grad_norm": float(norm),
                "lr": self.scheduler.get_last_lr()[0],
                **{f"train/{key}": float(value) for key, value in stats.items()}}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, tag: str, chunk: int = 64) -> dict[str, float]:
        """Scores of every held-out pair and what they say about the model."""
        self.model.eval()
        parts = [self.scores(self.eval_rows[i:i + chunk])
                 for i in range(0, len(self.eval_rows), chunk)]
        chosen = torch.cat([c for c, _ in parts]).double().cpu()
        rejected = torch.cat([r for _, r in parts]).double().cpu()
        _, stats = algos.bradley_terry_loss(chosen, rejected)
        ece, table = algos.pairwise_calibration(chosen, rejected)
        both = torch.cat([chosen, rejected])
        result = {"eval/accuracy": float(stats["accuracy"]), "eval/ece": ece,
                  "eval/margin": float(stats["margin"]), "eval/score_mean": float(both.mean()),
                  "eval/score_std": float(both.std()) if both.numel() > 1 else 0.0}
        truth = [(row["chosen_score"], row["rejected_score"]) for row in self.eval_rows
                 if "chosen_score" in row and "rejected_score" in row]
        if len(truth) == len(self.eval_rows):  # every pair carries its true scores
            better = torch.tensor([c > r for c, r in truth])
            right = torch.where(better, chosen > rejected, rejected > chosen)
            result["eval/accuracy_vs_truth"] = float(right.double().mean())
        sources = {row.get("source") for row in self.eval_rows}
        if len(sources) > 1 and None not in sources:
            for source in sorted(map(str, sources)):
                rows = [i for i, row in enumerate(self.eval_rows) if str(row["source"]) == source]
                picked = torch.cat([chosen[rows], rejected[rows]])
                result[f"eval/score_mean/{source}"] = float(picked.mean())
                result[f"eval/score_std/{source}"] = float(picked.std()) \
                    if picked.numel() > 1 else 0.0
        self.state["evals"][tag] = result
        self.state["reliability"] = table
        return result

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        state = {**self.state, "global_step": self.global_step,
                 "data": self.pairs.state_dict(), "config": config_to_dict(self.config)}
        return save_checkpoint(self.checkpoint_root, self.global_step,
                               models={NAME: self.model}, tokenizer=self.tokenizer,
                               optimizers={NAME: self.optimizer},
                               schedulers={NAME: self.scheduler}, trainer_state=state,
                               keep_last=self.config.train.keep_last or None)

    def resume(self) -> bool:
        mode = self.config.run.resume
        if mode == "never":
            return False
        path = latest_intact_checkpoint(self.checkpoint_root, fallback=mode == "auto",
                                        set_aside=True)
        if path is None:
            if mode == "must":
                raise ConfigError(f"run.resume is 'must' but {str(self.checkpoint_root)!r} "
                                  "holds no complete checkpoint")
            return False
        check_resumable(self, path, read_trainer_state(path))
        self.state = load_checkpoint(path, models={NAME: self.model},
                                     optimizers={NAME: self.optimizer},
                                     schedulers={NAME: self.scheduler})
        self.global_step = self.state["global_step"]
        self.pairs.load_state_dict(self.state["data"])
        self.metrics.truncate_after(self.global_step)
        print(f"plait: resumed from {path} at step {self.global_step}", flush=True)
        return True

    # ------------------------------------------------------------------ the job

    def run(self) -> dict:
        cfg, rm = self.config, self.config.rm
        started = time.time()
        resumed = self.resume()
        write_text_atomic(self.run_dir / "config.yaml", dump_yaml(cfg))
        if not resumed:
            self.metrics.log(0, self.evaluate("before"))
        bar = ProgressBar(rm.steps, "rm", initial=self.global_step,
                          disable=None if cfg.run.progress else True)
        while self.global_step < rm.steps:
            metrics = self.step()
            self.global_step += 1
            if rm.eval_every and self.global_step % rm.eval_every == 0 \
                    and self.global_step < rm.steps:
                metrics.update(self.evaluate(f"step_{self.global_step}"))
            self.metrics.log(self.global_step, metrics)
            shown = {"loss": metrics["loss/pairwise"], "acc": metrics["train/accuracy"]}
            if "eval/accuracy" in metrics:
                shown["eval_acc"] = metrics["eval/accuracy"]
            bar.update(1, **shown)
            if cfg.train.save_every and self.global_step % cfg.train.save_every == 0:
                self.save()
        bar.close()
        self.metrics.log(self.global_step, self.evaluate("final"))
        self.save()
        return self.finish(started)

    def finish(self, started: float) -> dict:
        evals = self.state["evals"]
        out = save_model_dir(self.model, self.tokenizer, self.run_dir / NAME)
        summary = {"steps": self.global_step, "pairs": len(self.train_rows),
                   "eval_pairs": len(self.eval_rows), "dropped_pairs": dict(self.dropped),
                   **{f"{key.removeprefix('eval/')}_before": value
                      for key, value in evals["before"].items()},
                   **{f"{key.removeprefix('eval/')}_after": value
                      for key, value in evals["final"].items()},
                   "wall_time_s": round(time.time() - started, 2),
                   "reward_model_dir": str(out)}
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.metrics.flush()
        plot_metrics(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "metrics.png",
                     panels=_PANELS, title="reward model")
        plot_reliability(self.state["reliability"], self.run_dir / "reliability.png",
                         title=f"held-out calibration (ECE {evals['final']['eval/ece']:.3f})")
        return summary

    def close(self) -> None:
        self.metrics.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prompt_ids(rows: list[dict], device) -> torch.Tensor:
    """Pairs of one prompt share an id (the centring term pools them)."""
    keys: dict[str, int] = {}
    return torch.tensor([keys.setdefault(json.dumps(row["prompt"], sort_keys=True), len(keys))
                         for row in rows], device=device)


def train_reward_model(config: Config) -> dict:
    """Run a ``plait rm`` job end to end and return its summary."""
    with RewardModelTrainer(config) as trainer:
        return trainer.run()
