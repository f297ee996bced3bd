"""What ``plait rm`` and ``plait dpo`` share: preference pairs (from a file, or the
built-in task's with their hidden true scores: edits of the answer or the policy's own
samples) and their token ids.

A command is a :class:`PairJob` (a :class:`~plait.recipes.stepjob.StepJob` on pairs)
with its model(s), its step and its evaluation.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch

from plait.config import Config, ConfigError
from plait.data.datasets import DataError, PromptIterator, split_rows
from plait.data.preferences import load_preference_rows
from plait.models.loading import (
    PromptEncoder,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
)
from plait.models.reward_model import ResponseEncoder
from plait.recipes.stepjob import StepJob
from plait.rollout.base import SamplingParams
from plait.runtime import inputs
from plait.train.experience import Experience, experience_from_tokens


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
    prompt sampled ``pairs.samples_per_prompt`` times through plait's engine, and up to
    ``pairs.pairs_per_prompt`` pairs of two samples of different true score ranked by it
    (labels flipped at the noise rate), as people rank a model's responses; a prompt's
    pairs are adjacent. Prompts whose samples all score the same give no pair."""

    def __init__(self, config: Config):
        self.config = config
        key = "pairs.policy_path" if config.pairs.policy_path else "model.path"
        model_dir = Path(config.pairs.policy_path) if config.pairs.policy_path else \
            resolve_model_dir(config.model, Path(config.run.dir))
        self.tokenizer = load_tokenizer(model_dir, key)
        self.policy = load_causal_lm(model_dir, config.model.attn_implementation,
                                     key=key).eval()
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
        per_prompt = self.config.pairs.pairs_per_prompt
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
                    seen: set[frozenset] = set()
                    for i, a in enumerate(texts):
                        for b in texts[i + 1:]:
                            if len(seen) == per_prompt or frozenset((a, b)) in seen:
                                continue
                            pair = task.rank_pair(row, a, b, rng, noise)
                            if pair is not None:
                                seen.add(frozenset((a, b)))
                                pairs.append(pair)
                                if len(pairs) == n:
                                    return pairs
        if not pairs:
            raise DataError(f"pairs.source=policy: the policy's {k} samples of each prompt "
                            "all score the same; raise rollout.temperature or "
                            "pairs.samples_per_prompt, or use pairs.source=edits")
        return pairs


class PairEncoder:
    """A pair's two sequences as token ids (see :class:`ResponseEncoder`), where they
    part, and whether they fit ``max_length``; each row is encoded once.

    Both sequences start with the prompt; with ``share_prefix`` the shared start also
    takes the tokens the two responses begin with alike (the shorter keeps at least its
    last token), so those are computed once for the pair as the prompt is. A reward
    model's scores (read at each sequence's end) and the difference of the two
    responses' summed log-probabilities are unchanged by it: it is for losses that use
    only those (Bradley-Terry, DPO's sigmoid), not for per-token averages."""

    def __init__(self, tokenizer, chat_template: str, max_length: int, *,
                 share_prefix: bool = False):
        self.encode, self.max_length = ResponseEncoder(tokenizer, chat_template), max_length
        self.share_prefix = share_prefix
        # (prompt, chosen, rejected) -> (chosen ids, rejected ids, shared start): batches
        # hold copies of the rows, so a pair is known by its content
        self._cache: dict[tuple, tuple] = {}

    @staticmethod
    def _key(row: dict) -> tuple:
        return tuple(value if isinstance(value, str) else json.dumps(value, sort_keys=True)
                     for value in (row["prompt"], row["chosen"], row["rejected"]))

    def _encoded(self, row: dict) -> tuple:
        key = self._key(row)
        cached = self._cache.get(key)
        if cached is None:
            chosen = self.encode(row["prompt"], row["chosen"])
            rejected = self.encode(row["prompt"], row["rejected"])
            if isinstance(row["chosen"], list) or isinstance(row["prompt"], list):
                start = _common_prefix(chosen, rejected)
            else:
                start = len(self.encode.prompt(row["prompt"]))
            if self.share_prefix:
                start = max(start, min(_common_prefix(chosen, rejected),
                                       min(len(chosen), len(rejected)) - 1))
            cached = self._cache[key] = (row, chosen, rejected, start)
        return cached

    def __call__(self, row: dict) -> tuple[list[int], list[int]]:
        return self._encoded(row)[1:3]

    def prompt_length(self, row: dict) -> int:
        """Tokens the two sequences share at their start: the prompt (and, with
        ``share_prefix``, the responses' common beginning)."""
        return self._encoded(row)[3]

    def fits(self, row: dict) -> bool:
        return max(map(len, self(row))) <= self.max_length


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


