"""Typed containers for a batch of experience.

Layout: every sequence is ``[prompt | response]`` with the prompt left-padded
to width P and the response right-padded to width R. All per-token tensors
(log-probs, values, advantages, masks) are ``[B, R]`` and aligned with
``response_ids``; per-sequence tensors are ``[B]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from plait.rollout.base import Completion


@dataclass
class Experience:
    """One batch of rollouts and everything computed from them."""

    prompt_ids: torch.Tensor          # [B, P] long, left-padded
    prompt_mask: torch.Tensor         # [B, P] long
    response_ids: torch.Tensor        # [B, R] long, right-padded
    response_mask: torch.Tensor       # [B, R] float, 1 on generated tokens
    group_ids: torch.Tensor           # [B] long, one id per prompt
    rewards: torch.Tensor | None = None          # [B] total reward per sequence
    sampled_logprobs: torch.Tensor | None = None  # [B, R] from the rollout engine
    old_logprobs: torch.Tensor | None = None      # [B, R] behaviour policy (trainer forward)
    ref_logprobs: torch.Tensor | None = None      # [B, R] reference policy
    values: torch.Tensor | None = None            # [B, R] critic values
    advantages: torch.Tensor | None = None        # [B, R]
    returns: torch.Tensor | None = None           # [B, R] critic targets
    policy_version: int = 0
    texts: list[str] | None = None                # decoded completions, one per row
    reward_failures: int = 0                      # reward calls that failed (fallback used)
    reward_terms: torch.Tensor | None = None      # [B, F] each reward function's own value
    reward_names: tuple[str, ...] = ()            # the F functions' names
    truncated: torch.Tensor | None = None         # [B] bool, cut at max_new_tokens, no end
    ghost: bool = False  # a zero-weight stand-in: the rank joins collectives, adds nothing

    @property
    def nbytes(self) -> int:
        """Bytes held by this batch's tensors."""
        return sum(t.numel() * t.element_size() for _, t in self._tensor_fields())

    @property
    def num_real_rows(self) -> int:
        return 0 if self.ghost else self.batch_size

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def _tensor_fields(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value

    def map(self, fn) -> Experience:
        """A new Experience with ``fn`` applied to every tensor field."""
        changes = {name: fn(name, value) for name, value in self._tensor_fields()}
        return dataclasses.replace(self, **changes)

    def to(self, device) -> Experience:
        return self.map(lambda _, t: t.to(device))

    def select(self, index: torch.Tensor) -> Experience:
        """Rows ``index`` (a long tensor of row numbers)."""
        picked = self.map(lambda _, t: t[index])
        if self.texts is not None:
            picked.texts = [self.texts[i] for i in index.tolist()]
        return picked

    def ghost_row(self) -> Experience:
        """A one-row, zero-weight stand-in (row 0 with no response tokens and no
        advantage): a rank with nothing to add still runs the collectives of a step."""
        ghost = self.select(torch.tensor([0]))
        ghost.ghost = True
        ghost.response_mask = torch.zeros_like(ghost.response_mask)
        for name in ("advantages", "returns"):
            if getattr(ghost, name) is not None:
                setattr(ghost, name, torch.zeros_like(getattr(ghost, name)))
        return ghost

    def trimmed(self) -> Experience:
        """Drop prompt columns that are padding in every row and response columns past the
        longest response, so a micro-batch computes no wasted positions."""
        prompt_keep = int(self.prompt_mask.any(0).nonzero().min()) if self.prompt_mask.any() else 0
        response_len = int(self.response_lengths.max().item()) if self.batch_size else 0
        response_len = max(response_len, 1)

        def trim(name, t):
            if name in ("prompt_ids", "prompt_mask"):
                return t[:, prompt_keep:]
            if name != "reward_terms" and t.dim() == 2 \
                    and t.shape[1] == self.response_ids.shape[1]:
                return t[:, :response_len]
            return t

        return self.map(trim)

    def prompt_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, inverse)``: the first row of each distinct prompt (in row order), and
        for every row the number of its distinct prompt (``first[inverse]`` has each
        row's prompt). Padding does not tell prompts apart."""
        key = self.prompt_ids.masked_fill(self.prompt_mask == 0, -1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        rows = torch.arange(self.batch_size, device=key.device)
        first = torch.full((int(inverse.max()) + 1,), self.batch_size, device=key.device,
                           dtype=torch.long).scatter_reduce(0, inverse, rows, "amin")
        order = first.argsort()  # number distinct prompts by their first row
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return first[order], rank[inverse]

    def micro_batch_indices(self, size: int, token_budget: int | None = None,
                            share_prompts: bool = False) -> list[torch.Tensor]:
        """Row indices of each micro-batch.

        Without a budget: consecutive slices of ``size`` rows. With ``token_budget``:
        rows sorted by length (longest first) and packed greedily while the padded
        positions computed stay within the budget (and at most ``size`` rows), so short
        sequences are not padded to the longest one. The positions are
        ``rows x (longest prompt + longest response)``; with ``share_prompts`` (each
        distinct prompt run once for its rows) they are ``prompts x longest prompt +
        rows x longest response``, and rows that share a prompt are kept together
        unless their prompt alone exceeds the budget."""
        if token_budget is None:
            return [torch.arange(s, min(s + size, self.batch_size))
                    for s in range(0, self.batch_size, size)]
        prompt_len = self.prompt_mask.sum(-1).tolist()
        response_len = self.response_mask.sum(-1).tolist()
        if share_prompts:
            _, inverse = self.prompt_index()
            units: dict[int, list[int]] = {}
            for row, unit in enumerate(inverse.tolist()):
                units.setdefault(unit, []).append(row)
        else:
            units = {row: [row] for row in range(self.batch_size)}
        # pieces: rows of one prompt, longest response first, each fitting on its own
        pieces = []
        for rows in units.values():
            rows.sort(key=lambda i: -response_len[i])
            piece = []
            for i in rows:
                if piece and not self._fits(len(piece) + 1, 1, prompt_len[i],
                                            response_len[piece[0]], size, token_budget,
                                            share_prompts):
                    pieces.append(piece)
                    piece = []
                piece.append(i)
            pieces.append(piece)
        pieces.sort(key=lambda piece: -(prompt_len[piece[0]] + response_len[piece[0]]))
        parts, current, n_prompts, widest_p, widest_r = [], [], 0, 0, 0
        for piece in pieces:
            p = max(widest_p, prompt_len[piece[0]])
            r = max(widest_r, response_len[piece[0]])
            if current and not self._fits(len(current) + len(piece), n_prompts + 1, p, r, size,
                                          token_budget, share_prompts):
                parts.append(torch.tensor(current))
                current, n_prompts = [], 0
                p, r = prompt_len[piece[0]], response_len[piece[0]]
            current.extend(piece)
            n_prompts += 1
            widest_p, widest_r = p, r
        parts.append(torch.tensor(current))
        return parts

    @staticmethod
    def _fits(rows: int, prompts: int, prompt_width: float, response_width: float, size: int,
              budget: int, share_prompts: bool) -> bool:
        if rows > size:
            return False
        if share_prompts:
            return prompts * prompt_width + rows * response_width <= budget
        return rows * (prompt_width + response_width) <= budget

    def micro_batches(self, size: int, token_budget: int | None = None,
                      share_prompts: bool = False) -> list[Experience]:
        """The micro-batches of :meth:`micro_batch_indices`, each trimmed of padding."""
        return [self.select(idx).trimmed()
                for idx in self.micro_batch_indices(size, token_budget, share_prompts)]

    @staticmethod
    def cat(parts: list[Experience], pad_token_id: int) -> Experience:
        """Concatenate batches, re-padding prompts (left) and responses (right)."""
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        response_width = max(p.response_ids.shape[1] for p in parts)
        fields = {}
        for name, _ in parts[0]._tensor_fields():
            tensors = [getattr(p, name) for p in parts]
            if any(t is None for t in tensors):
                fields[name] = None
                continue
            if name in ("prompt_ids", "prompt_mask"):
                fill = pad_token_id if name == "prompt_ids" else 0
                tensors = [_pad_left(t, prompt_width, fill) for t in tensors]
            elif tensors[0].dim() == 2 and name != "reward_terms":  # per token
                fill = pad_token_id if name == "response_ids" else 0
                tensors = [_pad_right(t, response_width, fill) for t in tensors]
            fields[name] = torch.cat(tensors, dim=0)
        if all(p.texts is not None for p in parts):
            fields["texts"] = [t for p in parts for t in p.texts]
        return dataclasses.replace(parts[0], **fields)


def _pad_left(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill)


def _pad_right(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)


def experience_from_tokens(prompts: list[list[int]], responses: list[list[int]],
                           group_ids: list[int], pad_token_id: int) -> Experience:
    """Token-id prompts (left-padded) and responses (right-padded, all of each counted),
    one row per pair of them; rows with the same prompt share it in the shared-prompt
    passes."""
    prompt_width = max(map(len, prompts))
    response_width = max(1, max(map(len, responses)))
    return Experience(
        prompt_ids=torch.tensor([[pad_token_id] * (prompt_width - len(p)) + list(p)
                                 for p in prompts]),
        prompt_mask=torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p)
                                  for p in prompts]),
        response_ids=torch.tensor([list(r) + [pad_token_id] * (response_width - len(r))
                                   for r in responses]),
        response_mask=torch.tensor([[1.0] * len(r) + [0.0] * (response_width - len(r))
                                    for r in responses]),
        group_ids=torch.tensor(group_ids, dtype=torch.long))


