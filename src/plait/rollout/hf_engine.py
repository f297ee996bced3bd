"""Reference engine: Hugging Face ``generate`` on the trainer's own model.

Simple and exact, not fast: every row of a batch keeps computing until the
longest one finishes. The model object is shared with the trainer, so a
weight update is free; the engine only tracks the version.

Stop strings: ``generate`` matches them over prompt + completion, so one can end a row
whose own text lacks it (plait's engine matches the completion only).

Sampling is fully specified by :class:`SamplingParams`: settings a model's own
``generation_config.json`` may carry (top-k, repetition penalty, ...) are
pinned off, so completions come from exactly the distribution the trainer
computes log-probs for (softmax of logits / temperature, top-k / top-p
filtered when asked).
"""

from __future__ import annotations

from collections import deque

import torch
from transformers import GenerationConfig

from plait.rollout.base import Completion, SamplingParams


def end_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation
    config EOS ids (Llama 3 lists several; chat models end turns with their own token)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an "
                         "EOS token; set tokenizer.eos_token")
    return sorted(ids)


class HFGenerateEngine:
    """Generation with ``model.generate``.

    ``return_logprobs=True`` also returns each sampled token's log-probability under the
    sampling distribution. It keeps every step's logits until the batch ends
    (``[B, V]`` per token), so leave it off for large vocabularies unless needed."""

    def __init__(self, model, tokenizer, *, batch_size: int = 256, return_logprobs: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.return_logprobs = return_logprobs
        self.policy_version = 0
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token "
                             "(e.g. to its eos token) before generating")
        self.end_ids = end_token_ids(model, tokenizer)
        self._queue: deque = deque()  # submitted (prompts, params, n, first_index)

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               seeds: list[int] | None = None, first_index: int = 0) -> None:
        """Queue ``n`` samples of each prompt (``seeds`` cannot be honoured: ``generate``
        draws from the global generator)."""
        self._queue.append((list(prompts), params, n, first_index))

    def stream(self, pause=None):
        """Generate everything queued, one ``generate`` call per submission, and yield
        its groups (they all finish together; ``pause`` is not asked)."""
        while self._queue:
            prompts, params, n, first_index = self._queue.popleft()
            for index, group in enumerate(self.generate(prompts, params, n)):
                yield first_index + index, group

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def reset(self) -> None:
        self._queue.clear()

    def release(self) -> None:
        """Nothing is cached between calls."""

    def update_weights(self, state_dict, version: int) -> None:
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=False)
        self.policy_version = version

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            # no end tokens at all when ignoring EOS: an empty list, as None means "unset"
            # and generate would fill it from the model's own generation config
            eos_token_id=[] if params.ignore_eos else self.end_ids,
            return_dict_in_generate=True,
            output_scores=self.return_logprobs,
            # pinned so a model's generation_config.json cannot change the distribution
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
        )
        if params.greedy:
            kwargs.update(do_sample=False)  # no warpers apply to greedy decoding
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k)
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
        new_tokens = out.sequences[:, width:]
        logprobs = None
        if self.return_logprobs and out.scores:
            # scores are the processed logits the sampler drew from; gather step by step
            # instead of stacking [B, T, V]
            logprobs = torch.stack([
                torch.log_softmax(step_scores.float(), dim=-1).gather(
                    -1, new_tokens[:, t:t + 1]).squeeze(-1)
                for t, step_scores in enumerate(out.scores)], dim=1).cpu()
        new_tokens = new_tokens.cpu()
        return [self._completion(row, prompt_index, new_tokens[row], logprobs, params)
                for row, (prompt_index, _) in enumerate(chunk)]

    def _completion(self, row, prompt_index, tokens, logprobs, params) -> Completion:
        ids = tokens.tolist()
        cut, finish = len(ids), "length"
        if params.stop and any(s in self.tokenizer.decode(ids) for s in params.stop):
            # a stop string ends the response at the token that completed it; generate pads
            # the rest of the row (with pad, which may equal EOS)
            for end in range(1, len(ids) + 1):
                if any(s in self.tokenizer.decode(ids[:end]) for s in params.stop):
                    cut, finish = end, "stop"
                    break
        for index, token in enumerate(ids[:cut]):
            if token in self.end_ids and not params.ignore_eos:
                cut, finish = index + 1, "stop"
                break
        if finish == "length" and params.stop and ids and ids[-1] == self.tokenizer.pad_token_id:
            # generate matches stop strings across the prompt boundary too, so a row can
            # stop with no stop string in its own text: it still stopped, not ran out
            while cut and ids[cut - 1] == self.tokenizer.pad_token_id:
                cut -= 1
            finish = "stop"
        ids = ids[:cut]
        row_logprobs = logprobs[row, :cut].tolist() if logprobs is not None else None
        text = params.cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True))
        return Completion(prompt_index=prompt_index, token_ids=ids, logprobs=row_logprobs,
                          finish_reason=finish, policy_version=self.policy_version, text=text)
