"""What a training job holds besides its step: run directory, seeds, models, data,
rewards, the generator, evaluation, checkpoints and resume, metrics and the summary.
Recipes subclass :class:`Session` and define ``step(step) -> metrics``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from plait.algos import NEEDS_CRITIC
from plait.config import ConfigError, config_to_dict, derive, dump_yaml
from plait.evals.suites import build_eval_sets, run_eval_set
from plait.evals.suites import flatten as flatten_suites
from plait.models.loading import save_model_dir
from plait.parallel import fsdp
from plait.parallel.dist import Dist
from plait.parallel.heartbeat import report, step_done
from plait.recipes import checkpointing
from plait.recipes.sft import warm_start
from plait.recipes.stepjob import metrics_logger
from plait.rollout.base import SamplingParams
from plait.runtime import heap, inputs
from plait.runtime.generation import Generator
from plait.runtime.run_dir import (
    built_tiny_model,
    check_run_dir,
    describe_changes,
    mark_run_dir,
)
from plait.telemetry.metrics import read_metrics
from plait.telemetry.plots import plot_metrics, plot_stage_timeline
from plait.telemetry.progress import ProgressBar
from plait.telemetry.summary import write_json_atomic, write_text_atomic
from plait.train.checkpoint import latest_checkpoint
from plait.train.models import TrainModels
from plait.train.update import SkipCount


class Session:
    """The state of one job, built from a :class:`Config`."""

    def __init__(self, config, callbacks=(), *, prepare_run_dir: bool = True,
                 dist: Dist | None = None):
        self.config = config
        self.settings = derive(config)
        self.callbacks = list(callbacks)
        self.dist = dist or Dist.single()
        self.run_dir = Path(config.run.dir)
        prepare_run_dir = prepare_run_dir and self.dist.is_main  # one writer per job
        if prepare_run_dir:
            self._prepare_run_dir()
        self.dist.barrier()  # the run directory is settled before any rank reads it
        if not prepare_run_dir:
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise ConfigError(f"run.dir {str(self.run_dir)!r} is a file, not a directory")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = inputs.configure_process(config, self.dist)
        self.task = inputs.job_task(config)
        self.reward_low, self.reward_high = inputs.reward_range(config, self.task)
        self.model_dir, self.tokenizer, policy = inputs.load_policy(config, self.dist,
                                                                    self.run_dir)
        self.models = TrainModels(config, self.dist, self.device, policy)
        self.encode_prompt = inputs.PromptEncoder(self.tokenizer, config.model.chat_template)
        prompts = inputs.load_prompts(config, self.task, self.encode_prompt)
        self.train_rows, self.eval_rows = prompts.train_rows, prompts.eval_rows
        self.train_iter = prompts.train_iter
        rewards = inputs.build_rewards(config, self.task, self.device)
        try:
            # sharded trainers (evaluating under a placement with rollout workers apart)
            # generate through FSDP's gathered layers, which torch.compile does not trace
            engine = inputs.engine_for(config, self.models.policy, self.tokenizer,
                                       self.model_dir, compile=not self.models.sharded)
        except ConfigError:
            rewards.close()
            raise
        release = config.rollout.release_kv_cache  # null: on CUDA, where memory is short
        self.generator = Generator(
            config, engine, rewards, self.tokenizer, self.device,
            encode_prompt=self.encode_prompt, autocast=self.models.autocast,
            gathered=lambda: self.models.gathered(self.models.policy),
            fused_forwards=self.fused_forwards,
            releases_kv_cache=self.device.type == "cuda" if release is None else release,
            diverged=self._diverged_message)
        self.global_step = 0
        self.skips = SkipCount()
        self.state: dict = {"evals": {}}
        self._eval_sets = None  # eval.suites, built when first evaluated
        self.suite_results: dict[str, dict[str, float]] = {}
        self.metrics = metrics_logger(config, self.run_dir) if prepare_run_dir else None

    # the models and the engine, by their usual names
    policy = property(lambda self: self.models.policy)
    reference = property(lambda self: self.models.reference)
    critic = property(lambda self: self.models.critic)
    optimizers = property(lambda self: self.models.optimizers)
    engine = property(lambda self: self.generator.engine)
    rewards = property(lambda self: self.generator.rewards)
    nan_skips = property(lambda self: self.skips.total)

    def named_trainable_models(self):
        return self.models.named_trainable_models()

    # ------------------------------------------------------------------ setup

    def _prepare_run_dir(self) -> None:
        """Settle the run directory before anything is built (rank 0): refuse a run.dir
        plait must not use (:func:`check_run_dir`), apply run.overwrite, refuse what cannot
        start here, and mark the run as plait's (:func:`mark_run_dir`: a launched job's
        launcher did already). An existing run's files are left as they are: its record
        (config.yaml) changes in :meth:`record_start`, once the job really starts."""
        run = self.config.run
        check_run_dir(self.config)
        if run.overwrite and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        has_checkpoint = self.checkpoint_root.is_dir() and \
            latest_checkpoint(self.checkpoint_root) is not None
        if run.resume == "never" and has_checkpoint:
            raise ConfigError(f"run.dir {str(self.run_dir)!r} already holds checkpoints and "
                              "run.resume is 'never'; pick a new run.dir or set run.overwrite=true")
        if not has_checkpoint:  # resuming compares the whole config with the checkpoint's
            self._check_tiny_model()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mark_run_dir(self.run_dir)

    def _check_tiny_model(self) -> None:
        """A tiny model already built under the run directory (by a start that ended
        before its first checkpoint) is reused only when model.tiny still describes it;
        otherwise the start is refused: the directory's other outputs (sft_model/,
        metrics) came from that model too."""
        if self.config.model.path != "tiny":
            return
        built = built_tiny_model(self.run_dir)
        if built is None:
            return
        wanted = config_to_dict(self.config)["model"]["tiny"]
        changes = [(f"model.tiny.{key}", value, wanted[key]) for key, value in built.items()
                   if value is not None and value != wanted[key]]
        if changes:
            raise ConfigError(f"run.dir {str(self.run_dir)!r} holds a tiny model built with "
                              f"other settings ({describe_changes(changes)}); start fresh with "
                              "run.overwrite=true or a new run.dir, or set them back")

    def record_start(self) -> None:
        """The job really starts (resumed or fresh, about to warm-start or step): write its
        config.yaml (atomically), by the process that writes the run's records (rank 0,
        the one with a metrics logger)."""
        if self.metrics is None:
            return
        write_text_atomic(self.run_dir / "config.yaml", dump_yaml(self.config))

    def setup_training(self, *, resuming: bool = False, load_weights=None) -> None:
        """Reference model, critic and optimizers, once the starting policy is final. The
        reference is model.ref_path, else (on resume) the saved warm-started model, else a
        frozen copy of the starting policy (built with the rollout workers under the
        partial placement). ``load_weights`` (resume) loads the saved weights once every
        model exists."""
        config = self.config
        algo = config.algo
        self.models.prepare(
            reference=self.settings.uses_reference and config.runtime.placement != "partial",
            reference_dir=self.state.get("reference_dir") if resuming else None,
            critic=self.settings.advantage in NEEDS_CRITIC,
            total_steps=config.train.steps * algo.epochs * algo.mini_batches,
            load_weights=load_weights)

    def fused_forwards(self, chunk):
        """Per-token tensors ``[rows, R]`` computed on finished groups during generation;
        recipes override this (the base session computes none)."""
        return {}

    def _diverged_message(self) -> str:
        return (f"the policy produced NaN/inf probabilities while generating after step "
                f"{self.global_step}: the weights diverged (lower optim.lr or set "
                f"optim.max_grad_norm). The last complete checkpoint in "
                f"{self.checkpoint_root} is intact")

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy accuracy and mean reward on the held-out rows."""
        train = self.config.train
        params = SamplingParams(
            max_new_tokens=train.eval_max_new_tokens or self.config.rollout.max_new_tokens,
            temperature=0.0, stop=tuple(self.config.rollout.stop))
        report(f"evaluate ({tag})")
        lo, hi = self.dist.shard_bounds(len(self.eval_rows))
        with torch.random.fork_rng(devices=[]):
            next_id = self.generator.next_group_id
            batch = self.generator.rollout(self.eval_rows[lo:hi], params, 1)
            self.generator.next_group_id = next_id
            rewards = batch.rewards.double().cpu()
        names = self.generator.rewards.names
        # one row of sums per source when the held-out rows name several (a mixed task's
        # sub-tasks, a dataset's origins), else one row; the whole is their sum
        sources = sorted({str(row.get("source")) for row in self.eval_rows})
        if len(sources) < 2 or any(row.get("source") is None for row in self.eval_rows):
            sources = []
        index = {source: i for i, source in enumerate(sources)}
        terms = batch.reward_terms.double().cpu() if batch.reward_terms is not None else \
            torch.zeros((len(rewards), len(names)), dtype=torch.float64)
        values = torch.cat([torch.stack([(rewards >= self.reward_high - 1e-6).double(),
                                         rewards, batch.response_lengths.double().cpu(),
                                         torch.ones_like(rewards)], 1), terms], 1)
        group = torch.tensor([index[str(row["source"])] if sources else 0
                              for row in self.eval_rows[lo:hi]], dtype=torch.long)
        sums = torch.zeros((max(len(sources), 1), values.shape[1]), dtype=torch.float64)
        sums.index_add_(0, group, values)
        self.dist.all_reduce(sums, kind="metrics")
        result = self._eval_means(sums.sum(0), names, "")
        for source, row in zip(sources, sums if sources else [], strict=True):
            result.update({key: value for key, value in
                           self._eval_means(row, names, f"/{source}").items()
                           if "response_length" not in key})
        if self.config.eval.suites:
            self.suite_results = self.evaluate_suites()
            result.update(flatten_suites(self.suite_results))
        self.state["evals"][tag] = result
        return result

    def evaluate_suites(self) -> dict[str, dict[str, float]]:
        """Each of eval.suites' results (see :mod:`plait.evals.suites`)."""
        if self._eval_sets is None:
            self._eval_sets = build_eval_sets(self)
        results = {}
        for eval_set in self._eval_sets:
            report(f"eval set {eval_set.name}")
            results[eval_set.name] = run_eval_set(self, eval_set)
        return results

    @staticmethod
    def _eval_means(sums: torch.Tensor, names: list[str], suffix: str) -> dict[str, float]:
        """Held-out means from summed ``[right, reward, length, count, term...]``:
        ``eval/accuracy``, ``eval/reward``, ``eval/response_length`` and, with several
        reward functions, ``eval/reward_fn/NAME``, each key ending in ``suffix``."""
        count = max(float(sums[3]), 1.0)
        result = {f"eval/accuracy{suffix}": float(sums[0]) / count,
                  f"eval/reward{suffix}": float(sums[1]) / count,
                  f"eval/response_length{suffix}": float(sums[2]) / count}
        if len(names) > 1:  # each function's mean (a weight-0 one: a score to watch)
            result.update({f"eval/reward_fn/{name}{suffix}": float(sums[4 + i]) / count
                           for i, name in enumerate(names)})
        return result

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes; every rank holds the same weights and optimizer
        state, and the data position is global)."""
        return checkpointing.save(self)

    def try_resume(self) -> bool:
        """Resume from the newest intact checkpoint when there is one (run.resume)."""
        return checkpointing.resume(self)

    # ------------------------------------------------------------------ the job

    def warm_start(self) -> None:
        """Evaluate the initial model, run the SFT warm start, and freeze a reference."""
        warm_start(self)
        self.setup_training()

    def run(self) -> dict:
        cfg = self.config
        started = time.time()
        resumed = self.try_resume()
        self.record_start()
        if not resumed:
            self.warm_start()
            self.state["evals"]["before"] = dict(self.latest_eval())
            self.log_metrics(0, self.state["evals"]["before"])
        self.on_start()
        bar = ProgressBar(cfg.train.steps, cfg.algo.name, initial=self.global_step,
                          disable=None if cfg.run.progress else True,
                          silent=not self.dist.is_main)
        rl_started = time.time()
        tokens = 0.0
        first = self.global_step + 1
        while self.global_step < cfg.train.steps:
            report(f"step {self.global_step + 1}")
            step_started = time.perf_counter()
            metrics = self.step(self.global_step)
            step_done(time.perf_counter() - step_started)
            self.global_step += 1
            if self.global_step == first:
                heap.settle()  # models, optimizer state and compiled code are set up
            self._record_timeline(metrics.pop("_spans", None))
            tokens += metrics.get("tokens", 0.0)
            if cfg.train.eval_every and self.global_step % cfg.train.eval_every == 0 \
                    and self.global_step < cfg.train.steps:
                metrics.update(self.evaluate(f"step_{self.global_step}"))
            self.log_metrics(self.global_step, metrics)
            bar.update(1, reward=metrics.get("reward/mean", float("nan")),
                       acc=metrics.get("train/accuracy", float("nan")),
                       tok_s=metrics.get("throughput/tokens_per_s", 0.0))
            if cfg.train.save_every and self.global_step % cfg.train.save_every == 0:
                self.save()
            for callback in self.callbacks:
                callback(self, self.global_step, metrics)
        bar.close()
        rl_seconds = time.time() - rl_started
        final = self.evaluate("final")
        self.log_metrics(self.global_step, final)
        if self.models.ema is not None:
            self.log_metrics(self.global_step, self.evaluate_ema())
        self.save()
        report("finishing")
        return self.finish(started, rl_seconds, tokens)

    def evaluate_ema(self) -> dict[str, float]:
        """The held-out evaluation of the policy's weight average (algo.ema_decay), logged
        as ``eval_ema/...``; rank 0 saves the average as ``ema_model/``."""
        with self.models.ema_weights():
            result = self.evaluate("final_ema")
        if self.dist.is_main:
            save_model_dir(self.models.ema, self.tokenizer, self.run_dir / "ema_model")
        return {key.replace("eval/", "eval_ema/", 1): value for key, value in result.items()}

    def on_start(self) -> None:
        """Called once the starting weights are final, before the first step."""

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Log ``metrics`` and keep the running totals the summary reports (in the trainer
        state, so a resumed run's totals stop at its checkpoint, as its metrics do)."""
        failures = int(metrics.get("reward_failures") or 0)
        if failures:
            self.state["reward_failures"] = self.state.get("reward_failures", 0) + failures
        if self.metrics is not None:
            self.metrics.log(step, metrics)

    def _record_timeline(self, spans) -> None:
        """Append this step's stage spans (seconds from the step's start) to timeline.jsonl."""
        if spans is None or self.metrics is None:
            return
        start = min(s for _, s, _ in spans)
        record = {"step": self.global_step,
                  "spans": [[name, round(s - start, 6), round(e - start, 6)]
                            for name, s, e in spans]}
        with open(self.run_dir / "timeline.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def latest_eval(self) -> dict[str, float]:
        evals = self.state["evals"]
        return evals.get("after_sft") or evals["initial"]

    def finish(self, started: float, rl_seconds: float, tokens: float) -> dict:
        evals = self.state["evals"]
        before = evals["before"]["eval/accuracy"]
        after = evals["final"]["eval/accuracy"]
        summary = {
            "algo": self.config.algo.name,
            "steps": self.global_step,
            "accuracy_initial": evals["initial"]["eval/accuracy"],
            "accuracy_before": before,
            "accuracy_after": after,
            "accuracy_gain_points": round(100 * (after - before), 2),
            "reward_before": evals["before"]["eval/reward"],
            "reward_after": evals["final"]["eval/reward"],
            "wall_time_s": round(time.time() - started, 2),
            "rl_time_s": round(rl_seconds, 2),
            "rl_tokens_per_s": round(tokens / rl_seconds, 1) if rl_seconds > 0 else None,
            "nan_skips": self.skips.total,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }
        sets = tuple(f"eval/{suite.name}/" for suite in self.config.eval.suites)
        for key, value in evals["before"].items():  # each reward function and eval set
            if key.startswith(("eval/reward_fn/", *sets)) and key in evals["final"]:
                name = key.removeprefix("eval/")
                summary[f"{name}_before"] = value
                summary[f"{name}_after"] = evals["final"][key]
        if "after_sft" in evals:
            summary["accuracy_after_sft"] = evals["after_sft"]["eval/accuracy"]
        if "final_ema" in evals:
            summary["accuracy_after_ema"] = evals["final_ema"]["eval/accuracy"]
            summary["reward_after_ema"] = evals["final_ema"]["eval/reward"]
        if self.dist.active:
            summary["ranks"] = self.dist.world_size
            summary["controller"] = self.config.runtime.controller
            summary["data_parallel"] = self.config.runtime.data_parallel
        held = fsdp.model_state_bytes((self.policy, self.critic, self.reference),
                                      self.optimizers.values())
        summary["model_state_mb_per_rank"] = {k: round(v / 2**20, 2) for k, v in held.items()}
        summary["controller_traffic_bytes"] = self.dist.traffic.total(exclude=("gradients",))
        summary["gradient_traffic_bytes"] = self.dist.traffic.total() - \
            summary["controller_traffic_bytes"]
        # samples of the RL steps that got reward.fallback_reward, summed over ranks
        summary["reward_failures"] = int(self.state.get("reward_failures", 0))
        if not self.dist.is_main:
            return summary
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.metrics.flush()
        records = read_metrics(self.run_dir / "metrics.jsonl")
        plot_metrics(records, self.run_dir / "metrics.png",
                     title=f"{self.config.algo.name} on {self.config.data.task or 'data'}")
        timeline = self.run_dir / "timeline.jsonl"
        if timeline.is_file():
            steps = [json.loads(line) for line in timeline.read_text().splitlines()[-5:]]
            plot_stage_timeline(steps, self.run_dir / "timeline.png",
                                title="stage timeline (last steps)")
        return summary

    def close(self) -> None:
        # stopping (an error, Ctrl-C) never waits for rewards (see Generator.close)
        self.generator.close()
        for eval_set in self._eval_sets or ():
            eval_set.close()
        if self.metrics is not None:
            self.metrics.close()
        heap.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError
