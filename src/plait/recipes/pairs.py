"""What ``plait rm`` and ``plait dpo`` share: preference pairs (from a file, or the
built-in task's with their hidden true scores: edits of the answer or the policy's own
samples), their token ids, and the job around a pairwise step — the run directory,
checkpoints and exact resume, evaluation cadence, progress, metrics and summary.

A command is a :class:`PairJob` with its model(s), its step and its evaluation.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from plait.config import Config, ConfigError, config_to_dict, dump_yaml
from plait.data.datasets import DataError, PromptIterator, split_rows
from plait.data.preferences import load_preference_rows
from plait.models.loading import (
    PromptEncoder,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
)
from plait.models.reward_model import ResponseEncoder
from plait.parallel.dist import Dist
from plait.recipes.checkpointing import check_resumable
from plait.rollout.base import SamplingParams
from plait.runtime import inputs
from plait.runtime.run_dir import check_run_dir, mark_run_dir
from plait.telemetry.metrics import MetricsLogger
from plait.telemetry.progress import ProgressBar
from plait.telemetry.summary import write_json_atomic, write_text_atomic
from plait.train.checkpoint import (
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)


def load_pairs(config: Config, command: str) -> tuple[list[dict], list[dict], Counter]:
    """Training and held-out pairs (``config.pairs``), and the rows dropped by reason."""
    pairs = config.pairs
    if pairs.train_path is None:
        task = inputs.job_task(config)
        if task is None or not hasattr(task, "make_pairs"):
            raise ConfigError(f"plait {command}: data.task={config.data.task!r} makes no "
                              "preference pairs; set pairs.train_path to your pairs, or "
                              "data.task=reverse for the built-in ones")
        seed = config.train.seed
        if pairs.source == "policy":
            sample = PolicySampler(config)
            return (sample(task, pairs.num_pairs, "train", noise=pairs.label_noise),
                    sample(task, pairs.num_eval_pairs, "test"), Counter())
        train = task.make_pairs(pairs.num_pairs, seed=seed, noise=pairs.label_noise)
        held_out = task.make_pairs(pairs.num_eval_pairs, seed=seed, split="test")
        return train, held_out, Counter()
    options = dict(fields=pairs.fields, bad_rows=pairs.bad_rows)
    loaded = load_preference_rows(pairs.train_path, **options)
    dropped = Counter(loaded.dropped)
    if pairs.eval_path is not None:
        held = load_preference_rows(pairs.eval_path, **options)
        dropped.update(held.dropped)
        return loaded.rows, held.rows, dropped
    train, held_out = split_rows(loaded.rows, pairs.eval_fraction, seed=config.train.seed)
    if not held_out:
        raise DataError(f"pairs.train_path: {len(loaded.rows)} pairs leave none to hold out "
                        f"at pairs.eval_fraction={pairs.eval_fraction}; set pairs.eval_path "
                        "or raise it")
    return train, held_out, dropped


class PolicySampler:
    """Preference pairs of a policy's own responses to a built-in task's prompts: each
    prompt sampled ``pairs.samples_per_prompt`` times through plait's engine, and two
    samples of different true score ranked by it (labels flipped at the noise rate), as
    people rank a model's responses. Prompts whose samples all score the same give no
    pair."""

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
        seed, k = self.config.train.seed, self.config.pairs.samples_per_prompt
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
            raise DataError(f"pairs.source=policy: the policy's {k} samples of each prompt "
                            "all score the same; raise rollout.temperature or "
                            "pairs.samples_per_prompt, or use pairs.source=edits")
        return pairs


class PairEncoder:
    """A pair's two sequences as token ids (see :class:`ResponseEncoder`), and whether
    they fit ``max_length``."""

    def __init__(self, tokenizer, chat_template: str, max_length: int):
        self.encode, self.max_length = ResponseEncoder(tokenizer, chat_template), max_length

    def __call__(self, row: dict) -> tuple[list[int], list[int]]:
        return self.encode(row["prompt"], row["chosen"]), \
            self.encode(row["prompt"], row["rejected"])

    def prompt_length(self, row: dict) -> int:
        """Tokens of the prompt alone (what precedes each response in both sequences)."""
        if isinstance(row["chosen"], list) or isinstance(row["prompt"], list):
            return _common_prefix(*self(row))
        return len(self.encode.prompt(row["prompt"]))

    def fits(self, row: dict) -> bool:
        return max(map(len, self(row))) <= self.max_length


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def truth_of(rows: list[dict]) -> torch.Tensor | None:
    """Whether each pair's chosen response is truly the better one, when every pair
    carries its true scores (the built-in task's do); else None."""
    truth = [(row["chosen_score"], row["rejected_score"]) for row in rows
             if "chosen_score" in row and "rejected_score" in row]
    if len(truth) != len(rows):
        return None
    return torch.tensor([c > r for c, r in truth])


class PairJob:
    """One pairwise training job (``plait rm``, ``plait dpo``): subclasses set ``NAME``
    (the trained model's directory), ``COMMAND`` and ``section`` (the config section with
    steps, batch_size, lr, eval_every), load their models in :meth:`build`, and define
    :meth:`step`, :meth:`evaluate` and :meth:`write_outputs`."""

    NAME = "model"
    COMMAND = "?"

    def __init__(self, config: Config):
        runtime = config.runtime
        if runtime.num_ranks > 1 or runtime.launcher != "local" or \
                runtime.placement != "colocated":
            raise ConfigError(f"plait {self.COMMAND} runs in one process; leave "
                              "runtime.num_ranks, runtime.launcher and runtime.placement at "
                              "their defaults")
        self.config = config
        self.section = getattr(config, self.COMMAND)
        self.dist = Dist.single()
        self.run_dir = Path(config.run.dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self._prepare_run_dir()
        self.device = inputs.configure_process(config, self.dist)
        self.model_dir = resolve_model_dir(config.model, self.run_dir)
        self.tokenizer = load_tokenizer(self.model_dir, "model.path")
        self.encode = PairEncoder(self.tokenizer, config.model.chat_template,
                                  config.pairs.max_length)
        train, held_out, self.dropped = load_pairs(config, self.COMMAND)
        self.train_rows = self._within_length(train, "training")
        self.eval_rows = self._within_length(held_out, "held-out")
        self.pairs = PromptIterator(self.train_rows, seed=config.train.seed)
        self.global_step = 0
        self.state: dict = {"evals": {}}
        self.build()
        self.metrics = MetricsLogger(self.run_dir, tensorboard=config.run.tensorboard)

    # ------------------------------------------------------------------ to define

    def build(self) -> None:
        """Load the models and make ``self.optimizer`` and ``self.scheduler``."""
        raise NotImplementedError

    def saved_models(self) -> dict:
        """The trained models a checkpoint holds, by name."""
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, tag: str) -> dict[str, float]:
        raise NotImplementedError

    def write_outputs(self, summary: dict) -> None:
        """Save the trained model and plots at the end (the summary may gain keys)."""
        raise NotImplementedError

    def shown(self, metrics: dict) -> dict:
        """What the progress bar shows of a step's metrics."""
        return {}

    # ------------------------------------------------------------------ the job

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
        """Pairs up to pairs.max_length tokens; a longer one stops the job
        (bad_rows=error) naming it, or is dropped and counted."""
        kept = []
        for index, row in enumerate(rows):
            if self.encode.fits(row):
                kept.append(row)
            elif self.config.pairs.bad_rows == "error":
                raise DataError(f"{which} pair {index + 1} is longer than pairs.max_length="
                                f"{self.config.pairs.max_length} tokens; raise it, or set "
                                "pairs.bad_rows=drop to leave such pairs out")
            else:
                self.dropped["too_long"] += 1
        if not kept:
            raise DataError(f"no {which} pair is within pairs.max_length="
                            f"{self.config.pairs.max_length} tokens")
        return kept

    def clip_and_step(self, loss: torch.Tensor, parameters) -> float:
        """Backward, clip (optim.max_grad_norm), step; the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def save(self) -> Path:
        state = {**self.state, "global_step": self.global_step,
                 "data": self.pairs.state_dict(), "config": config_to_dict(self.config)}
        return save_checkpoint(self.checkpoint_root, self.global_step,
                               models=self.saved_models(), tokenizer=self.tokenizer,
                               optimizers={self.NAME: self.optimizer},
                               schedulers={self.NAME: self.scheduler}, trainer_state=state,
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
        self.state = load_checkpoint(path, models=self.saved_models(),
                                     optimizers={self.NAME: self.optimizer},
                                     schedulers={self.NAME: self.scheduler})
        self.global_step = self.state["global_step"]
        self.pairs.load_state_dict(self.state["data"])
        self.metrics.truncate_after(self.global_step)
        print(f"plait: resumed from {path} at step {self.global_step}", flush=True)
        return True

    def run(self) -> dict:
        cfg, section = self.config, self.section
        started = time.time()
        resumed = self.resume()
        write_text_atomic(self.run_dir / "config.yaml", dump_yaml(cfg))
        if not resumed:
            self.metrics.log(0, self.evaluate("before"))
        bar = ProgressBar(section.steps, self.COMMAND, initial=self.global_step,
                          disable=None if cfg.run.progress else True)
        while self.global_step < section.steps:
            metrics = self.step()
            self.global_step += 1
            if section.eval_every and self.global_step % section.eval_every == 0 \
                    and self.global_step < section.steps:
                metrics.update(self.evaluate(f"step_{self.global_step}"))
            self.metrics.log(self.global_step, metrics)
            bar.update(1, **self.shown(metrics))
            if cfg.train.save_every and self.global_step % cfg.train.save_every == 0:
                self.save()
        bar.close()
        self.metrics.log(self.global_step, self.evaluate("final"))
        self.save()
        return self.finish(started)

    def finish(self, started: float) -> dict:
        evals = self.state["evals"]
        summary = {"steps": self.global_step, "pairs": len(self.train_rows),
                   "eval_pairs": len(self.eval_rows), "dropped_pairs": dict(self.dropped),
                   **{f"{key.removeprefix('eval/')}_before": value
                      for key, value in evals["before"].items()},
                   **{f"{key.removeprefix('eval/')}_after": value
                      for key, value in evals["final"].items()},
                   "wall_time_s": round(time.time() - started, 2)}
        self.metrics.flush()
        self.write_outputs(summary)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def close(self) -> None:
        self.metrics.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prompt_ids(rows: list[dict], device) -> torch.Tensor:
    """Pairs of one prompt share an id."""
    keys: dict[str, int] = {}
    return torch.tensor([keys.setdefault(json.dumps(row["prompt"], sort_keys=True), len(keys))
                         for row in rows], device=device)
