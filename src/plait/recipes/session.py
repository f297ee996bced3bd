"""Everything a training job holds besides its step: run directory, seeds,
models, data, rewards, engine, optimizers, evaluation, checkpoints, resume,
metrics and the summary. Recipes subclass :class:`Session` and define
``step(step) -> metrics``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plait.config import (
    BUILTIN_REWARD_NAMES,
    Config,
    ConfigError,
    advantage_estimator,
    config_to_dict,
    dump_yaml,
    uses_reference,
)
from plait.data.datasets import PromptIterator, load_prompt_rows
from plait.data.tasks import make_task
from plait.errors import TrainingDiverged
from plait.models.loading import (
    ValueModel,
    format_prompt,
    freeze,
    load_causal_lm,
    load_critic,
    load_tokenizer,
    quiet_transformers,
    resolve_model_dir,
)
from plait.parallel import fsdp
from plait.parallel.dist import Dist
from plait.parallel.heartbeat import report, step_done
from plait.recipes.sft import check_sft_rows, supervised_warm_start
from plait.rewards import RewardManager
from plait.rollout import build_engine
from plait.rollout.base import Completion, SamplingParams
from plait.runtime.run_dir import (
    RESUME_SAFE_KEYS,
    built_tiny_model,
    check_run_dir,
    config_changes,
    describe_changes,
    mark_run_dir,
    recorded_config,
)
from plait.telemetry.metrics import MetricsLogger, read_metrics
from plait.telemetry.plots import plot_metrics, plot_stage_timeline
from plait.telemetry.progress import ProgressBar
from plait.telemetry.summary import write_json_atomic, write_text_atomic
from plait.telemetry.timing import StageTimer
from plait.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from plait.train.experience import Experience, experience_from_completions
from plait.train.optim import build_optimizer


@dataclass
class PendingBatch:
    """A batch being generated: its rows and encoded prompts, the groups finished so far,
    their reward futures, and the fused forward outputs of finished groups."""

    rows: list[dict]
    prompts: list[list[int]]
    score: bool = True
    fuse: bool = False
    groups: list = field(default_factory=list)
    futures: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)
    unfused: list[int] = field(default_factory=list)  # finished, fused passes not yet run
    done: int = 0

    def __post_init__(self):
        self.groups = [None] * len(self.rows)

    @property
    def complete(self) -> bool:
        return self.done == len(self.rows)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; "
                          "use train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Session:
    """The state of one job, built from a :class:`Config`."""

    def __init__(self, config: Config, callbacks=(), *, prepare_run_dir: bool = True,
                 dist: Dist | None = None):
        self.config = config
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
        train = config.train
        if train.threads:
            torch.set_num_threads(train.threads)
        elif os.environ.get("PLAIT_THREADS"):  # the launcher's share of cores per rank
            torch.set_num_threads(int(os.environ["PLAIT_THREADS"]))
        elif self.dist.active:  # ranks on one machine share its cores
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(train.seed)
        quiet_transformers()
        self.device = pick_device(train.device)
        if self.device.type == "cuda" and self.dist.active:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.task = make_task(config.data.task, **config.data.task_args) \
            if config.data.task else None
        self._set_reward_range()
        if self.dist.is_main:  # rank 0 builds the tiny model; the others load it
            resolve_model_dir(config.model, self.run_dir)
        self.dist.barrier()
        self.model_dir = resolve_model_dir(config.model, self.run_dir)
        self.tokenizer = load_tokenizer(self.model_dir, key="model.path")
        self.policy = load_causal_lm(self.model_dir, config.model.attn_implementation,
                                     key="model.path")
        self._twins: dict = {}  # parameter-free copies of sharded models, for saving
        if self.sharded:  # loaded on the CPU, only this rank's shards go to the device
            self._twins["policy"] = fsdp.meta_twin(self.policy)
            fsdp.shard(self.policy, self.mesh, self.fsdp_compute_dtype)
        else:
            self.policy.to(self.device)
        self.policy.eval()  # dropout off: a batch's first-epoch ratio is exactly 1
        self._prompt_cache: dict[str, list[int]] = {}
        self._load_data()
        self.rewards = RewardManager(
            [(f.fn, f.weight) for f in config.reward.functions], task=self.task,
            timeout_s=config.reward.timeout_s, on_error=config.reward.on_error,
            fallback_reward=config.reward.fallback_reward,
            import_timeout_s=config.reward.import_timeout_s,
            max_consecutive_timeouts=config.reward.max_consecutive_timeouts)
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-reward")
        try:
            # sharded trainers (evaluating under a placement with rollout workers apart)
            # generate through FSDP's gathered layers, which torch.compile does not trace
            self.engine = build_engine(config.rollout, self.policy, self.tokenizer,
                                       compile=config.rollout.compile and not self.sharded)
        except ValueError as err:
            self.close()
            raise ConfigError(f"model {str(self.model_dir)!r}: {err}") from None
        self.reference = None
        self.critic = None
        self.optimizers: dict = {}
        self.schedulers: dict = {}
        self.global_step = 0
        self.nan_skips = 0
        self.consecutive_nan_skips = 0
        self.state: dict = {"evals": {}}
        self.metrics = MetricsLogger(self.run_dir, tensorboard=config.run.tensorboard) \
            if prepare_run_dir else None
        self._next_group_id = 0

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

    def _load_data(self) -> None:
        data = self.config.data
        seed = self.config.train.seed
        if data.train_path is not None:
            rows = load_prompt_rows(data.train_path, split=data.split, fields=data.fields or None)
            if data.eval_path is not None:
                eval_rows = load_prompt_rows(data.eval_path, split=data.split,
                                             fields=data.fields or None)[: data.num_eval]
            else:
                if len(rows) <= data.num_eval:
                    raise ConfigError(f"data.train_path has {len(rows)} rows, not enough to hold "
                                      f"out data.num_eval={data.num_eval}; set data.eval_path or "
                                      "lower data.num_eval")
                eval_rows, rows = rows[-data.num_eval:], rows[: -data.num_eval]
        else:
            rows = self.task.make_rows(data.num_train, seed=seed, split="train")
            eval_rows = self.task.make_rows(data.num_eval, seed=seed, split="test")
        self._check_prompt_lengths(rows, "train")
        self._check_prompt_lengths(eval_rows, "eval")
        self.train_rows, self.eval_rows = rows, eval_rows
        self.train_iter = PromptIterator(rows, seed=seed)

    def _check_prompt_lengths(self, rows: list[dict], which: str) -> None:
        limit = self.config.data.max_prompt_tokens
        for index, row in enumerate(rows):
            n = len(self.encode_prompt(row["prompt"]))
            if n > limit:
                raise ConfigError(f"{which} row {index + 1}: prompt has {n} tokens, more than "
                                  f"data.max_prompt_tokens={limit}; raise the limit or drop "
                                  "the row")

    def _set_reward_range(self) -> None:
        algo = self.config.algo
        if algo.reward_range is not None:
            low, high = algo.reward_range
        elif self.task is not None and all(f.fn in BUILTIN_REWARD_NAMES
                                           for f in self.config.reward.functions):
            weights = [f.weight for f in self.config.reward.functions]
            low = sum(min(w * self.task.reward_range[0], w * self.task.reward_range[1])
                      for w in weights)
            high = sum(max(w * self.task.reward_range[0], w * self.task.reward_range[1])
                       for w in weights)
        elif algo.reward_adjust == "grpovi":
            raise ConfigError("algo.reward_adjust=grpovi needs the reward's range: set "
                              "algo.reward_range=[low, high] for user reward functions")
        else:
            low, high = 0.0, 1.0
        if algo.overlong_buffer > 0:
            low -= algo.overlong_penalty
        self.reward_low, self.reward_high = float(low), float(high)

    def setup_training(self, *, resuming: bool = False, load_weights=None) -> None:
        """Reference model, critic and optimizers, once the starting policy is final. The
        reference is model.ref_path, else (on resume) the saved warm-started model, else a
        frozen copy of the starting policy. ``load_weights`` (resume) loads the saved
        weights once every model exists. Under runtime.data_parallel=fsdp, models read
        from disk are sharded from the CPU and copies of the policy are made shard by
        shard: no rank ever holds one whole."""
        config = self.config
        algo = config.algo
        if self.uses_reference and config.runtime.placement != "partial":
            self.build_reference(self.state.get("reference_dir") if resuming else None)
        if self.advantage_estimator == "gae":
            hidden = self.policy.config.hidden_size
            if config.model.critic_path:
                self.critic = self._placed(load_critic(config.model.critic_path,
                                                       config.model.attn_implementation),
                                           "critic")
            elif self.sharded:  # one twin to keep for saving, one to become the critic
                twins = [ValueModel(fsdp.meta_twin(self.policy.base_model), hidden)
                         for _ in range(2)]
                self._twins["critic"] = twins[0]
                self.critic = fsdp.sharded_copy(self.policy.base_model, twins[1], self.mesh,
                                                prefix="backbone.",
                                                compute_dtype=self.fsdp_compute_dtype)
            else:
                backbone = copy.deepcopy(self.policy.base_model)
                self.critic = ValueModel(backbone, hidden).to(self.device)
            self.critic.eval()
        if load_weights is not None:
            load_weights()
        total = config.train.steps * algo.epochs * algo.mini_batches
        self.optimizers["policy"], self.schedulers["policy"] = build_optimizer(
            self.policy.parameters(), config.optim, total_steps=total)
        if self.critic is not None:
            self.optimizers["critic"], self.schedulers["critic"] = build_optimizer(
                self.critic.parameters(), config.optim, lr=config.optim.critic_lr or config.optim.lr,
                total_steps=total)
        self.policy.train()

    @property
    def sharded(self) -> bool:
        """Whether trainer ranks shard the models (runtime.data_parallel=fsdp)."""
        return self.config.runtime.data_parallel == "fsdp" and self.dist.active

    @property
    def fsdp_compute_dtype(self) -> torch.dtype | None:
        """Sharded models gather their parameters in bfloat16 when model.dtype asks for
        bfloat16 compute (FSDP2 mixed precision; shards and optimizer stay float32)."""
        return torch.bfloat16 if self.config.model.dtype == "bfloat16" else None

    @functools.cached_property
    def mesh(self):
        """The device mesh the sharded models live on: the job's trainer ranks."""
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self.dist.group or torch.distributed.group.WORLD,
                                     self.device.type)

    def _placed(self, model, name: str | None = None):
        """A model read from disk (on the CPU) on this rank's device: sharded under FSDP
        (``name``: keep a parameter-free twin of it for saving), else moved whole."""
        if not self.sharded:
            return model.to(self.device)
        if name is not None:
            self._twins[name] = fsdp.meta_twin(model)
        return fsdp.shard(model, self.mesh, self.fsdp_compute_dtype)

    def _load_sharded_weights(self, path: Path) -> None:
        """Resume under FSDP: each trainable model's saved weights are read into its
        twin on the CPU (with the usual checks) and copied into the shards."""
        for name, model in self.named_trainable_models():
            twin = self._twins[name]
            twin.to_empty(device="cpu")
            if hasattr(twin, "tie_weights"):
                twin.tie_weights()
            try:
                load_checkpoint(path, models={name: twin}, restore_rng=False)
                fsdp.load_full_weights(model, twin.state_dict())
            finally:
                fsdp.release(twin)

    def gathered(self, *models):
        """Full parameters of the sharded ``models`` inside (a no-op without sharding)."""
        return fsdp.gathered(*models) if self.sharded else contextlib.nullcontext()

    @property
    def uses_reference(self) -> bool:
        """Whether the job needs reference log-probs (KL, or GRPOVI's reference weights)."""
        return uses_reference(self.config)

    def build_reference(self, saved_dir: str | None) -> None:
        """model.ref_path, else ``saved_dir`` (the warm-started model), else a frozen copy
        of the current policy."""
        ref_dir = self.config.model.ref_path or saved_dir
        if ref_dir:
            key = "model.ref_path" if self.config.model.ref_path else None
            self.reference = freeze(self._placed(load_causal_lm(
                ref_dir, self.config.model.attn_implementation, key=key)))
        elif self.sharded:
            self.reference = freeze(fsdp.sharded_copy(
                self.policy, copy.deepcopy(self._twins["policy"]), self.mesh,
                compute_dtype=self.fsdp_compute_dtype))
        else:
            self.reference = freeze(copy.deepcopy(self.policy))

    def trainable_models(self):
        return [m for _, m in self.named_trainable_models()]

    def named_trainable_models(self):
        models = [("policy", self.policy)]
        if self.critic is not None:
            models.append(("critic", self.critic))
        return models

    def autocast(self):
        """bfloat16 compute over float32 master weights when model.dtype asks for it."""
        if self.config.model.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def train_temperature(self) -> float:
        t = self.config.rollout.temperature
        return t if t > 0 else 1.0

    @property
    def loss_norm_constant(self) -> float:
        return self.config.algo.loss_norm_constant or float(self.config.rollout.max_new_tokens)

    @property
    def advantage_estimator(self) -> str:
        return advantage_estimator(self.config)

    # ------------------------------------------------------------------ rollout & rewards

    def encode_prompt(self, text: str) -> list[int]:
        ids = self._prompt_cache.get(text)
        if ids is None:
            ids = format_prompt(self.tokenizer, text, self.config.model.chat_template)
            self._prompt_cache[text] = ids
        return ids

    def rollout(self, rows: list[dict], params: SamplingParams, n: int,
                timer: StageTimer | None = None, *, fuse: bool = False, first_index: int = 0,
                total: int | None = None, seeds: list[int] | None = None,
                score: bool = True) -> Experience:
        """Generate ``n`` completions per row and score them. Each row's completions share
        a group id; ``batch.rewards`` holds the total reward, ``batch.reward_failures`` the
        count of failed reward calls.

        ``rows`` may be one rank's shard of a global batch of ``total`` rows starting at
        ``first_index``: group ids are then global (``first_index + i`` past the ids of
        earlier batches). ``seeds`` (one per row) make each row's samples a function of its
        seed alone, whatever batch or rank generates them. ``score=False`` skips rewards
        (the single controller scores on rank 0).

        With a streaming engine, each group's rewards are computed (in a helper thread, so
        user functions in the reward worker run alongside generation) the moment its last
        sample finishes, while the long tail is still generating. With ``fuse``, the
        forward passes of :meth:`fused_forwards` (reference log-probs, critic values) also
        run on finished groups between decode steps, a micro-batch at a time."""
        timer = timer or StageTimer()
        pending = self.pending_batch(rows, score=score, fuse=fuse)
        with timer.stage("generate"), self._diverged_generation(), self.gathered(self.policy):
            for index, group in self._generated_groups(pending.prompts, params, n, seeds):
                self.take_group(pending, index, group, timer)
        batch = self.finish_batch(pending, timer, first_index=first_index, total=total)
        if self.releases_kv_cache and hasattr(self.engine, "release"):
            self.engine.release()  # hybrid engine: the KV cache makes room for training
        return batch.to(self.device)

    @property
    def releases_kv_cache(self) -> bool:
        """Whether the engine's KV cache is freed after each generation (rollout.
        release_kv_cache; null = on CUDA) so that training in this process can use it."""
        release = self.config.rollout.release_kv_cache
        return self.device.type == "cuda" if release is None else release

    def pending_batch(self, rows: list[dict], *, score: bool = True, fuse: bool = False
                      ) -> PendingBatch:
        """A batch of ``rows`` whose groups are about to be generated."""
        return PendingBatch(rows, [self.encode_prompt(row["prompt"]) for row in rows],
                            score=score, fuse=fuse)

    def take_group(self, pending: PendingBatch, index: int, group: list[Completion],
                   timer: StageTimer) -> None:
        """Group ``index`` of ``pending`` has finished generating: start its rewards (in a
        helper thread) and, with ``fuse``, the fused forward passes of a micro-batch of
        finished groups while the engine still has work."""
        pending.groups[index] = group
        pending.done += 1
        if pending.score:
            _raise_first_failure(pending.futures.values())  # a failed reward ends it now
            pending.futures[index] = self._reward_pool.submit(self._score_group,
                                                              pending.rows[index], group)
        pending.unfused.append(index)
        if pending.fuse and len(pending.unfused) * len(group) >= \
                self.config.algo.micro_batch_size and getattr(self.engine, "busy", False):
            with timer.stage("fused_forwards"):
                self._fuse(pending.prompts, pending.groups, pending.unfused, pending.fused)
            pending.unfused = []

    def finish_batch(self, pending: PendingBatch, timer: StageTimer, *, first_index: int = 0,
                     total: int | None = None) -> Experience:
        """The experience of a completely generated ``pending`` batch: group ids (global
        when it is one rank's shard of ``total`` rows starting at ``first_index``), texts,
        rewards (waiting for the last ones) and fused tensors."""
        first_id = self._next_group_id + first_index
        self._next_group_id += len(pending.rows) if total is None else total
        return self.finish_groups(pending, list(range(len(pending.rows))), timer, first_id)

    def finish_groups(self, pending: PendingBatch, indices: list[int], timer: StageTimer,
                      first_id: int) -> Experience:
        """The experience of finished groups ``indices`` of ``pending`` (group ``i`` gets id
        ``first_id + i``): texts, rewards (waiting for them) and fused tensors (running the
        passes not yet run on them)."""
        groups = [pending.groups[i] for i in indices]
        prompts = [pending.prompts[i] for i in indices]
        batch = experience_from_completions(prompts, groups, [first_id + i for i in indices],
                                            self.tokenizer.pad_token_id)
        batch.texts = [c.text for group in groups for c in group]
        if pending.score:
            with timer.stage("reward_wait"):  # the first failure ends the wait, whichever group
                futures = [pending.futures[i] for i in indices]
                concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
                _raise_first_failure(futures)
                timed = [future.result() for future in futures]
            results = [result for result, _, _ in timed]
            timer.times["reward_compute"] = timer.times.get("reward_compute", 0.0) + sum(
                r.seconds for r in results)
            timer.spans.extend(("reward", start, end) for _, start, end in timed)
            batch.rewards = torch.cat([r.total for r in results])
            batch.reward_failures = sum(r.num_failures for r in results)
        if pending.fused:  # some groups' passes ran during generation: run the rest's
            missing = [i for i in indices if i not in pending.fused]
            if missing:
                with timer.stage("fused_forwards"):
                    self._fuse(pending.prompts, pending.groups, missing, pending.fused)
            pending.unfused = [i for i in pending.unfused if i not in pending.fused]
            self._attach_fused(batch, [pending.fused[i] for i in indices])
        return batch

    def fused_forwards(self, chunk: Experience) -> dict[str, torch.Tensor]:
        """Per-token tensors ``[rows, R]`` computed on finished groups during generation;
        recipes override this (the base session computes none)."""
        return {}

    def _fuse(self, prompts, groups, indices: list[int], fused: dict) -> None:
        if not indices:
            return
        chunk = experience_from_completions([prompts[i] for i in indices],
                                            [groups[i] for i in indices], list(indices),
                                            self.tokenizer.pad_token_id).to(self.device)
        outputs = self.fused_forwards(chunk)
        row = 0
        for index in indices:
            size = len(groups[index])
            fused[index] = {name: t[row:row + size] for name, t in outputs.items()}
            row += size

    @staticmethod
    def _attach_fused(batch: Experience, fused: list[dict]) -> None:
        """Place each group's fused tensors (``fused``, in the batch's group order) into
        ``[B, R]`` fields of ``batch``."""
        for name in fused[0]:
            out = torch.zeros(batch.response_ids.shape)
            row = 0
            for outputs in fused:
                part = outputs[name].cpu()
                out[row:row + part.shape[0], : part.shape[1]] = part
                row += part.shape[0]
            setattr(batch, name, out)

    def _generated_groups(self, prompts, params, n, seeds=None):
        with self.autocast():
            if hasattr(self.engine, "stream"):
                self.engine.reset()  # partial rollouts are not carried across calls
                self.engine.submit(prompts, params, n, seeds=seeds)
                yield from self.engine.stream()
            else:
                yield from enumerate(self.engine.generate(prompts, params, n=n))

    @contextlib.contextmanager
    def _diverged_generation(self):
        try:
            yield
        except RuntimeError as err:
            if "probability tensor contains" not in str(err):
                raise
            raise TrainingDiverged(
                f"the policy produced NaN/inf probabilities while generating after step "
                f"{self.global_step}: the weights diverged (lower optim.lr or set "
                f"optim.max_grad_norm). The last complete checkpoint in "
                f"{self.checkpoint_root} is intact") from err

    def _score_group(self, row: dict, group: list[Completion]):
        """Rewards of one prompt's completions (the row's extra fields are passed along),
        with the wall-clock span of the call."""
        start = time.perf_counter()
        size = len(group)
        fields = {key: [value] * size for key, value in row.items() if key != "prompt"}
        result = self.rewards.score([row["prompt"]] * size, [c.text for c in group], fields)
        return result, start, time.perf_counter()

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
            next_id = self._next_group_id
            batch = self.rollout(self.eval_rows[lo:hi], params, 1)
            self._next_group_id = next_id
            rewards = batch.rewards.double().cpu()
        sums = torch.tensor([float((rewards >= self.reward_high - 1e-6).sum()),
                             float(rewards.sum()), float(batch.response_lengths.sum()),
                             float(rewards.numel())], dtype=torch.float64)
        self.dist.all_reduce(sums, kind="metrics")
        count = max(float(sums[3]), 1.0)
        result = {
            "eval/accuracy": float(sums[0]) / count,
            "eval/reward": float(sums[1]) / count,
            "eval/response_length": float(sums[2]) / count,
        }
        self.state["evals"][tag] = result
        return result

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes; every rank holds the same weights and optimizer
        state, and the data position is global)."""
        report(f"saving checkpoint (step {self.global_step})")  # not a step: no progress limit
        models = dict(self.named_trainable_models())
        optimizers = self.optimizers
        if self.sharded:  # every rank joins the gathering of full states
            models, optimizers = {}, {}
            for name, model in self.named_trainable_models():
                weights, optim = fsdp.full_state(model, self.optimizers[name])
                if self.dist.is_main:
                    models[name] = fsdp.plain_model(self._twins[name], weights)
                    optimizers[name] = fsdp.FullOptimizerState(model, None, optim)
        if not self.dist.is_main:
            return None
        state = {
            **self.state,
            "global_step": self.global_step,
            "nan_skips": self.nan_skips,
            "consecutive_nan_skips": self.consecutive_nan_skips,
            "next_group_id": self._next_group_id,
            "data": self.train_iter.state_dict(),
            "config": config_to_dict(self.config),  # what a resume is compared with
        }
        try:
            return save_checkpoint(self.checkpoint_root, self.global_step, models=models,
                                   tokenizer=self.tokenizer, optimizers=optimizers,
                                   schedulers=self.schedulers, trainer_state=state,
                                   keep_last=self.config.train.keep_last or None)
        finally:
            if self.sharded:  # the twins give their gathered weights back
                for twin in self._twins.values():
                    fsdp.release(twin)

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, the same on every rank: rank 0 takes the newest
        intact one (setting newer corrupt ones aside) and sends its choice to the others,
        who would otherwise each verify on their own and might choose differently. None
        when there is none, or with run.resume=never."""
        mode = self.config.run.resume
        if mode == "never":
            return None
        from plait.train.checkpoint import latest_intact_checkpoint

        chosen = None
        if self.dist.rank == 0:
            path = latest_intact_checkpoint(self.checkpoint_root, fallback=mode == "auto",
                                            set_aside=self.dist.is_main)
            chosen = None if path is None else str(path)
        chosen = self.dist.all_gather_objects(chosen, kind="resume")[0]
        return None if chosen is None else Path(chosen)

    def try_resume(self) -> bool:
        mode = self.config.run.resume
        path = self._resume_checkpoint()
        if path is None:
            if mode == "must":
                raise ConfigError(f"run.resume is 'must' but {str(self.checkpoint_root)!r} "
                                  "holds no complete checkpoint")
            return False
        self.state = read_trainer_state(path)
        self._check_resumable(path, self.state)
        # the reference/critic structure must exist before their weights load, and the
        # optimizers before their states do
        if self.sharded:
            self.setup_training(resuming=True,
                                load_weights=lambda: self._load_sharded_weights(path))
            optimizers = {name: fsdp.FullOptimizerState(model, self.optimizers[name])
                          for name, model in self.named_trainable_models()}
        else:
            self.setup_training(resuming=True, load_weights=lambda: load_checkpoint(
                path, models=dict(self.named_trainable_models()), restore_rng=False))
            optimizers = self.optimizers
        state = load_checkpoint(path, models={}, optimizers=optimizers,
                                schedulers=self.schedulers)
        self.state = state
        self.global_step = state["global_step"]
        self.nan_skips = state["nan_skips"]
        self.consecutive_nan_skips = state["consecutive_nan_skips"]
        self._next_group_id = state["next_group_id"]
        self.train_iter.load_state_dict(state["data"])
        self.engine.update_weights(None, self.global_step)
        if self.metrics is not None:
            self.metrics.truncate_after(self.global_step)
        timeline = self.run_dir / "timeline.jsonl"
        if timeline.is_file() and self.dist.is_main:  # drop steps the interrupted run did after this checkpoint
            kept = [line for line in timeline.read_text().splitlines()
                    if json.loads(line)["step"] <= self.global_step]
            timeline.write_text("".join(line + "\n" for line in kept))
        if self.dist.is_main:
            print(f"plait: resumed from {path} at step {self.global_step}"
                  + (f" on {self.dist.world_size} ranks" if self.dist.active else ""),
                  flush=True)
        return True

    def _check_resumable(self, path: Path, state: dict) -> None:
        """Resume only with the config the checkpoint was made with (its trainer state's,
        else the run's config.yaml), up to :data:`RESUME_SAFE_KEYS`: any other change
        (model, data, rewards, algorithm...) is refused with the keys named; the safe
        ones are listed in one line."""
        recorded = state.get("config")
        if not isinstance(recorded, dict):  # checkpoints made before they held it
            recorded = recorded_config(self.run_dir)
        if recorded is None:
            return
        changes = config_changes(recorded, self.config)
        refused = [change for change in changes if change[0] not in RESUME_SAFE_KEYS]
        if refused:
            raise ConfigError(
                f"cannot resume from {str(path)!r}: the config differs from the one it was "
                f"made with in settings that change the model or the algorithm "
                f"({describe_changes(refused)}); set them back, or start fresh with "
                "run.overwrite=true or a new run.dir")
        if changes and self.dist.is_main:
            stretched = any(change[0] == "train.steps" for change in changes) and \
                self.config.optim.schedule != "constant"
            print(f"plait: resuming with changed settings: {describe_changes(changes)}"
                  + ("; the learning-rate schedule now decays over the new train.steps, so "
                     "the rate changes from this step on" if stretched else ""), flush=True)

    # ------------------------------------------------------------------ the job

    def warm_start(self) -> None:
        """Evaluate the initial model, run the SFT warm start, and freeze a reference."""
        cfg = self.config
        if cfg.sft.steps > 0:
            check_sft_rows(self.train_rows)
        self.evaluate("initial")
        if cfg.sft.steps > 0:
            report("supervised warm start")
            if self.sharded:  # every rank trains its shard of each SFT batch
                self._supervised_warm_start()
            else:
                if self.dist.is_main:
                    self._supervised_warm_start()
                self.dist.barrier()
                # every rank continues from rank 0's warm-started weights
                self.dist.broadcast_tensors(list(self.policy.state_dict().values()), src=0,
                                            kind="weights")
            self.state["reference_dir"] = str(self.run_dir / "sft_model")
            self.evaluate("after_sft")
        self.setup_training()

    def _supervised_warm_start(self) -> None:
        cfg = self.config
        main = self.dist.is_main
        bar = ProgressBar(cfg.sft.steps, "sft", disable=None if cfg.run.progress else True,
                          silent=not main)
        sft_metrics = MetricsLogger(self.run_dir / "sft", tensorboard=cfg.run.tensorboard) \
            if main else None

        def on_step(step: int, loss: float) -> None:
            bar.update(1, loss=loss)
            if sft_metrics is not None:
                sft_metrics.log(step, {"sft/loss": loss})

        rows = self.train_rows
        try:
            supervised_warm_start(self.policy, self.tokenizer, rows, cfg.sft,
                                  encode_prompt=self.encode_prompt, seed=cfg.train.seed,
                                  device=self.device, on_step=on_step,
                                  dist=self.dist if self.sharded else None,
                                  optimizer_implementation=cfg.optim.implementation,
                                  autocast=self.autocast)
        except FloatingPointError as err:
            raise TrainingDiverged(str(err)) from None
        self.policy.eval()
        bar.close()
        if sft_metrics is not None:
            sft_metrics.close()
        model = self.policy
        if self.sharded:  # every rank joins the gathering; rank 0 writes
            weights, _ = fsdp.full_state(self.policy)
            if not main:
                return
            model = fsdp.plain_model(self._twins["policy"], weights)
        try:
            sft_dir = self.run_dir / "sft_model"
            tmp_dir = self.run_dir / ".tmp-sft_model"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            model.save_pretrained(tmp_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp_dir)
            shutil.rmtree(sft_dir, ignore_errors=True)
            os.replace(tmp_dir, sft_dir)
        finally:
            if model is not self.policy:
                fsdp.release(model)

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
        while self.global_step < cfg.train.steps:
            report(f"step {self.global_step + 1}")
            step_started = time.perf_counter()
            metrics = self.step(self.global_step)
            step_done(time.perf_counter() - step_started)
            self.global_step += 1
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
        self.save()
        report("finishing")
        return self.finish(started, rl_seconds, tokens)

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
            "nan_skips": self.nan_skips,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }
        if "after_sft" in evals:
            summary["accuracy_after_sft"] = evals["after_sft"]["eval/accuracy"]
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
        # Stopping (an error, Ctrl-C) never waits for rewards: queued groups are dropped and
        # the call in flight ends at once with its worker, so the pool's thread ends too.
        self._reward_pool.shutdown(wait=False, cancel_futures=True)
        self.rewards.abort()
        self._reward_pool.shutdown(wait=True)
        self.rewards.close()
        if self.metrics is not None:
            self.metrics.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError


def _raise_first_failure(futures) -> None:
    """Raise the exception of the first finished future that failed, if any."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
