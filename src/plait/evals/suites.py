"""Named eval sets: greedy accuracy, pass@k and maj@k from sampled completions, mean
reward, length and truncation, through the job's own engine.

An eval set is prompts (a built-in task's test split or a file) and reward functions (a
verifier, a user function or a reward model; see ``eval.suites``). Each set gets its own
:class:`~plait.runtime.generation.Generator` over the job's engine, so completions are
batched and streamed to the set's rewards exactly as in training. On several ranks each
rank evaluates a contiguous share of the prompts and the sums are reduced.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from plait.config import BUILTIN_REWARD_NAMES, ConfigError, EvalSuiteConfig, RewardFnConfig
from plait.data.datasets import load_prompt_rows
from plait.data.tasks import make_task
from plait.evals.estimators import maj_at_k, pass_at_k
from plait.rollout.base import SamplingParams
from plait.runtime import inputs
from plait.runtime.generation import Generator, sample_seeds


@dataclass
class EvalSet:
    """One configured eval set, ready to run: its rows, generator and scoring rules."""

    config: EvalSuiteConfig
    rows: list[dict]
    generator: Generator
    task: object | None
    correct_at: float | None
    ks: list[int]
    pattern: re.Pattern | None

    @property
    def name(self) -> str:
        return self.config.name

    def answer(self, text: str) -> str:
        """The answer majority voting compares."""
        if self.pattern is not None:
            found = self.pattern.search(text)
            return found.group(1).strip() if found else ""
        if self.task is not None:
            return self.task.extract_answer(text)
        return text.strip()

    def close(self) -> None:
        self.generator.close()


def build_eval_sets(session) -> list[EvalSet]:
    """The job's ``eval.suites`` over ``session``'s engine (rewards started, rows loaded and
    checked against data.max_prompt_tokens)."""
    built: list[EvalSet] = []
    try:
        for index, suite in enumerate(session.config.eval.suites):
            built.append(_build(session, index, suite))
    except BaseException:
        for eval_set in built:
            eval_set.close()
        raise
    return built


def _build(session, index: int, suite: EvalSuiteConfig) -> EvalSet:
    config = session.config
    where = f"eval.suites[{index}] ({suite.name})"
    if suite.task is not None:
        try:
            task = make_task(suite.task, **suite.task_args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}.task: {err}") from None
        rows = task.make_rows(suite.num_prompts, seed=config.train.seed, split="test")
        functions = suite.reward or [RewardFnConfig()]
    else:
        task = session.task
        rows = load_prompt_rows(suite.path, split=config.data.split,
                                fields=suite.fields or None, limit=suite.num_prompts)
        functions = suite.reward or config.reward.functions
    if task is None and any(f.spec == "task" for f in functions):
        raise ConfigError(f"{where}: the 'task' reward needs a built-in task; give the set "
                          "a reward (e.g. [{fn: exact_match}]) or a task")
    inputs.check_prompt_lengths(config, rows, f"{where}", session.encode_prompt)
    set_config = dataclasses.replace(config, reward=dataclasses.replace(
        config.reward, functions=list(functions)))
    rewards = inputs.build_rewards(set_config, task, session.device)
    generator = Generator(set_config, session.engine, rewards, session.tokenizer,
                          session.device, encode_prompt=session.encode_prompt,
                          autocast=session.models.autocast,
                          gathered=session.generator.gathered,
                          releases_kv_cache=session.generator.releases_kv_cache,
                          diverged=session.generator.diverged)
    pattern = re.compile(suite.answer_pattern) if suite.answer_pattern else None
    ks = sorted(set(suite.k or ([1, suite.samples] if suite.samples else [])))
    return EvalSet(suite, rows, generator, task, _correct_at(config, suite, functions, task),
                   ks, pattern)


def _correct_at(config, suite: EvalSuiteConfig, functions, task) -> float | None:
    """The reward at which a completion counts as correct (None: no such line)."""
    if suite.correct_at is not None:
        return suite.correct_at
    if all(f.spec in BUILTIN_REWARD_NAMES for f in functions):
        low, high = task.reward_range if task is not None else (0.0, 1.0)
        return sum(max(f.weight * low, f.weight * high) for f in functions)
    if any(f.model is not None or f.judge is not None for f in functions):
        return None
    return config.algo.reward_range[1] if config.algo.reward_range is not None else 1.0


@torch.no_grad()
def run_eval_set(session, eval_set: EvalSet) -> dict[str, float]:
    """One set's results (means over its prompts): greedy_accuracy, pass@K, maj@K,
    greedy_reward, sample_reward, mean_length and truncation_rate (of the sampled
    completions when there are any, else of the greedy ones), num_prompts."""
    suite, generator = eval_set.config, eval_set.generator
    config = session.config
    rows = eval_set.rows
    lo, hi = session.dist.shard_bounds(len(rows))
    mine = rows[lo:hi]
    max_new = suite.max_new_tokens or config.train.eval_max_new_tokens or \
        config.rollout.max_new_tokens
    stop = tuple(config.rollout.stop)
    # [greedy right, greedy reward, greedy length, greedy cut, prompts, sample reward,
    #  sample length, sample cut, samples, pass@k..., maj@k...]
    ks = eval_set.ks
    sums = torch.zeros(9 + 2 * len(ks), dtype=torch.float64)
    sums[4] = len(mine)
    with torch.random.fork_rng(devices=[]):
        if not mine:  # no prompts on this rank: it still joins each generation's gather
            for _ in range(int(suite.greedy) + int(suite.samples > 0)):
                _join_gather(generator)
        if suite.greedy and mine:
            params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=stop)
            batch = generator.scored(mine, params, 1)
            rewards = batch.rewards.double().cpu()
            if eval_set.correct_at is not None:
                sums[0] = (rewards >= eval_set.correct_at - 1e-6).sum()
            sums[1] = rewards.sum()
            sums[2] = batch.lengths.sum()
            sums[3] = batch.truncated.sum()
        if suite.samples and mine:
            r = config.rollout
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=r.temperature if suite.temperature is None else suite.temperature,
                top_p=r.top_p if suite.top_p is None else suite.top_p, top_k=r.top_k,
                stop=stop)
            seeds = sample_seeds(suite.seed, 0, lo, len(mine), draw=0)
            batch = generator.scored(mine, params, suite.samples, seeds=seeds)
            rewards = batch.rewards.double().cpu()
            sums[5] = rewards.sum()
            sums[6] = batch.lengths.sum()
            sums[7] = batch.truncated.sum()
            sums[8] = len(rewards)
            if eval_set.correct_at is not None:
                n = suite.samples
                right = (rewards >= eval_set.correct_at - 1e-6).view(len(mine), n)
                answers = [eval_set.answer(text) for text in batch.texts]
                for p in range(len(mine)):
                    flags = right[p].tolist()
                    votes = answers[p * n:(p + 1) * n]
                    for j, k in enumerate(ks):
                        sums[9 + j] += pass_at_k(n, int(sum(flags)), k)
                        sums[9 + len(ks) + j] += maj_at_k(votes, flags, k)
    session.dist.all_reduce(sums, kind="metrics")
    prompts = max(float(sums[4]), 1.0)
    result: dict[str, float] = {"num_prompts": float(sums[4])}
    if suite.greedy:
        if eval_set.correct_at is not None:
            result["greedy_accuracy"] = float(sums[0]) / prompts
        result["greedy_reward"] = float(sums[1]) / prompts
    if suite.samples:
        samples = max(float(sums[8]), 1.0)
        if eval_set.correct_at is not None:
            for j, k in enumerate(ks):
                result[f"pass@{k}"] = float(sums[9 + j]) / prompts
            for j, k in enumerate(ks):
                result[f"maj@{k}"] = float(sums[9 + len(ks) + j]) / prompts
        result["sample_reward"] = float(sums[5]) / samples
        result["mean_length"] = float(sums[6]) / samples
        result["truncation_rate"] = float(sums[7]) / samples
    else:
        result["mean_length"] = float(sums[2]) / prompts
        result["truncation_rate"] = float(sums[3]) / prompts
    return result


def _join_gather(generator: Generator) -> None:
    """A rank with no prompts still enters and leaves the generation's parameter gather,
    which sharded ranks do together."""
    with generator.gathered():
        pass


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{set: {metric: v}}`` as metrics ``eval/SET/METRIC``."""
    return {f"eval/{name}/{key}": value for name, metrics in results.items()
            for key, value in metrics.items() if key != "num_prompts"}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The results as a plain-text table: one row per set, one column per metric."""
    if not results:
        return ""
    columns: list[str] = []
    for metrics in results.values():
        columns += [key for key in metrics if key not in columns]
    width = max(len("set"), *(len(name) for name in results))
    widths = [max(len(c), 8) for c in columns]
    head = "set".ljust(width) + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths,
                                                                        strict=True))
    lines = [head, "-" * len(head)]
    for name, metrics in results.items():
        cells = []
        for c, w in zip(columns, widths, strict=True):
            value = metrics.get(c)
            cells.append(f"  {'-':>{w}}" if value is None else
                         f"  {value:>{w}.0f}" if c == "num_prompts" else f"  {value:>{w}.4f}")
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
