"""plait's own generation engine: continuous batching over a slot KV cache.

Each running request owns one slot of the cache (:mod:`plait.rollout.slots`), so rows of
different lengths never pad each other. A finished request leaves at once and a waiting
one is prefilled into the freed slot; a group (every sample of one prompt) is handed on
as soon as its last sample finishes, so rewards and reference passes start while the
tail still generates. Sampling follows HF's order (temperature, top-k, top-p) and returns
each token's log-probability (:mod:`plait.rollout.sampling`). Tokens come to the host
every ``sync_every`` decode steps; greedy and seeded completions are those of
``sync_every=1``. ``compile=True`` runs the decode step, and the draw of greedy and
seeded tokens, through ``torch.compile``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from plait.rollout.base import Completion, SamplingParams
from plait.rollout.hf_engine import end_token_ids
from plait.rollout.sampling import SamplingPlan, sample, sampling_plan, split_seed
from plait.rollout.slots import SlotModel


@dataclass
class Request:
    """One sequence to generate: a prompt and its sampling settings."""

    request_id: int
    prompt_index: int
    prompt: list[int]
    params: SamplingParams
    seed: int | None = None
    seed_words: tuple[int, int] | None = None  # the seed as two 32-bit words
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    version: int | None = None  # policy version of the first token sampled

    @property
    def length(self) -> int:
        """Tokens of the context so far (prompt and generated): the next token's position."""
        return len(self.prompt) + len(self.tokens)




