"""Teacher-forced forward passes over an Experience: per-token log-probs,
entropies and critic values, aligned with the response tokens."""

from __future__ import annotations

import torch

from plait.train.experience import Experience


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, batch: Experience, temperature: float = 1.0,
                    share_prompts: bool = False) -> torch.Tensor:
    """Logits that predict each response token: ``[B, R, V]``, divided by ``temperature``.

    ``share_prompts``: rows with the same prompt (a GRPO group) run that prompt once and
    their responses against its cached keys and values; the result equals the full
    forward of every ``[prompt | response]`` row (gradients flow through the shared
    prompt into every response that attends to it)."""
    width = batch.response_ids.shape[1]
    logits = _shared_prompt_logits(model, batch, width) if share_prompts else None
    if logits is None:
        input_ids = batch.input_ids()
        attention_mask = batch.attention_mask()
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    logits_to_keep=width + 1, use_cache=False)
        logits = out.logits[:, :-1]
    logits = logits.float()
    if logits.shape[1] != width:
        raise RuntimeError(f"the model returned logits for {logits.shape[1] + 1} positions, "
                           f"expected {width + 1}: it ignores logits_to_keep (transformers "
                           "too old?)")
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return logits


def _shared_prompt_logits(model, batch: Experience, width: int) -> torch.Tensor | None:
    """Response logits with each distinct prompt computed once; ``None`` when no two rows
    share a prompt or the model keeps no selectable cache (the caller runs rows in full)."""
    if batch.batch_size < 2:
        return None
    first, inverse = batch.prompt_index()
    if first.numel() == batch.batch_size:
        return None
    prompt_ids, prompt_mask = batch.prompt_ids[first], batch.prompt_mask[first]
    keep = int(prompt_mask.any(0).nonzero().min())  # columns padded in every distinct prompt
    prompt_ids, prompt_mask = prompt_ids[:, keep:], prompt_mask[:, keep:]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                position_ids=position_ids_from_mask(prompt_mask), use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    head = out.logits[:, -1:][inverse]            # predicts each row's first response token
    if width == 1:
        return head
    cache.batch_select_indices(inverse)            # one copy of its prompt's keys per row
    rest = batch.response_ids[:, : width - 1]
    mask = torch.cat([prompt_mask[inverse], batch.response_mask[:, : width - 1].long()], 1)
    start = prompt_mask.sum(-1)[inverse].unsqueeze(1)
    positions = start + torch.arange(width - 1, device=rest.device)
    tail = model(input_ids=rest, attention_mask=mask, position_ids=positions,
                 past_key_values=cache, use_cache=True).logits
    return torch.cat([head, tail], dim=1)


class ResponseLogits(torch.nn.Module):
    """A causal LM whose one call computes an Experience's response logits: the module a
    data-parallel wrapper wraps, so the shared-prompt path (two model calls) is still one
    forward to it."""

    def __init__(self, model, share_prompts: bool = False):
        super().__init__()
        self.model = model
        self.share_prompts = share_prompts

    def forward(self, batch: Experience, temperature: float = 1.0) -> torch.Tensor:
        return response_logits(self.model, batch, temperature, self.share_prompts)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: ``[B, R, V], [B, R] -> [B, R]``."""
    logz = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - logz


def response_logprobs(model, batch: Experience, temperature: float = 1.0,
                      share_prompts: bool = False) -> torch.Tensor:
    return token_logprobs(response_logits(model, batch, temperature, share_prompts),
                          batch.response_ids)


def response_values(critic, batch: Experience) -> torch.Tensor:
    """Critic value of each response position: ``[B, R]`` (the value of the state before
    the token is emitted, as in GAE's V(s_t))."""
    input_ids = batch.input_ids()
    attention_mask = batch.attention_mask()
    width = batch.response_ids.shape[1]
    values = critic(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask))
    return values[:, -width - 1:-1].float()
