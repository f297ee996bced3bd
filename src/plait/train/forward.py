"""Teacher-forced forward passes over an Experience: per-token log-probs,
entropies and critic values, aligned with the response tokens."""

from __future__ import annotations

import torch

from plait.train.experience import Experience


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, batch: Experience, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each response token: ``[B, R, V]``, divided by ``temperature``."""
    input_ids = batch.input_ids()
    attention_mask = batch.attention_mask()
    width = batch.response_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    if logits.shape[1] != width:
        raise RuntimeError(f"the model returned logits for {logits.shape[1] + 1} positions, "
                           f"expected {width + 1}: it ignores logits_to_keep (transformers "
                           "too old?)")
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: ``[B, R, V], [B, R] -> [B, R]``."""
    logz = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - logz


def response_logprobs(model, batch: Experience, temperature: float = 1.0) -> torch.Tensor:
    return token_logprobs(response_logits(model, batch, temperature), batch.response_ids)


def response_values(critic, batch: Experience) -> torch.Tensor:
    """Critic value of each response position: ``[B, R]`` (the value of the state before
    the token is emitted, as in GAE's V(s_t))."""
    input_ids = batch.input_ids()
    attention_mask = batch.attention_mask()
    width = batch.response_ids.shape[1]
    values = critic(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask))
    return values[:, -width - 1:-1].float()
