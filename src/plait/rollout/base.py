"""The rollout interface: prompts in, completed sequences out.

Every engine returns, per completion, the sampled token ids, the
log-probability of each sampled token under the sampling distribution, why
it finished, and the policy version that produced it. Engines group the
``n`` completions of one prompt together, so group statistics (GRPO) never
need a gather across prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (or a stop string) through EOS tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def cut_at_stop(self, text: str) -> str:
        """``text`` up to the first stop string (the stop string itself removed)."""
        for stop in self.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return text


@dataclass
class Completion:
    """One generated response to one prompt."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    policy_version: int
    text: str = ""
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine."""

    policy_version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1
                 ) -> list[list[Completion]]:
        """``n`` completions for each prompt (token ids, unpadded); result[i] holds prompt i's."""

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None, version: int) -> None:
        """Load new policy weights (``None``: weights are shared with the trainer) and set the
        version stamped on later completions."""
