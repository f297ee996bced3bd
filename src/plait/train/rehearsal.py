"""Selective rehearsal in the RL update (``rehearsal.coef`` > 0; Peng et al. 2023): the
policy keeps answering the kinds of prompts it already answered well.

Every RL step adds the step's samples (all ranks', gathered, so every rank holds the
same pool) to a pool of the last ``rehearsal.pool_steps`` steps. After step
``pool_steps``, and every ``refresh_every`` steps after that when set, the pool is
selected from: each candidate's prompt embedded by the policy (its last hidden state
averaged over the prompt's tokens), the embeddings clustered by k-means, and each
cluster's highest-reward responses kept (:mod:`plait.algos.rehearsal`). From then on each
optimizer step adds ``coef`` x the next-token loss of ``batch_size`` kept responses
(a :class:`~plait.train.supervised.MixedLoss`). The pool, the kept responses and when they
were chosen live in the trainer state, so a resumed run rehearses what the uninterrupted
one would.
"""

from __future__ import annotations

import time

import torch

from plait.algos.rehearsal import kmeans, select_per_cluster
from plait.config import Config
from plait.train.experience import Experience
from plait.train.supervised import MixedLoss

EMBED_BATCH = 64  # prompts per embedding forward


class Rehearsal(MixedLoss):
    """The rehearsal pool, its selection and its loss; ``state()`` is the trainer state
    dict it keeps its data in."""

    name, salt = "rehearsal", 29

    def __init__(self, config: Config, pad: int, dist, device: torch.device, state):
        super().__init__(config, config.rehearsal.coef, config.rehearsal.batch_size, pad,
                         dist, device)
        self.settings = config.rehearsal
        self._state = state

    @property
    def data(self) -> dict:
        """``pool``: [step, prompt ids, response ids, reward] per sample; ``kept``:
        [prompt ids, response ids] per rehearsed response; ``selected_at``: the step of
        the last selection (0: none yet)."""
        return self._state().setdefault("rehearsal",
                                        {"pool": [], "kept": [], "selected_at": 0})

    def pool_size(self) -> int:
        return len(self.data["kept"])

    def example(self, index: int) -> tuple[list[int], list[bool]]:
        prompt, response = self.data["kept"][index]
        return prompt + response, [False] * len(prompt) + [True] * len(response)

    # ------------------------------------------------------------------ the pool

    def observe(self, batch: Experience | None, step: int) -> None:
        """Add step ``step``'s samples of every rank (``batch``: this rank's; None or a
        ghost: none) and forget those older than ``pool_steps``."""
        mine = []
        if batch is not None and not batch.ghost:
            low = self.settings.min_reward
            prompt_mask = batch.prompt_mask.bool().cpu()
            lengths = batch.response_mask.sum(-1).long().tolist()
            prompts, responses = batch.prompt_ids.cpu(), batch.response_ids.cpu()
            for row, reward in enumerate(batch.rewards.float().tolist()):
                if low is not None and reward < low:
                    continue
                mine.append([step, prompts[row][prompt_mask[row]].tolist(),
                             responses[row, :lengths[row]].tolist(), reward])
        everyone = self.dist.all_gather_objects(mine, kind="control") if self.dist.active \
            else [mine]
        data = self.data
        data["pool"] = [entry for entry in data["pool"]
                        if entry[0] > step - self.settings.pool_steps]
        data["pool"] += [entry for rank in everyone for entry in rank]

    def due(self, step: int) -> bool:
        """Whether step ``step`` selects: the first time once ``pool_steps`` steps are
        pooled, then every ``refresh_every`` steps."""
        settings, data = self.settings, self.data
        if not data["selected_at"]:
            return step >= settings.pool_steps
        return bool(settings.refresh_every) and \
            step - data["selected_at"] >= settings.refresh_every

    @torch.no_grad()
    def select(self, policy, step: int) -> dict[str, float]:
        """Choose the rehearsed responses from the pool (see the module doc); metrics."""
        start = time.perf_counter()
        settings, data = self.settings, self.data
        best: dict[tuple, float] = {}  # (prompt, response) -> its best reward
        for _, prompt, response, reward in data["pool"]:
            key = (tuple(prompt), tuple(response))
            best[key] = max(reward, best.get(key, reward))
        data["selected_at"] = step
        if not best:
            data["kept"] = []
            return {"rehearsal/kept": 0.0, "rehearsal/candidates": 0.0}
        candidates = sorted(best)  # the same order on every rank
        prompts = sorted({prompt for prompt, _ in candidates})
        vectors = self.embed(policy, [list(p) for p in prompts])
        row_of = {prompt: i for i, prompt in enumerate(prompts)}
        points = vectors[[row_of[prompt] for prompt, _ in candidates]]
        labels, _ = kmeans(points, settings.clusters,
                           seed=self.config.train.seed * 7_919 + step)
        rewards = torch.tensor([best[key] for key in candidates], dtype=torch.float64)
        picked = select_per_cluster(labels, rewards, settings.size)
        data["kept"] = [[list(candidates[i][0]), list(candidates[i][1])] for i in picked]
        return {"rehearsal/kept": float(len(picked)),
                "rehearsal/candidates": float(len(candidates)),
                "rehearsal/clusters": float(len(set(labels.tolist()))),
                "rehearsal/kept_reward": float(rewards[picked].mean()) if picked else 0.0,
                "rehearsal/candidate_reward": float(rewards.mean()),
                "rehearsal/select_s": time.perf_counter() - start}

    def embed(self, policy, prompts: list[list[int]]) -> torch.Tensor:
        """``[N, hidden]``: the policy's last hidden state averaged over each prompt's
        tokens (float64, CPU)."""
        was_training = policy.training
        policy.eval()
        out = []
        try:
            for start in range(0, len(prompts), EMBED_BATCH):
                chunk = prompts[start:start + EMBED_BATCH]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, prompt in enumerate(chunk):
                    ids[row, :len(prompt)] = torch.tensor(prompt)
                    mask[row, :len(prompt)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                decoder = policy.get_decoder() if hasattr(policy, "get_decoder") else None
                if decoder is not None:  # the decoder alone: no logits to compute
                    hidden = decoder(input_ids=ids, attention_mask=mask,
                                     use_cache=False).last_hidden_state
                else:
                    hidden = policy(input_ids=ids, attention_mask=mask, use_cache=False,
                                    output_hidden_states=True).hidden_states[-1]
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * weights).sum(1) / weights.sum(1)).double().cpu())
        finally:
            policy.train(was_training)
        return torch.cat(out)
