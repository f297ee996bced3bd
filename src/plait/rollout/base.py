"""The rollout interface: prompts in, completed sequences out.

Every engine returns, per completion, the sampled token ids, the
log-probability of each sampled token under the sampling distribution, why
it finished, and the policy version that produced it. Engines group the
``n`` completions of one prompt together, so group statistics (GRPO) never
need a gather across prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    """What trainers and rollout workers need from a generation engine.

    Requests are submitted (:meth:`submit`) and come back group by group as they finish
    (:meth:`stream`), so rewards and forward passes can start on finished groups while
    the rest still generate; :meth:`generate` is the one-call form."""

    policy_version: int

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               seeds: list[int] | None = None, first_index: int = 0) -> None:
        """Queue ``n`` samples of each prompt; prompt ``i`` streams back as index
        ``first_index + i``. ``seeds`` (one per prompt) make a prompt's samples a function
        of its seed (engines that cannot seed per prompt use the global generator)."""

    def stream(self, pause: Callable[[], bool] | None = None
               ) -> Iterator[tuple[int, list[Completion]]]:
        """Yield ``(prompt_index, completions)`` as each group completes, until nothing is
        queued or ``pause()`` (asked between decode runs) says to stop for now."""

    @property
    def busy(self) -> bool:
        """Requests are still queued or running."""

    def reset(self) -> None:
        """Drop every queued, running and finished-but-unread request."""

    def release(self) -> None:
        """Free the engine's cache memory (it is rebuilt at the next generation)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1
                 ) -> list[list[Completion]]:
        """``n`` completions for each prompt (token ids, unpadded); result[i] holds prompt i's."""

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None, version: int) -> None:
        """Load new policy weights (``None``: weights are shared with the trainer) and set the
        version stamped on later completions."""