class PlaitEngine:
    """Continuous-batching generation on the trainer's (shared) model: the scheduler of
    requests over the slots of a :class:`~plait.rollout.slots.SlotModel`."""

    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_len: int | None = None,
                 sync_every: int | None = None, compile: bool = False,
                 prefill_tokens: int = 16384, compile_prefill: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.slots = SlotModel(model, max_batch=max_batch, max_len=max_len, compile=compile,
                               pad_id=tokenizer.pad_token_id or 0,
                               compile_prefill=compile_prefill)
        self.max_batch = max_batch
        # most (distinct contexts x longest context) one prefill runs: requests re-prefilled
        # with long generated tails (after new weights, a resume) are admitted over several
        # steps instead of in one pass whose attention mask grows with rows x length^2
        self.prefill_tokens = prefill_tokens
        self.end_ids = end_token_ids(model, tokenizer)
        self.policy_version = 0
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # request in slot i is _running[i]
        self._groups: dict[int, list[Completion]] = {}
        self._group_size: dict[int, int] = {}
        self._next_id = 0
        self._abort = False
        self._pending_logits: torch.Tensor | None = None
        # what the compiled step drew from _pending_logits under _plan's settings: the
        # tokens, and [2, n] tokens and log-probs as float64 (None: sample eagerly)
        self._pending_draw: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ready: deque[tuple[int, list[Completion]]] = deque()  # completed, not yet yielded
        self._plan: SamplingPlan | None = None  # sampling tensors of the running set
        device_type = self.slots.device().type
        on_cpu = device_type == "cpu"
        if sync_every is None:  # a host sync costs little on the CPU, a pipeline stall on GPU
            sync_every = 8 if device_type == "cuda" else \
                _CPU_COMPILED_RUN if compile and on_cpu else 1
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, not {sync_every}")
        self.sync_every = sync_every
        # On the CPU a compiled engine runs a whole decode run (sync_every steps, each
        # drawing its row's next token inside the graph) as one compiled call: the cost
        # of torch.compile's wrappers and the engine's loop around each call is paid once
        # per run instead of once per token (see _decode_run)
        self._run_steps = sync_every if compile and on_cpu else 1

    # ------------------------------------------------------------------ public API

    def update_weights(self, state_dict, version: int) -> None:
        """Load new weights in place (``None``: already in the shared model) and set the
        version. Requests still running (generation paused mid-way) keep their tokens and
        are re-prefilled at the next step, so every later token is sampled from the new
        weights alone (their cached keys and values were those of the old ones)."""
        self._suspend_running()
        if state_dict is not None:
            result = self.model.load_state_dict(state_dict, strict=False)
            tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
            missing = set(result.missing_keys) - tied
            if missing or result.unexpected_keys:
                raise ValueError(f"weight update does not fit the engine's model: missing "
                                 f"{sorted(missing)[:5]}, unexpected "
                                 f"{sorted(result.unexpected_keys)[:5]}")
        self.policy_version = version

    def release(self) -> None:
        """Free the KV cache (e.g. while training runs in the same process); it is
        reallocated at the next generation. Running requests go back to the queue and
        re-prefill then."""
        self._suspend_running()
        self.slots.release()

    def reset(self) -> None:
        """Drop every queued, running and completed-but-unread request."""
        self._suspend_running()
        self._waiting.clear()
        self._ready.clear()
        self._groups.clear()
        self._group_size.clear()

    @property
    def busy(self) -> bool:
        """Requests are still running or waiting."""
        return bool(self._running or self._waiting)

    def abort(self) -> None:
        """Stop generating after the current step; unfinished requests keep their tokens
        and continue on the next :meth:`resume`."""
        self._abort = True

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               seeds: list[int] | None = None, first_index: int = 0) -> None:
        """Queue ``n`` samples of each prompt; prompt ``i`` of ``prompts`` is streamed as
        index ``first_index + i`` (distinct ranges keep batches submitted while others
        still run apart)."""
        self._abort = False
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {params.max_new_tokens}")
        for position, prompt in enumerate(prompts):
            index = first_index + position
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            self._group_size[index] = self._group_size.get(index, 0) + n
            for k in range(n):
                seed = seeds[position] * 1_000_003 + k if seeds is not None else None
                self._waiting.append(self._request(index, prompt, params, seed))

    def stream(self, pause: Callable[[], bool] | None = None
               ) -> Iterator[tuple[int, list[Completion]]]:
        """Run until every queued request is done (or :meth:`abort`), yielding
        ``(prompt_index, completions)`` as each group completes. A group is removed from
        the engine only once yielded; if the consumer stops early, the rest stay queued.

        ``pause`` is asked between decode runs; when it returns true the stream ends with
        the running requests left in their slots, and the next :meth:`stream` continues
        them where they were (nothing recomputed unless the weights changed meanwhile)."""
        finished = False
        try:
            while True:
                while self._ready:
                    yield self._ready[0]
                    self._ready.popleft()
                if self._abort or not (self._waiting or self._running):
                    break
                self._steps(pause)
                if not self._ready and not self._abort and (self._waiting or self._running):
                    break  # paused
            finished = not self._abort
        finally:
            if not finished:  # abort, exception or early close: keep requests resumable
                self._suspend_running()

    def resume(self) -> Iterator[tuple[int, list[Completion]]]:
        """Continue requests left by :meth:`abort` (re-prefilling what they generated)."""
        self._abort = False
        return self.stream()

    def _steps(self, pause: Callable[[], bool] | None = None) -> None:
        """Admit waiting requests and sample one token for every running one, until a
        group completes (the consumer gets it at once), nothing is left or ``pause``
        says so. The model is put in eval mode once for the run of steps, not per step
        (a recursive walk of every module)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.no_grad():
                while (self._waiting or self._running) and not self._ready \
                        and not self._abort and not (pause is not None and pause()):
                    self._admit()
                    self._ready.extend(self._decode_run())
        finally:
            if was_training:
                self.model.train()

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1
                 ) -> list[list[Completion]]:
        """``n`` completions for each prompt, grouped by prompt (the RolloutEngine API)."""
        self.submit(prompts, params, n)
        results: list[list[Completion]] = [[] for _ in prompts]
        for index, group in self.stream():
            results[index] = group
        return results

    # ------------------------------------------------------------------ scheduling

    def _request(self, index, prompt, params, seed) -> Request:
        request = Request(self._next_id, index, list(prompt), params, seed,
                          seed_words=split_seed(seed) if seed is not None else None)
        self._next_id += 1
        return request

    def _admit(self) -> None:
        """Prefill waiting requests into free slots."""
        free = self.max_batch - len(self._running)
        if free <= 0 or not self._waiting:
            return
        batch, distinct, width = [], set(), 0
        while self._waiting and len(batch) < free:
            request = self._waiting[0]
            context = (*request.prompt, *request.tokens)
            wider = max(width, len(context))
            if batch and (len(distinct) + (context not in distinct)) * wider > \
                    self.prefill_tokens:
                break
            distinct.add(context)
            width = wider
            batch.append(self._waiting.popleft())
        longest = max(len(r.prompt) + r.params.max_new_tokens for r in batch)
        self.slots.ensure(longest, spare=self._run_steps - 1)
        contexts = [r.prompt + r.tokens for r in batch]  # resumed requests re-prefill
        first_slot = len(self._running)
        self._running.extend(batch)
        self._plan = None
        # samples of one prompt share their prefix: prefill each distinct context once,
        # writing its keys and values into each of its slots (positions past a context's
        # end are hidden by the mask until decoding overwrites them)
        index: dict[tuple[int, ...], int] = {}
        take = [index.setdefault(tuple(context), len(index)) for context in contexts]
        # (slots from a list: torch.arange here stalled ~0.7 ms on the CPU's thread pool
        # right after a compiled call)
        shared = len(index) < len(contexts)
        logits = self.slots.prefill([list(c) for c in index],
                                    torch.tensor(range(first_slot, first_slot + len(contexts))),
                                    torch.tensor(take) if shared else None)
        if shared:
            logits = logits[torch.tensor(take, device=logits.device)]
        self._stage_logits(first_slot, logits)

    def _stage_logits(self, first_slot: int, logits: torch.Tensor) -> None:
        """Keep the next-token logits of every running slot for the next sampling step."""
        self._pending_draw = None  # drawn for the rows before these only
        if first_slot == 0 or self._pending_logits is None:
            self._pending_logits = logits
        else:
            self._pending_logits = torch.cat([self._pending_logits[:first_slot], logits])

    def _decode_run(self) -> list[tuple[int, list[Completion]]]:
        """Sample up to ``sync_every`` tokens for every running request with no
        device-to-host transfer in between, then bring them to the host at once: each row
        takes its tokens up to its first stop, finished rows leave, and the model runs on
        the survivors' last tokens. A row that stops inside the run computes on until its
        end (its extra tokens are dropped); step by step, the run never passes a row's
        token limit.

        A compiled CPU engine whose rows it can draw for (:attr:`SamplingPlan.drawable`)
        runs the whole run as one compiled call of ``sync_every`` steps, which also
        computes the step after the run (the survivors' next token is drawn with it); a
        row may then run past its token limit inside the call (those tokens are dropped
        too), and the cache keeps room for it."""
        running = self._running
        if self._plan is None:  # kept while the running set stays the same
            self._plan = self._sampling_plan()
        plan = self._plan
        in_one_call = self._run_steps > 1 and plan.drawable and \
            plan.longest + plan.drawn + self._run_steps <= self.slots.length
        run, tokens, logits, pending = self._sample_run(plan, in_one_call)
        finished = self._take_tokens(run)
        done_groups = []
        # the finished rows' texts in one call (the tokenizer's batch decode)
        texts = self.tokenizer.batch_decode([running[slot].tokens for slot, _ in finished],
                                            skip_special_tokens=True) if finished else []
        for (slot, reason), text in zip(finished, texts, strict=True):
            done = self._complete(running[slot], reason, text)
            if done is not None:
                done_groups.append(done)
        if finished:
            gone = {slot for slot, _ in finished}
            survivors = [slot for slot in range(len(running)) if slot not in gone]
            self._compact(survivors)
        if not self._running:
            self._pending_logits, self._pending_draw = None, None
            return done_groups
        if in_one_call:  # the step after the run is done: keep the survivors' rows of it
            if finished:
                keep = torch.tensor(survivors, device=tokens.device)
                logits, pending = logits[keep], (pending[0][keep], pending[1][:, keep])
            self._pending_logits, self._pending_draw = logits, pending
            return done_groups
        if finished:  # the survivors' last tokens, where they sit
            tokens = tokens[torch.tensor(survivors, device=tokens.device)]
            where = [r.length - 1 for r in self._running]
            positions, kv_len = torch.tensor(where, device=tokens.device), max(where) + 1
            if self.slots.compiled is not None:
                self._plan = self._sampling_plan()  # the survivors' (the step draws)
        else:  # the same rows as the plan's, each plan.drawn tokens further
            positions, kv_len = plan.positions + (plan.drawn - 1), plan.longest + plan.drawn
        self._pending_logits, self._pending_draw = self.slots.decode_step(
            tokens, positions, kv_len=kv_len, plan=self._plan,
            offset=0 if self._plan is None else self._plan.drawn)
        return done_groups

    def _sample_run(self, plan: SamplingPlan, in_one_call: bool):
        """The run's tokens, ``[2, rows, steps]`` (tokens and log-probs, float64), the
        last tokens and logits, and (in one call) the draw of the step after the run."""
        logits, pending = self._pending_logits, self._pending_draw
        at = plan.drawn  # tokens since the plan was made
        steps = self._run_steps if in_one_call else \
            min(self.sync_every, min(r.params.max_new_tokens - len(r.tokens)
                                     for r in self._running))
        drawn = []
        for k in range(1 if in_one_call else steps):
            if pending is None:
                tokens, logprobs = sample(logits, plan, offset=at + k)
                draw = torch.stack([tokens.double(), logprobs.double()])
            else:  # drawn by the compiled step
                tokens, draw = pending
            drawn.append(draw.unsqueeze(-1))
            if in_one_call:  # steps at + 1 .. at + steps, drawn inside the call
                logits, (tokens, draws) = self.slots.decode_step(
                    tokens, plan.positions + at, kv_len=plan.longest + at + 1, plan=plan,
                    offset=at + 1, steps=steps)
                drawn.append(draws[..., :-1])
                pending = tokens, draws[..., -1]
            elif k < steps - 1:  # every row runs; positions advance on the device
                logits, pending = self.slots.decode_step(tokens, plan.positions + at + k,
                                                         kv_len=plan.longest + at + k + 1,
                                                         plan=plan, offset=at + k + 1)
        plan.drawn += steps
        return drawn[0] if len(drawn) == 1 else torch.cat(drawn, -1), tokens, logits, pending

    def _take_tokens(self, run: torch.Tensor) -> list[tuple[int, str]]:
        """Append each running row's tokens of the run ``[2, rows, steps]`` (the run's one
        device-to-host transfer) up to its first stop; returns ``(slot, reason)`` of the
        rows that finished."""
        token_rows, logprob_rows = run.tolist()
        finished = []
        for slot, request in enumerate(self._running):
            if request.version is None:
                request.version = self.policy_version
            for token, logprob in zip(token_rows[slot], logprob_rows[slot], strict=True):
                token = int(token)
                request.tokens.append(token)
                request.logprobs.append(logprob)
                reason = self._finish_reason(request, token)
                if reason is not None:
                    finished.append((slot, reason))
                    break
        return finished

    def _finish_reason(self, request: Request, token: int) -> str | None:
        if token in self.end_ids and not request.params.ignore_eos:
            return "stop"
        if request.params.stop:
            # a stop string absent before this token must end in it: it spans at most
            # len(stop) tokens, so decoding that tail suffices (no O(T^2) full decodes)
            tail = self.tokenizer.decode(
                request.tokens[-max(len(s) for s in request.params.stop):])
            if any(s in tail for s in request.params.stop):
                return "stop"
        if len(request.tokens) >= request.params.max_new_tokens:
            return "length"
        return None

    def _complete(self, request: Request, reason: str, text: str):
        text = request.params.cut_at_stop(text)
        completion = Completion(
            prompt_index=request.prompt_index, token_ids=request.tokens,
            logprobs=request.logprobs, finish_reason=reason,
            policy_version=request.version if request.version is not None
            else self.policy_version, text=text)
        group = self._groups.setdefault(request.prompt_index, [])
        group.append(completion)
        if len(group) == self._group_size[request.prompt_index]:
            del self._groups[request.prompt_index]
            del self._group_size[request.prompt_index]
            return request.prompt_index, group
        return None

    def _compact(self, survivors: list[int]) -> None:
        """Move the requests in slots ``survivors`` (ascending) into slots ``0..n-1``
        (copying their caches)."""
        if len(survivors) == len(self._running):
            return
        moves = [(new, old) for new, old in enumerate(survivors) if new != old]
        if moves:  # over the positions written so far only (the newest token is not
            # yet cached)
            self.slots.copy_rows([(old, new) for new, old in moves],
                                 max(self._running[old].length for _, old in moves))
        self._running = [self._running[i] for i in survivors]
        self._plan = None

    def _sampling_plan(self) -> SamplingPlan:
        """The running rows' sampling settings for the next decode run."""
        return sampling_plan(self._running, self.slots.device(), self.slots.vocab,
                             compiled=self.slots.compiled is not None)

    def _suspend_running(self) -> None:
        """On abort: running requests go back to the front of the queue, tokens kept."""
        for request in reversed(self._running):
            self._waiting.appendleft(request)
        self._running = []
        self._pending_logits, self._pending_draw = None, None
        self._plan = None


# Decode steps per compiled call (and host sync) of a compiled CPU engine by default:
# fewer calls against more compilation (a graph of N steps takes ~N times as long to
# compile) and more compute spent on rows that finished inside a run.
_CPU_COMPILED_RUN = 4

