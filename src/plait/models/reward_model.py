"""Reward models: a decoder with a scalar head that scores a whole sequence.

plait's reward model is transformers' ``AutoModelForSequenceClassification`` with one
label: the decoder's hidden state at a sequence's last token goes through a linear head.
A directory it saves therefore loads as that class, as TRL, OpenRLHF and verl read reward
models. Started from a causal LM (an SFT model), the head is new: drawn from a seeded
normal with std 1/sqrt(hidden_size + 1), so the first scores are small and the same for a
given seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from plait.data.datasets import DataError
from plait.models.loading import PromptEncoder, _load, check_model_config

__all__ = ["ResponseEncoder", "load_reward_model", "padded_batch", "sequence_scores"]


def load_reward_model(path: str | Path, *, pad_token_id: int, seed: int = 0,
                      attn_implementation: str = "auto", key: str | None = None):
    """A one-label sequence classifier from ``path``: a saved reward model as it is, or a
    causal LM with a new scalar head (seeded by ``seed``). ``pad_token_id`` is written
    into its config (transformers finds a sequence's last token by it)."""
    config = check_model_config(path, key)
    is_reward_model = any(name.endswith("ForSequenceClassification")
                          for name in config.get("architectures") or ())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is expected here
    try:
        model = _load(_OneLabel, path, attn_implementation, key)
    finally:
        hf_logging.set_verbosity(verbosity)
    if is_reward_model and model.config.num_labels != 1:
        where = key or str(path)
        raise ValueError(f"{where}: a sequence classifier with {model.config.num_labels} "
                         f"labels, not a reward model (one score)")
    if not is_reward_model:
        hidden = model.score.weight.shape[1]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator)
                                     / (hidden + 1) ** 0.5)
    model.config.pad_token_id = pad_token_id
    return model


class _OneLabel:
    """``AutoModelForSequenceClassification`` with ``num_labels=1`` for ``_load``."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
    """``[B]`` float32 scores of each row at its last attended token (right or left
    padding), from the decoder and the head directly: no reliance on pad ids."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
                  use_cache=False).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(-1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(pooled.to(model.score.weight.dtype)).squeeze(-1).float()


class ResponseEncoder:
    """A prompt and a response as the token ids a reward model reads: the prompt as the
    policy sees it (through the chat template as ``chat_template`` says), then the
    response's tokens and the end token. Chat messages (a list of role/content dicts for
    the prompt and the reply) go through the tokenizer's chat template whole. One encoder
    serves training (``plait rm``) and scoring rollouts, so both read the same sequence."""

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer = tokenizer
        self.prompt = PromptEncoder(tokenizer, chat_template)

    def __call__(self, prompt, response) -> list[int]:
        if isinstance(response, list):
            return self._chat(prompt, response)
        if isinstance(prompt, list):
            return self._chat(prompt, [{"role": "assistant", "content": str(response)}])
        ids = self.tokenizer(str(response), add_special_tokens=False)["input_ids"]
        return self.prompt(prompt) + list(ids) + [self.tokenizer.eos_token_id]

    def _chat(self, prompt: list[dict], reply: list[dict]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("chat messages need a tokenizer with a chat template; this "
                            "model's has none (store the text as strings instead)")
        ids = self.tokenizer.apply_chat_template(prompt + reply, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids")
                    else ids)


def padded_batch(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return ids, mask
