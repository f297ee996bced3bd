"""Supervised next-token losses: the SFT warm start's, and PTX, the pretraining (or SFT)
loss that DeepSpeed-Chat mixes into each actor update so the policy keeps what it could
do before RL."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from plait.config import Config
from plait.data.datasets import DataError
from plait.train.forward import position_ids_from_mask

IGNORE = -100


class SupervisedEncoder:
    """A supervised row as ``(ids, learn)``: its token ids and, per token, whether the
    model learns to write it. ``{"prompt", "answer"}``: the prompt as the policy sees it
    (``encode_prompt``; nothing for an empty prompt, i.e. plain text), then the answer's
    tokens and the end token, learned. ``{"messages"}``: the conversation through the
    tokenizer's chat template, every assistant turn learned (each turn's tokens are what
    the template adds after the conversation before it and its generation prompt)."""

    def __init__(self, tokenizer, encode_prompt: Callable[[str], list[int]]):
        self.tokenizer, self.encode_prompt = tokenizer, encode_prompt

    def __call__(self, row: dict) -> tuple[list[int], list[bool]]:
        if "messages" in row:
            return self._conversation(row["messages"])
        prompt = self.encode_prompt(row["prompt"]) if row["prompt"] else []
        answer = self.tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"]
        answer = [*answer, self.tokenizer.eos_token_id]
        return prompt + answer, [False] * len(prompt) + [True] * len(answer)

    def _render(self, messages: list[dict], prompt: bool = False) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True,
                                                 add_generation_prompt=prompt)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids")
                    else ids)

    def _conversation(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("'messages' rows need a tokenizer with a chat template; this "
                            "model's has none (store prompt and answer strings instead)")
        ids = self._render(messages)
        learn = [False] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:turn], prompt=True) if turn else []
            upto = self._render(messages[:turn + 1])
            if upto[:len(before)] != before or ids[:len(upto)] != upto:
                raise DataError("the chat template does not write assistant turn "
                                f"{turn + 1} as a continuation of the conversation before "
                                "it, so its tokens cannot be told apart")
            learn[len(before):len(upto)] = [True] * (len(upto) - len(before))
        return ids, learn


def sft_batch(rows: list[dict], encode_prompt: Callable[[str], list[int]], tokenizer
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, right-padded, labels masked on prompts."""
    encode = SupervisedEncoder(tokenizer, encode_prompt)
    return padded_examples([encode(row) for row in rows], tokenizer.pad_token_id)


