"""Supervised next-token losses: the SFT warm start's, and PTX, the pretraining (or SFT)
loss that DeepSpeed-Chat mixes into each actor update so the policy keeps what it could
do before RL."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from plait.config import Config
from plait.train.forward import position_ids_from_mask

IGNORE = -100


def sft_batch(rows: list[dict], encode_prompt: Callable[[str], list[int]], tokenizer
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, right-padded, labels masked on prompts."""
    sequences = []
    for row in rows:
        prompt = encode_prompt(row["prompt"])
        answer = tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"]
        sequences.append((prompt, answer + [tokenizer.eos_token_id]))
    width = max(len(p) + len(a) for p, a in sequences)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, (prompt, answer) in enumerate(sequences):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt): len(ids)] = torch.tensor(answer)
    return input_ids, attention_mask, labels


def sft_loss(model, input_ids, attention_mask, labels, reduction: str = "mean"
             ) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
        reduction=reduction)


class PtxLoss:
    """PTX (``algo.ptx_coef`` > 0): next-token loss on ``algo.ptx_batch_size`` rows of
    supervised data, added to each optimizer step of the actor with weight ``ptx_coef``.

    Each optimizer step draws its rows from a generator seeded by the step and its place
    in the update, so a resumed run draws what the uninterrupted one did; every rank
    takes its share of the rows and the loss is normalised by the batch's answer tokens
    over every rank, so the gradient is the one-process one. The backward runs before
    the policy's micro-batches, whose synchronised backward then averages it too."""

    def __init__(self, config: Config, rows: list[dict], encode_prompt, tokenizer, dist,
                 device: torch.device):
        self.config, self.rows, self.dist, self.device = config, rows, dist, device
        self.tokenizer = tokenizer
        # plain text (an empty prompt) is not wrapped in a chat template
        self.encode_prompt = lambda prompt: encode_prompt(prompt) if prompt else []

    def backward(self, model, step: int, index: int,
                 autocast: Callable | None = None) -> dict[str, float]:
        """Add the PTX gradient of optimizer step ``index`` of RL step ``step`` to
        ``model``'s gradients; its loss (this rank's share) for the log."""
        algo, dist = self.config.algo, self.dist
        generator = torch.Generator().manual_seed(
            self.config.train.seed * 1_000_003 + step * 1009 + index + 17)
        picked = torch.randint(len(self.rows), (algo.ptx_batch_size,), generator=generator)
        lo, hi = dist.shard_bounds(algo.ptx_batch_size)
        rows = [self.rows[i] for i in picked[lo:hi].tolist()]
        local = 0.0
        if rows:
            ids, mask, labels = sft_batch(rows, self.encode_prompt, self.tokenizer)
            local = float((labels[:, 1:] != IGNORE).sum())
        tokens = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(tokens, kind="control")
        if not rows:
            return {"loss/ptx": 0.0}
        with autocast() if autocast is not None else contextlib.nullcontext():
            summed = sft_loss(model, ids.to(self.device), mask.to(self.device),
                              labels.to(self.device), reduction="sum")
        share = summed / max(float(tokens), 1.0)
        (algo.ptx_coef * share * dist.world_size).backward()
        return {"loss/ptx": float(share.detach())}

