"""Reference engine: Hugging Face ``generate`` on the trainer's own model.

Simple and exact, not fast: every row of a batch keeps computing until the
longest one finishes. The model object is shared with the trainer, so a
weight update is free; the engine only tracks the version.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from plait.rollout.base import Completion, SamplingParams


class HFGenerateEngine:
    """Generation with ``model.generate``, returning sampled-token log-probs."""

    def __init__(self, model, tokenizer, *, batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.policy_version = 0
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token "
                             "(e.g. to its eos token) before generating")

    def update_weights(self, state_dict, version: int) -> None:
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=False)
        self.policy_version = version

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1
                 ) -> list[list[Completion]]:
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start:start + self.batch_size]
                for completion in self._generate_chunk(chunk, params):
                    results[completion.prompt_index].append(completion)
        finally:
            self.model.train(was_training)
        return results

    def _generate_chunk(self, chunk, params: SamplingParams) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(p) for _, p in chunk)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):  # left padding
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        extra = {"tokenizer": self.tokenizer} if params.stop else {}
        out = self.model.generate(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device),
                                  generation_config=self._generation_config(params), **extra)
        new_tokens = out.sequences[:, width:].cpu()
        # scores are the processed logits the sampler drew from (temperature, top-k/p applied)
        scores = torch.stack(out.scores, dim=1).float().cpu() if out.scores else None
        logprobs = None
        if scores is not None:
            logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1))
            logprobs = logprobs.squeeze(-1)
        return [self._completion(row, prompt_index, new_tokens[row], logprobs, params)
                for row, (prompt_index, _) in enumerate(chunk)]

    def _completion(self, row, prompt_index, tokens, logprobs, params) -> Completion:
        eos = self.tokenizer.eos_token_id
        ids = tokens.tolist()
        finish = "length"
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
            finish = "stop"
        elif params.stop and any(s in self.tokenizer.decode(ids) for s in params.stop):
            finish = "stop"  # generate pads rows it stopped early: drop the padding
            while ids and ids[-1] == self.tokenizer.pad_token_id:
                ids.pop()
        row_logprobs = logprobs[row, : len(ids)].tolist() if logprobs is not None else None
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        return Completion(prompt_index=prompt_index, token_ids=ids, logprobs=row_logprobs,
                          finish_reason=finish, policy_version=self.policy_version, text=text)