def padded_examples(examples: list[tuple[list[int], list[bool]]], pad: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoded examples as right-padded ``(input_ids, attention_mask, labels)``."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, learn) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(learn), torch.tensor(ids), IGNORE)
    return input_ids, attention_mask, labels


def packed_examples(examples: list[tuple[list[int], list[bool]]], max_tokens: int, pad: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples packed into rows of at most ``max_tokens`` (first fit, longest first):
    ``(input_ids, position_ids, segment, labels)``; each example restarts its positions
    at 0 and is its own ``segment`` (-1: padding); an example's first token is never a
    label (nothing of its own precedes it), as in a row of its own."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index][0])
        place = next((b for b, free in enumerate(room) if free >= size), None)
        if place is None:
            bins.append([])
            room.append(max(max_tokens, size))
            place = len(bins) - 1
        bins[place].append(index)
        room[place] -= size
    width = max(sum(len(examples[i][0]) for i in b) for b in bins)
    shape = (len(bins), width)
    input_ids = torch.full(shape, pad, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    for row, members in enumerate(bins):
        at = 0
        for index in members:
            ids, learn = examples[index]
            n = len(ids)
            input_ids[row, at:at + n] = torch.tensor(ids)
            positions[row, at:at + n] = torch.arange(n)
            segment[row, at:at + n] = index
            target = torch.where(torch.tensor(learn), torch.tensor(ids), IGNORE)
            target[0] = IGNORE
            labels[row, at:at + n] = target
            at += n
    return input_ids, positions, segment, labels


def sft_loss(model, input_ids, attention_mask, labels, reduction: str = "mean"
             ) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
        reduction=reduction)


def next_token_stats(logits: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, int, int]:
    """Summed next-token loss over the labelled tokens, their count, and how many of them
    the model's most likely token matches (``labels`` aligned with the inputs)."""
    targets = labels[:, 1:]
    scored = logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(scored.flatten(0, 1).float(),
                                             targets.flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    learned = targets != IGNORE
    correct = int(((scored.argmax(-1) == targets) & learned).sum())
    return loss, int(learned.sum()), correct


class MixedLoss:
    """A next-token loss on ``batch_size`` examples drawn from a pool, added to each
    optimizer step of the actor with weight ``coef`` (PTX; selective rehearsal).

    Each optimizer step draws its examples from a generator seeded by the step, its
    place in the update and the loss's own ``salt``, so a resumed run draws what the
    uninterrupted one did; every rank takes its share of the examples and the loss is
    normalised by the batch's learned tokens over every rank, so the gradient is the
    one-process one. The backward runs before the policy's micro-batches, whose
    synchronised backward then averages it too. Subclasses give the pool."""

    name = "mixed"
    salt = 0

    def __init__(self, config: Config, coef: float, batch_size: int, pad: int, dist,
                 device: torch.device):
        self.config, self.coef, self.batch_size = config, coef, batch_size
        self.pad, self.dist, self.device = pad, dist, device

    def pool_size(self) -> int:
        raise NotImplementedError

    def example(self, index: int) -> tuple[list[int], list[bool]]:
        """Pool entry ``index`` as ``(ids, learn)``."""
        raise NotImplementedError

    def backward(self, model, step: int, index: int,
                 autocast: Callable | None = None) -> dict[str, float]:
        """Add this loss's gradient for optimizer step ``index`` of RL step ``step`` to
        ``model``'s gradients; its value (this rank's share) for the log. An empty pool
        (the same on every rank) adds nothing."""
        key = f"loss/{self.name}"
        if not self.pool_size():
            return {key: 0.0}
        dist = self.dist
        generator = torch.Generator().manual_seed(
            self.config.train.seed * 1_000_003 + step * 1009 + index + self.salt)
        picked = torch.randint(self.pool_size(), (self.batch_size,), generator=generator)
        lo, hi = dist.shard_bounds(self.batch_size)
        examples = [self.example(i) for i in picked[lo:hi].tolist()]
        local = 0.0
        if examples:
            ids, mask, labels = padded_examples(examples, self.pad)
            local = float((labels[:, 1:] != IGNORE).sum())
        tokens = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(tokens, kind="control")
        if not examples:
            return {key: 0.0}
        with autocast() if autocast is not None else contextlib.nullcontext():
            summed = sft_loss(model, ids.to(self.device), mask.to(self.device),
                              labels.to(self.device), reduction="sum")
        share = summed / max(float(tokens), 1.0)
        (self.coef * share * dist.world_size).backward()
        return {key: float(share.detach())}


class PtxLoss(MixedLoss):
    """PTX (``algo.ptx_coef`` > 0): next-token loss on ``algo.ptx_batch_size`` rows of
    supervised data (``{"text"}`` or prompt and answer rows), in each actor update."""

    name, salt = "ptx", 17

    def __init__(self, config: Config, rows: list[dict], encode_prompt, tokenizer, dist,
                 device: torch.device):
        super().__init__(config, config.algo.ptx_coef, config.algo.ptx_batch_size,
                         tokenizer.pad_token_id, dist, device)
        self.rows = rows
        # plain text (an empty prompt) is not wrapped in a chat template
        self.encode = SupervisedEncoder(
            tokenizer, lambda prompt: encode_prompt(prompt) if prompt else [])

    def pool_size(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> tuple[list[int], list[bool]]:
        return self.encode(self.rows[index])

