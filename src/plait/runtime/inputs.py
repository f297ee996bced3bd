"""What every process of a job sets up from its config, trainer or rollout worker:
threads, seeds and device; the task and the reward range; the tokenizer and the
starting policy; the prompt rows; the reward functions; the generation engine.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plait.config import BUILTIN_REWARD_NAMES, Config, ConfigError
from plait.data.datasets import PromptIterator, load_prompt_rows
from plait.data.tasks import make_task
from plait.models.loading import (  # noqa: F401 (PromptEncoder: the runtime's encoder)
    PromptEncoder,
    freeze,
    load_causal_lm,
    load_tokenizer,
    quiet_transformers,
    resolve_model_dir,
)
from plait.parallel.dist import Dist
from plait.rewards import RewardManager
from plait.rewards.judge import JudgeReward, compile_parse, read_template
from plait.rewards.loading import RewardLoadError
from plait.rewards.model import ModelReward
from plait.rollout import build_engine
from plait.rollout.base import SamplingParams
from plait.train.forward import packed_response_scores


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


def configure_process(config: Config, dist: Dist) -> torch.device:
    """Threads (train.threads, else the launcher's share of the cores, else an even share
    among the ranks on this machine), determinism, seeds; the device this rank uses."""
    train = config.train
    if train.threads:
        torch.set_num_threads(train.threads)
    elif os.environ.get("PLAIT_THREADS"):  # the launcher's share of cores per rank
        torch.set_num_threads(int(os.environ["PLAIT_THREADS"]))
    elif dist.active:  # ranks on one machine share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(train.seed)
    quiet_transformers()
    device = pick_device(train.device)
    if device.type == "cuda" and dist.active:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def job_task(config: Config):
    """The built-in task ``data.task`` names, or None."""
    data = config.data
    return make_task(data.task, **data.task_args) if data.task else None


def reward_range(config: Config, task) -> tuple[float, float]:
    """``[low, high]`` of the total reward: algo.reward_range, else the built-in task's
    range under the reward weights, else ``[-clip, clip]`` with reward.clip; the overlong
    and missing-end penalties lower the floor."""
    algo = config.algo
    if algo.reward_range is not None:
        low, high = algo.reward_range
    elif task is not None and all(f.spec in BUILTIN_REWARD_NAMES
                                  for f in config.reward.functions):
        weights = [f.weight for f in config.reward.functions]
        low = sum(min(w * task.reward_range[0], w * task.reward_range[1]) for w in weights)
        high = sum(max(w * task.reward_range[0], w * task.reward_range[1]) for w in weights)
    elif config.reward.clip is not None:  # a learned reward clipped to [-clip, clip]
        low, high = -config.reward.clip, config.reward.clip
    elif algo.reward_adjust == "grpovi":
        raise ConfigError("algo.reward_adjust=grpovi needs the reward's range: set "
                          "algo.reward_range=[low, high] for user reward functions or "
                          "reward models, or reward.clip")
    else:
        low, high = 0.0, 1.0
    if algo.overlong_buffer > 0:
        low -= algo.overlong_penalty
    if config.reward.missing_eos_penalty:
        low -= config.reward.missing_eos_penalty
    return float(low), float(high)


def load_policy(config: Config, dist: Dist, run_dir: Path):
    """``(model_dir, tokenizer, policy)``: rank 0 builds the tiny model when asked for
    one, the others load it once it exists. The policy is on the CPU."""
    if dist.is_main:
        resolve_model_dir(config.model, run_dir)
    dist.barrier()
    model_dir = resolve_model_dir(config.model, run_dir)
    tokenizer = load_tokenizer(model_dir, key="model.path")
    policy = load_causal_lm(model_dir, config.model.attn_implementation, key="model.path")
    return model_dir, tokenizer, policy


@dataclass
class Prompts:
    """The job's prompt rows: training rows in a resumable order, and held-out rows."""

    train_rows: list[dict]
    eval_rows: list[dict]
    train_iter: PromptIterator


