"""A learned reward model as a reward function.

``reward.functions: [{model: PATH}]`` scores each completion with the reward model saved
at PATH (``plait rm``'s ``reward_model/``, or any one-label
``AutoModelForSequenceClassification`` directory with its tokenizer): the prompt and the
completion are encoded as in reward-model training (:class:`ResponseEncoder`) and scored
in micro-batches without gradients. It runs in the process that generates (a trainer
rank, or a rollout worker when they run apart), on that process's device, as groups
stream out of the engine; the reward manager's time limit and failure policy apply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from plait.models.loading import load_tokenizer
from plait.models.reward_model import (
    ResponseEncoder,
    load_reward_model,
    padded_batch,
    sequence_scores,
)
from plait.rewards.loading import RewardLoadError

__all__ = ["ModelReward"]


class ModelReward:
    """Scores ``(prompt, completion)`` pairs with a saved reward model.

    Args:
        path: the reward model's directory (config.json naming a
            ``...ForSequenceClassification`` with one label, weights, tokenizer).
        device: where it runs.
        chat_template: how prompts are encoded (model.chat_template; as in training).
        batch_size: sequences per forward pass.
        dtype: the model's dtype on ``device`` (None: as saved).
        key: the config key naming ``path``, for error messages.
        packed: ``packed(model, prompts, responses, pad)`` -> ``[B]`` scores (or None)
            of token-id prompts and responses, each distinct prompt computed once and
            its responses packed after it; a batch of plain-text prompts goes this way
            when given (a GRPO group shares its prompt), else as padded rows.
    """

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu",
                 chat_template: str = "auto", batch_size: int = 32,
                 dtype: torch.dtype | None = None, key: str = "reward model",
                 packed: Callable | None = None):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise RewardLoadError(f"{key}: {str(path)!r} is not a model directory (no "
                                  "config.json); give the reward_model/ directory that "
                                  "plait rm wrote, or another saved reward model")
        architectures = _architectures(self.path)
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise RewardLoadError(
                f"{key}: {str(path)!r} holds a {', '.join(architectures) or 'model'}, not a "
                "reward model (a ...ForSequenceClassification with one label): train one "
                "with plait rm and give its reward_model/ directory")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.path, key)
        try:
            model = load_reward_model(self.path, pad_token_id=self.tokenizer.pad_token_id,
                                      key=key)
        except ValueError as err:
            raise RewardLoadError(str(err)) from None
        self.model = model.to(self.device, dtype=dtype).eval().requires_grad_(False)
        self.encode = ResponseEncoder(self.tokenizer, chat_template)
        self.packed = packed
        self.__name__ = "reward_model"

    @torch.inference_mode()
    def __call__(self, prompts: Sequence, completions: Sequence[str], **fields) -> list[float]:
        """One score per completion (the dataset's other columns are not read)."""
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        if self.packed is not None and all(isinstance(p, str) for p in prompts):
            heads = [self.encode.prompt(p) for p in prompts]
            scores = None
            for start in range(0, len(sequences), self.batch_size):
                part = slice(start, start + self.batch_size)
                values = self.packed(self.model, heads[part],
                                     [seq[len(head):] for seq, head in
                                      zip(sequences[part], heads[part], strict=True)],
                                     self.tokenizer.pad_token_id)
                if values is None:
                    break
                scores = (scores or []) + values.float().cpu().tolist()
            else:
                return scores or []
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = [0.0] * len(sequences)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):  # similar lengths together
            rows = order[start:start + self.batch_size]
            ids, mask = padded_batch([sequences[i] for i in rows], pad)
            values = sequence_scores(self.model, ids.to(self.device), mask.to(self.device))
            for i, value in zip(rows, values.float().cpu().tolist(), strict=True):
                scores[i] = value
        return scores


def _architectures(path: Path) -> list[str]:
    try:
        return list(json.loads((path / "config.json").read_text()).get("architectures") or ())
    except (OSError, ValueError):
        return []
