"""The job around a supervised step (``plait sft``, ``plait rm``, ``plait dpo``): the run
directory, data order, checkpoints and exact resume, evaluation cadence, progress,
metrics and the summary, on one process or several.

A command is a :class:`StepJob` with its data, its model(s), its step and its
evaluation. On N ranks every rank draws the same batch and trains its share of it;
the loss of a share is its part of the whole batch's loss and the gradients are summed
over ranks, so N ranks take the one-process optimizer steps. Rank 0 evaluates, logs and
writes checkpoints.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from plait.config import Config, ConfigError, config_to_dict, dump_yaml
from plait.data.datasets import PromptIterator
from plait.errors import TrainingDiverged
from plait.models.loading import load_tokenizer, resolve_model_dir
from plait.parallel.dist import Dist
from plait.recipes.checkpointing import check_resumable, resume_checkpoint
from plait.rollout.base import SamplingParams
from plait.runtime import heap, inputs
from plait.runtime.run_dir import check_run_dir, mark_run_dir
from plait.telemetry.metrics import MetricsLogger
from plait.telemetry.progress import ProgressBar
from plait.telemetry.summary import write_json_atomic, write_text_atomic
from plait.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from plait.train.forward import compile_layers

EVAL_PROMPTS = 200  # held-out prompts whose greedy answers a built-in task scores


class StepJob:
    """One supervised job. Subclasses set ``NAME`` (the trained model's name in
    checkpoints), ``COMMAND`` (also the config section with steps, batch_size, lr and
    eval_every), and define :meth:`load_data`, :meth:`build`, :meth:`step`,
    :meth:`evaluate` and :meth:`write_outputs`."""

    NAME = "model"
    COMMAND = "?"

    def __init__(self, config: Config, dist: Dist | None = None):
        check_runtime(self.COMMAND, config)
        self.config = config
        self.section = getattr(config, self.COMMAND)
        self.dist = dist or Dist.single()
        self.run_dir = Path(config.run.dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self._prepare_run_dir()
        self.device = inputs.configure_process(config, self.dist)
        if self.dist.is_main:
            resolve_model_dir(config.model, self.run_dir)  # builds a tiny model once
        self.dist.barrier()
        self.model_dir = resolve_model_dir(config.model, self.run_dir)
        self.tokenizer = load_tokenizer(self.model_dir, "model.path")
        self.dropped: Counter = Counter()
        self.task = None  # a built-in task whose verifier scores greedy answers
        self.engine = None
        self.train_rows, self.eval_rows = self.load_data()
        self.batches = PromptIterator(self.train_rows, seed=config.train.seed)
        self.global_step = 0
        self.state: dict = {"evals": {}}
        self.build()
        if config.train.compile:
            self.compile_models()
        self.metrics = metrics_logger(config, self.run_dir) if self.dist.is_main else None

    # ------------------------------------------------------------------ to define

    def load_data(self) -> tuple[list[dict], list[dict]]:
        """Training and held-out rows (count rows left out in ``self.dropped``)."""
        raise NotImplementedError

    def build(self) -> None:
        """Load the models and make ``self.optimizer`` and ``self.scheduler``."""
        raise NotImplementedError

    def saved_models(self) -> dict:
        """The trained models a checkpoint holds, by name."""
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, tag: str) -> dict[str, float]:
        """Held-out metrics (rank 0 only), kept in ``self.state['evals'][tag]``."""
        raise NotImplementedError

    def write_outputs(self, summary: dict) -> None:
        """Save the trained model and plots at the end (the summary may gain keys)."""
        raise NotImplementedError

    def compile_models(self) -> None:
        """train.compile: the trained models' layers through torch.compile in the packed
        passes (refused for a model whose layers plait does not drive: nothing would be
        compiled)."""
        for name, model in self.saved_models().items():
            if not compile_layers(model):
                raise ConfigError(
                    f"train.compile: plait does not drive the layers of the {name}, a "
                    f"{model.config.model_type!r} model with "
                    f"{self.config.model.attn_implementation!r} attention, so nothing would "
                    "be compiled: set train.compile=false")

    def shown(self, metrics: dict) -> dict:
        """What the progress bar shows of a step's metrics."""
        return {}

    def data_summary(self) -> dict:
        return {"rows": len(self.train_rows), "eval_rows": len(self.eval_rows)}

    # ------------------------------------------------------------------ ranks

    def share(self, rows: list[dict], key=None) -> tuple[list[dict], float]:
        """This rank's rows of a batch and their part of it (``len(share) / len(rows)``).
        ``key``: rows with one key stay on one rank (a per-prompt term sees all its
        rows); the keys' first appearances are split in contiguous runs."""
        if not self.dist.active:
            return rows, 1.0
        if key is None:
            lo, hi = self.dist.shard_bounds(len(rows))
            return rows[lo:hi], (hi - lo) / len(rows)
        order: dict = {}
        for row in rows:
            order.setdefault(key(row), len(order))
        lo, hi = self.dist.shard_bounds(len(order))
        mine = [row for row in rows if lo <= order[key(row)] < hi]
        return mine, len(mine) / len(rows)

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over ranks."""
        if not self.dist.active:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(total, kind="metrics")
        return total.tolist()

    def weighted_mean(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        """Per-rank means of shares weighing ``weight`` each, as the batch's means."""
        if not self.dist.active:
            return stats
        names = sorted(stats)
        return dict(zip(names, self.all_sum([stats[n] * weight for n in names]), strict=True))

    @staticmethod
    def training(model: torch.nn.Module) -> None:
        """``model`` in training mode; a model already in it is left as it is (switching
        walks every submodule, a noticeable share of a small model's step)."""
        if not model.training:
            model.train()

    @staticmethod
    def no_rows_loss(parameters) -> torch.Tensor:
        """The loss of a rank whose share of the batch is empty (more ranks than rows):
        zero, with a gradient (of zeros) for every parameter, so it joins the sum."""
        return sum(p.sum() for p in parameters) * 0.0

    def check_finite(self, value: float, what: str, lr_key: str) -> None:
        """Stop with TrainingDiverged when the batch's loss is not a number."""
        if not math.isfinite(value):
            raise TrainingDiverged(f"the {what} loss became {value} at step "
                                   f"{self.global_step + 1}: lower {lr_key} or set "
                                   "optim.max_grad_norm")

    def clip_and_step(self, loss: torch.Tensor, parameters) -> float:
        """Backward of this rank's part of the loss, gradients summed over ranks, clip
        (optim.max_grad_norm), step; the gradient norm. ``loss`` is this rank's share's
        part of the batch's loss (the parts sum to it)."""
        parameters = list(parameters)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.dist.world_size).backward()
        if self.dist.active:  # average of world_size x part = sum of the parts
            grads = []
            for p in parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            self.dist.average_gradients(grads)
        clip = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    # ------------------------------------------------------------------ greedy answers

    def greedy_task_score(self, model, rows: list[dict], encode_prompt) -> float:
        """Mean score (``self.task.verify``) of ``model``'s greedy answers to the first
        :data:`EVAL_PROMPTS` distinct prompts of ``rows`` that carry an answer."""
        if self.engine is None:
            self.engine = inputs.engine_for(self.config, model, self.tokenizer,
                                            self.model_dir, compile=False)
        self.engine.update_weights(None, self.global_step)
        seen, picked = set(), []
        for row in rows:
            if row["prompt"] not in seen and row.get("answer") is not None:
                seen.add(row["prompt"])
                picked.append(row)
        picked = picked[:EVAL_PROMPTS]
        if not picked:
            return 0.0
        params = SamplingParams(max_new_tokens=self.config.rollout.max_new_tokens,
                                temperature=0.0, stop=tuple(self.config.rollout.stop))
        groups = self.engine.generate([encode_prompt(r["prompt"]) for r in picked], params, 1)
        scores = [self.task.verify(group[0].text, row["answer"])
                  for row, group in zip(picked, groups, strict=True)]
        return sum(scores) / len(scores)

    # ------------------------------------------------------------------ the job

    def _prepare_run_dir(self) -> None:
        """One process: settle run.overwrite and run.resume=never here (a launched job's
        launcher has done it before the ranks started)."""
        run = self.config.run
        if self.dist.is_main:
            check_run_dir(self.config)
            if run.overwrite and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            if run.resume == "never" and latest_checkpoint(self.checkpoint_root) is not None:
                raise ConfigError(f"run.dir {str(self.run_dir)!r} already holds checkpoints "
                                  "and run.resume is 'never'; pick a new run.dir or set "
                                  "run.overwrite=true")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mark_run_dir(self.run_dir)
        self.dist.barrier()

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(step, metrics)

    def _evaluate(self, tag: str) -> dict[str, float]:
        """Rank 0 evaluates; the others wait for it."""
        result = self.evaluate(tag) if self.dist.is_main else {}
        self.dist.barrier()
        return result

    def save(self) -> Path | None:
        if not self.dist.is_main:  # every rank holds the same weights and optimizer state
            return None
        state = {**self.state, "global_step": self.global_step,
                 "data": self.batches.state_dict(), "config": config_to_dict(self.config)}
        return save_checkpoint(self.checkpoint_root, self.global_step,
                               models=self.saved_models(), tokenizer=self.tokenizer,
                               optimizers={self.NAME: self.optimizer},
                               schedulers={self.NAME: self.scheduler}, trainer_state=state,
                               keep_last=self.config.train.keep_last or None)

    def resume(self) -> bool:
        path = resume_checkpoint(self)  # the same choice on every rank
        if path is None:
            if self.config.run.resume == "must":
                raise ConfigError(f"run.resume is 'must' but {str(self.checkpoint_root)!r} "
                                  "holds no complete checkpoint")
            return False
        check_resumable(self, path, read_trainer_state(path))
        self.state = load_checkpoint(path, models=self.saved_models(),
                                     optimizers={self.NAME: self.optimizer},
                                     schedulers={self.NAME: self.scheduler})
        self.global_step = self.state["global_step"]
        self.batches.load_state_dict(self.state["data"])
        if self.metrics is not None:
            self.metrics.truncate_after(self.global_step)
            print(f"plait: resumed from {path} at step {self.global_step}"
                  + (f" on {self.dist.world_size} ranks" if self.dist.active else ""),
                  flush=True)
        return True

    def run(self) -> dict:
        cfg, section, main = self.config, self.section, self.dist.is_main
        started = time.time()
        resumed = self.resume()
        if main:
            write_text_atomic(self.run_dir / "config.yaml", dump_yaml(cfg))
        if not resumed:
            self.log(0, self._evaluate("before"))
        bar = ProgressBar(section.steps, self.COMMAND, initial=self.global_step,
                          disable=None if cfg.run.progress else True, silent=not main)
        first = self.global_step + 1
        while self.global_step < section.steps:
            metrics = self.step()
            self.global_step += 1
            if self.global_step == first:
                heap.settle()  # models, optimizer state and compiled layers are set up
            if section.eval_every and self.global_step % section.eval_every == 0 \
                    and self.global_step < section.steps:
                metrics.update(self._evaluate(f"step_{self.global_step}"))
            self.log(self.global_step, metrics)
            bar.update(1, **self.shown(metrics))
            if cfg.train.save_every and self.global_step % cfg.train.save_every == 0:
                self.save()
        bar.close()
        self.log(self.global_step, self._evaluate("final"))
        self.save()
        self.dist.barrier()
        return self.finish(started) if main else {}

    def finish(self, started: float) -> dict:
        evals = self.state["evals"]
        summary = {"steps": self.global_step, **self.data_summary(),
                   "dropped_rows": dict(self.dropped),
                   **{f"{key.removeprefix('eval/')}_before": value
                      for key, value in evals["before"].items()},
                   **{f"{key.removeprefix('eval/')}_after": value
                      for key, value in evals["final"].items()},
                   "wall_time_s": round(time.time() - started, 2)}
        if self.dist.active:
            summary["ranks"] = self.dist.world_size
        self.metrics.flush()
        self.write_outputs(summary)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        heap.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def metrics_logger(config: Config, run_dir: Path, *, run_name: str | None = None,
                   tracker_dir: Path | None = None) -> MetricsLogger:
    """A job's metrics logger (rank 0's): metrics.jsonl plus the sinks of run.report_to,
    whose trackers record the resolved config."""
    return MetricsLogger(run_dir, tensorboard=config.run.tensorboard,
                         report_to=config.run.report_to, config=config_to_dict(config),
                         run_name=run_name, tracker_dir=tracker_dir)


def check_runtime(command: str, config: Config) -> None:
    """The runtime settings a supervised job can run under."""
    runtime = config.runtime
    if runtime.placement != "colocated":
        raise ConfigError(f"plait {command} trains one model on every rank; leave "
                          "runtime.placement at 'colocated'")
    if runtime.data_parallel == "fsdp" and runtime.num_ranks > 1:
        raise ConfigError(f"plait {command} replicates the model on each rank; set "
                          "runtime.data_parallel=ddp")


def run_step_job(job_class, config: Config, rank_fn) -> dict:
    """Run ``job_class`` on ``config``: in this process, or as runtime.num_ranks local
    processes (through Ray with runtime.launcher=ray), each calling ``rank_fn(config,
    world)``, a module-level function (rank processes import it by name) that calls
    :func:`rank_job`; the summary."""
    check_runtime(job_class.COMMAND, config)
    runtime = config.runtime
    if runtime.num_ranks > 1 or runtime.launcher == "ray":
        from plait.runtime.launchers import launch

        return launch(config, rank_fn)
    with job_class(config) as job:
        return job.run()


def rank_job(job_class, config: Config, world: Dist) -> dict:
    """One rank's part of a launched job."""
    with job_class(config, dist=world) as job:
        return job.run()