def load_prompts(config: Config, task, encode_prompt) -> Prompts:
    """Rows from data.train_path (held-out rows from data.eval_path, else its last
    data.num_eval rows), else made by the built-in task; every prompt checked against
    data.max_prompt_tokens."""
    data = config.data
    seed = config.train.seed
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
        rows = task.make_rows(data.num_train, seed=seed, split="train")
        eval_rows = task.make_rows(data.num_eval, seed=seed, split="test")
    check_prompt_lengths(config, rows, "train", encode_prompt)
    check_prompt_lengths(config, eval_rows, "eval", encode_prompt)
    return Prompts(rows, eval_rows, PromptIterator(rows, seed=seed))


def check_prompt_lengths(config: Config, rows: list[dict], which: str, encode_prompt) -> None:
    limit = config.data.max_prompt_tokens
    for index, row in enumerate(rows):
        n = len(encode_prompt(row["prompt"]))
        if n > limit:
            raise ConfigError(f"{which} row {index + 1}: prompt has {n} tokens, more than "
                              f"data.max_prompt_tokens={limit}; raise the limit or drop "
                              "the row")


def build_rewards(config: Config, task, device: torch.device | str = "cpu") -> RewardManager:
    """The weighted reward functions of reward.functions, with their failure policy;
    reward models are loaded onto ``device``."""
    reward = config.reward
    # a frozen reward model is kept in bfloat16 on a GPU when the job computes in it
    bf16 = config.model.dtype == "bfloat16" and torch.device(device).type == "cuda"
    functions = []
    for index, f in enumerate(reward.functions):
        if f.judge is not None:
            functions.append((build_judge(config, f, index, device), f.weight))
            continue
        if f.model is None:
            functions.append((f.spec, f.weight))
            continue
        scorer = ModelReward(f.model, device=device, chat_template=config.model.chat_template,
                             batch_size=f.batch_size, dtype=torch.bfloat16 if bf16 else None,
                             key=f"reward.functions[{index}].model",
                             packed=packed_response_scores)
        functions.append((scorer, f.weight))
    return RewardManager(
        functions, task=task,
        timeout_s=reward.timeout_s, on_error=reward.on_error,
        fallback_reward=reward.fallback_reward, import_timeout_s=reward.import_timeout_s,
        max_consecutive_timeouts=reward.max_consecutive_timeouts)


def build_judge(config: Config, f, index: int, device) -> JudgeReward:
    """reward.functions[index]'s judge: its model on ``device`` behind a plait engine of
    its own, answering greedily."""
    key = f"reward.functions[{index}]"
    template = read_template(f.template, f"{key}.template")
    compile_parse(f.parse, f"{key}.parse")  # named before any model loads
    path = Path(f.judge)
    if not (path / "config.json").is_file():
        raise RewardLoadError(f"{key}.judge: {f.judge!r} is not a model directory (no "
                              "config.json); give a causal LM saved with its tokenizer")
    tokenizer = load_tokenizer(path, f"{key}.judge")
    model = freeze(load_causal_lm(path, config.model.attn_implementation,
                                  key=f"{key}.judge").to(device))
    rollout = dataclasses.replace(config.rollout, engine="plait", batch_size=f.batch_size,
                                  release_kv_cache=False)
    try:
        engine = build_engine(rollout, model, tokenizer, compile=False)
    except ValueError:  # a family plait's engine does not drive: transformers' generate
        engine = build_engine(dataclasses.replace(rollout, engine="hf"), model, tokenizer,
                              compile=False)
    params = SamplingParams(max_new_tokens=f.max_new_tokens, temperature=0.0)

    def generate(prompts: list[list[int]]) -> list[str]:
        with torch.no_grad():
            return [group[0].text for group in engine.generate(prompts, params, 1)]

    encode = PromptEncoder(tokenizer, config.model.chat_template)
    return JudgeReward(generate, encode, template=template, parse=f.parse, name="judge")


def engine_for(config: Config, policy, tokenizer, model_dir, *, compile: bool):
    """The generation engine rollout.engine names, sharing ``policy``'s weights."""
    try:
        return build_engine(config.rollout, policy, tokenizer,
                            compile=compile and config.rollout.compile)
    except ValueError as err:
        raise ConfigError(f"model {str(model_dir)!r}: {err}") from None