PACK_TOKENS = 1024  # longest packed sequence of pairs' prompts and responses


def pair_experience(rows: list[dict], encode: PairEncoder, pad: int) -> Experience:
    """Pairs as a batch of rows ``[chosen_1, rejected_1, chosen_2, ...]``: each pair's
    shared start (left-padded, the same for its two rows: see :class:`PairEncoder`) and
    the rest of its two sequences (right-padded, end token included), one group per
    pair, so a shared-prompt forward computes each shared start once."""
    prompts, responses = [], []
    for row in rows:
        chosen, rejected = encode(row)
        start = encode.prompt_length(row)
        for sequence in (chosen, rejected):
            prompts.append(chosen[:start])
            responses.append(sequence[start:])
    return experience_from_tokens(prompts, responses,
                                  [pair for pair in range(len(rows)) for _ in (0, 1)], pad)


class PromptGroups:
    """Batches of whole prompts: each step's pairs are every pair of some prompts (at
    least ``batch_size`` pairs, fewer only when every prompt has been taken once an
    epoch), in an order shuffled per epoch as :class:`PromptIterator`'s; resumable by
    its state."""

    def __init__(self, rows: list[dict], seed: int):
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(prompt_key(row), []).append(row)
        self._groups = PromptIterator([{"pairs": g} for g in groups.values()], seed=seed)
        self._prompts = len(groups)

    def next_batch(self, batch_size: int) -> list[dict]:
        batch: list[dict] = []
        for _ in range(self._prompts):
            batch += self._groups.next_batch(1)[0]["pairs"]
            if len(batch) >= batch_size:
                break
        return batch

    def state_dict(self) -> dict:
        return self._groups.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._groups.load_state_dict(state)


def truth_of(rows: list[dict]) -> torch.Tensor | None:
    """Whether each pair's chosen response is truly the better one, when every pair
    carries its true scores (the built-in task's do); else None."""
    truth = [(row["chosen_score"], row["rejected_score"]) for row in rows
             if "chosen_score" in row and "rejected_score" in row]
    if len(truth) != len(rows):
        return None
    return torch.tensor([c > r for c, r in truth])


class PairJob(StepJob):
    """A job on preference pairs (``plait rm``, ``plait dpo``): ``self.encode`` gives a
    pair's token ids; pairs longer than pairs.max_length stop the job naming the pair
    (pairs.bad_rows=error) or are left out and counted."""

    def load_data(self) -> tuple[list[dict], list[dict]]:
        config = self.config
        self.encode = PairEncoder(self.tokenizer, config.model.chat_template,
                                  config.pairs.max_length,
                                  share_prefix=self.shares_response_prefix())
        train, held_out, dropped = load_pairs(config, self.COMMAND)
        self.dropped.update(dropped)
        return self._within_length(train, "training"), self._within_length(held_out, "held-out")

    def data_summary(self) -> dict:
        return {"pairs": len(self.train_rows), "eval_pairs": len(self.eval_rows)}

    def shares_response_prefix(self) -> bool:
        """Whether the loss reads a pair only through what its shared responses'
        beginning cannot change (see :class:`PairEncoder`)."""
        return True

    def _within_length(self, rows: list[dict], which: str) -> list[dict]:
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


def prompt_key(row: dict) -> str:
    """The prompt of a pair, as a key (a chat prompt is a list)."""
    return json.dumps(row["prompt"], sort_keys=True)


def prompt_ids(rows: list[dict], device) -> torch.Tensor:
    """Pairs of one prompt share an id."""
    keys: dict[str, int] = {}
    return torch.tensor([keys.setdefault(prompt_key(row), len(keys)) for row in rows],
                        device=device)