def experience_from_completions(prompts: list[list[int]], groups: list[list[Completion]],
                                group_ids: list[int], pad_token_id: int) -> Experience:
    """Pack grouped completions into padded tensors. ``groups[i]`` answers ``prompts[i]``."""
    rows = [(prompts[i], c, group_ids[i]) for i, group in enumerate(groups) for c in group]
    prompt_width = max(len(p) for p, _, _ in rows)
    response_width = max(1, max(len(c.token_ids) for _, c, _ in rows))
    have_logprobs = all(c.logprobs is not None for _, c, _ in rows)
    # padded Python lists, then one tensor per field (per-row tensor writes cost more than
    # the packing itself on small batches)
    prompt_ids, prompt_mask, response_ids, response_mask, sampled = [], [], [], [], []
    for prompt, completion, _ in rows:
        gap = prompt_width - len(prompt)
        prompt_ids.append([pad_token_id] * gap + list(prompt))
        prompt_mask.append([0] * gap + [1] * len(prompt))
        tokens = completion.token_ids
        tail = response_width - len(tokens)
        response_ids.append(list(tokens) + [pad_token_id] * tail)
        response_mask.append([1.0] * len(tokens) + [0.0] * tail)
        if have_logprobs:
            sampled.append(list(completion.logprobs) + [0.0] * tail)
    prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
    prompt_mask = torch.tensor(prompt_mask, dtype=torch.long)
    response_ids = torch.tensor(response_ids, dtype=torch.long)
    response_mask = torch.tensor(response_mask)
    sampled = torch.tensor(sampled) if have_logprobs else None
    return Experience(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
        response_mask=response_mask,
        group_ids=torch.tensor([g for _, _, g in rows], dtype=torch.long),
        sampled_logprobs=sampled,
        policy_version=min(c.policy_version for _, c, _ in rows),
        truncated=torch.tensor([c.finish_reason == "length" for _, c, _ in rows]),
    )
