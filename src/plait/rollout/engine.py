"""plait's own generation engine: a slot KV cache with continuous batching.

Each running request owns one slot of a preallocated per-layer KV cache
(``[slots, kv_heads, max_len, head_dim]``) and writes at its own positions, so rows of
different lengths never pad each other. A finished request leaves at once and a waiting
one is prefilled into the freed slot; a group (every sample of one prompt) is handed on
as soon as its last sample finishes, so rewards and reference passes start while the
tail still generates. The model's own decoder layers compute everything, given a cache
object that writes into the slots, per-row rotary positions and an explicit mask (which
also applies sliding windows; the cache keeps whole contexts, it is no ring buffer), so
any Llama-style HF model works. Sampling follows HF's order (temperature, top-k, top-p)
and returns each token's log-probability. Tokens come to the host every ``sync_every``
decode steps; greedy and seeded completions are those of ``sync_every=1``.
``compile=True`` runs the decode step, and the draw of greedy and seeded tokens, through
``torch.compile`` with symbolic shapes (one graph for every batch size and length);
prefill stays eager, and no CUDA graphs are captured: their static buffers would pin the
KV cache that the hybrid engine releases between generations.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from plait.models.decoder import (
    DECODE_ATTENTION,
    attention_mask,
    cache_keyword,
    decoder_parts,
    restore_attention_implementation,
    sliding_layers,
    swap_attention_implementation,
)
from plait.rollout.base import Completion, SamplingParams
from plait.rollout.hf_engine import end_token_ids
from plait.rollout.sampling import counter_uniform, sample_inverse_cdf, split_seed


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


class SlotCache:
    """The KV cache object handed to HF decoder layers for one forward pass."""

    is_compileable = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.slots: torch.Tensor | None = None      # [B] slot of each batch row
        self.positions: torch.Tensor | None = None  # [B, T] cache index of each new token
        self.kv_len = 0
        self.contiguous = False                     # slots == arange(B)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        rows = self.slots[:, None]
        k_cache[rows, :, self.positions] = key_states.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, self.positions] = value_states.transpose(1, 2).to(v_cache.dtype)
        if self.contiguous:  # narrow: sizes exactly n and kv_len, also as symbols
            n = self.slots.shape[0]
            return (k_cache.narrow(0, 0, n).narrow(2, 0, self.kv_len),
                    v_cache.narrow(0, 0, n).narrow(2, 0, self.kv_len))
        return k_cache[self.slots, :, : self.kv_len], v_cache[self.slots, :, : self.kv_len]


class PlaitEngine:
    """Continuous-batching generation on the trainer's (shared) model."""

    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_len: int | None = None,
                 sync_every: int | None = None, compile: bool = False,
                 prefill_tokens: int = 16384):
        self.model = model
        self.tokenizer = tokenizer
        self.base, self.lm_head = decoder_parts(model)
        self.config = model.config
        self.max_batch = max_batch
        self.max_len = max_len
        # most (distinct contexts x longest context) one prefill runs: requests re-prefilled
        # with long generated tails (after new weights, a resume) are admitted over several
        # steps instead of in one pass whose attention mask grows with rows x length^2
        self.prefill_tokens = prefill_tokens
        self.end_ids = end_token_ids(model, tokenizer)
        self.policy_version = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
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
        self._plan: _SamplingPlan | None = None  # sampling tensors of the running set
        self._window, self._sliding = sliding_layers(self.config)
        self._cache_keyword = cache_keyword(self.base.layers[0])  # the layers' cache argument
        device_type = self._device().type
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
        # the decode step compiled once with symbolic batch and cache lengths: no recompile
        # as rows finish, lengths grow or the cache is reallocated; weights updated in
        # place (trainer steps, weight pushes) are read by the compiled code as they are
        # On the CPU the compiled step also calls its kernels from generated C++ instead
        # of Python (inductor's cpp_wrapper: less overhead per step) and runs attention
        # as fused products and sums (decode_attention) instead of one flash-attention
        # problem per (row, head); on a GPU it keeps sdpa and the Python wrapper.
        self._decode_attention = bool(compile) and on_cpu
        options = {"guard_filter_fn": _decode_guards}
        if on_cpu:
            # Inductor inlines an unrealised element-wise producer into its consumer's
            # loop; for the rotated query that loop is decode_attention's sum over keys,
            # so the query's rotary embedding (sin, cos, products) was recomputed once per
            # key and layer, most of the attention kernel's work. Realising element-wise
            # results of more than a few operations stores such a query once per step
            # (same logits, bit for bit).
            options["cpp_wrapper"] = True
            options["realize_opcount_threshold"] = _REALIZE_OPCOUNT
        self._compiled_decode = torch.compile(self._decode_draw, dynamic=True,
                                              fullgraph=True, options=options) \
            if compile else None
        self._traced: set[tuple[bool, int]] = set()  # graphs traced: (sample, steps)

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
        self._keys, self._values = [], []

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
            for sample in range(n):
                seed = seeds[position] * 1_000_003 + sample if seeds is not None else None
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

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ensure_cache(self, needed_len: int, spare: int = 0) -> None:
        """Allocate (or grow) the slot cache to hold ``needed_len`` positions, and up to
        ``spare`` more where the model allows (room for steps past a row's token limit)."""
        limit = self.max_len or self.config.max_position_embeddings
        if needed_len > limit:
            raise ValueError(f"a request needs {needed_len} positions but the model supports "
                             f"{limit}; shorten prompts or rollout.max_new_tokens")
        have = self._keys[0].shape[2] if self._keys else 0
        wanted = min(limit, needed_len + spare)
        if wanted <= have:
            return
        length = min(limit, max(wanted, 2 * have, 64))
        heads = self.config.num_key_value_heads
        head_dim = getattr(self.config, "head_dim", None) or \
            self.config.hidden_size // self.config.num_attention_heads
        device = self._device()
        dtype = next(self.model.parameters()).dtype
        if torch.is_autocast_enabled(device.type):  # keys/values come out in autocast's dtype
            dtype = torch.get_autocast_dtype(device.type)
        shape = (self.max_batch, heads, length, head_dim)

        def grown(old):
            new = torch.zeros(shape, dtype=dtype, device=device)
            if old is not None:
                new[:, :, : old.shape[2]].copy_(old)
            return new

        layers = self.config.num_hidden_layers
        old_keys = self._keys or [None] * layers
        old_values = self._values or [None] * layers
        self._keys = [grown(k) for k in old_keys]
        self._values = [grown(v) for v in old_values]

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
        self._ensure_cache(longest, spare=self._run_steps - 1)
        contexts = [r.prompt + r.tokens for r in batch]  # resumed requests re-prefill
        first_slot = len(self._running)
        self._running.extend(batch)
        self._plan = None
        # samples of one prompt share their prefix: prefill each distinct context once and
        # copy its cache rows to the other slots
        source: dict[tuple[int, ...], int] = {}
        for row, context in enumerate(contexts):
            source.setdefault(tuple(context), row)
        unique_rows = sorted(source.values())
        logits = self._prefill([contexts[r] for r in unique_rows],
                               torch.tensor(unique_rows) + first_slot)
        position_of = {row: i for i, row in enumerate(unique_rows)}
        take = [position_of[source[tuple(c)]] for c in contexts]
        copies = [(first_slot + source[tuple(c)], first_slot + row)
                  for row, c in enumerate(contexts) if source[tuple(c)] != row]
        if copies:  # one indexed copy per cache tensor (positions past a context's end
            # are hidden by the mask until decoding overwrites them)
            device = self._keys[0].device
            src = torch.tensor([a for a, _ in copies], device=device)
            dst = torch.tensor([b for _, b in copies], device=device)
            width = max(len(c) for c in contexts)
            for cache in (*self._keys, *self._values):
                cache[dst, :, :width] = cache[src, :, :width]
        self._stage_logits(first_slot, logits[torch.tensor(take, device=logits.device)])

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

        A compiled CPU engine whose rows it can draw for (:attr:`_SamplingPlan.drawable`)
        runs the whole run as one compiled call of ``sync_every`` steps, which also
        computes the step after the run (the survivors' next token is drawn with it); a
        row may then run past its token limit inside the call (those tokens are dropped
        too), and the cache keeps room for it."""
        running = self._running
        if self._plan is None:  # kept while the running set stays the same
            self._plan = self._sampling_plan()
        plan = self._plan
        in_one_call = self._run_steps > 1 and plan.drawable and \
            plan.longest + plan.drawn + self._run_steps <= self._keys[0].shape[2]
        run, tokens, logits, pending = self._sample_run(plan, in_one_call)
        finished = self._take_tokens(run)
        done_groups = []
        for slot, reason in finished:
            done = self._complete(running[slot], reason)
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
            if self._compiled_decode is not None:
                self._plan = self._sampling_plan()  # the survivors' (the step draws)
        else:  # the same rows as the plan's, each plan.drawn tokens further
            positions, kv_len = plan.positions + (plan.drawn - 1), plan.longest + plan.drawn
        self._pending_logits, self._pending_draw = self._decode_step(
            tokens, positions, kv_len=kv_len, plan=self._plan,
            offset=0 if self._plan is None else self._plan.drawn)
        return done_groups

    def _sample_run(self, plan: _SamplingPlan, in_one_call: bool):
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
                tokens, logprobs = self._sample(logits, plan, offset=at + k)
                draw = torch.stack([tokens.double(), logprobs.double()])
            else:  # drawn by the compiled step
                tokens, draw = pending
            drawn.append(draw.unsqueeze(-1))
            if in_one_call:  # steps at + 1 .. at + steps, drawn inside the call
                logits, (tokens, draws) = self._decode_step(
                    tokens, plan.positions + at, kv_len=plan.longest + at + 1, plan=plan,
                    offset=at + 1, steps=steps)
                drawn.append(draws[..., :-1])
                pending = tokens, draws[..., -1]
            elif k < steps - 1:  # every row runs; positions advance on the device
                logits, pending = self._decode_step(tokens, plan.positions + at + k,
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

    def _complete(self, request: Request, reason: str):
        text = request.params.cut_at_stop(
            self.tokenizer.decode(request.tokens, skip_special_tokens=True))
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
        if moves:  # one indexed copy per cache tensor (the source rows are read first),
            # over the positions written so far only (the newest token is not yet cached)
            device = self._keys[0].device
            dst = torch.tensor([new for new, _ in moves], device=device)
            src = torch.tensor([old for _, old in moves], device=device)
            width = max(self._running[old].length for _, old in moves)
            for cache in (*self._keys, *self._values):
                cache[dst, :, :width] = cache[src, :, :width]
        self._running = [self._running[i] for i in survivors]
        self._plan = None

    def _suspend_running(self) -> None:
        """On abort: running requests go back to the front of the queue, tokens kept."""
        for request in reversed(self._running):
            self._waiting.appendleft(request)
        self._running = []
        self._pending_logits, self._pending_draw = None, None
        self._plan = None

    # ------------------------------------------------------------------ model passes

    def _prefill(self, contexts: list[list[int]], slots: torch.Tensor) -> torch.Tensor:
        """Run right-padded contexts into ``slots``; return their last-token logits."""
        device = self._device()
        width = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        for row, context in enumerate(contexts):
            input_ids[row, : len(context)] = torch.tensor(context)
        positions = torch.arange(width).expand(len(contexts), width)
        lengths = torch.tensor([len(c) for c in contexts])
        hidden = self._run(input_ids.to(device), positions.to(device), slots.to(device),
                           kv_len=width, contiguous=False)
        last = hidden[torch.arange(len(contexts)), (lengths - 1).to(device)]
        return self.lm_head(self.base.norm(last)).float()

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, *, kv_len: int,
                     plan: _SamplingPlan | None = None, offset: int = 0, steps: int = 1
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Next-token logits of the running rows and, compiled, what :func:`_draw` drew
        from them ``offset`` tokens into ``plan`` (None where the plan has rows the
        compiled draw does not cover: unseeded sampling, top-k/top-p). ``steps`` > 1
        (compiled, drawable plans only): that many steps in one call, each on the token
        drawn before it; the logits and tokens are the last step's, the draws
        ``[2, n, steps]``."""
        if self._compiled_decode is None:
            return self._decode(tokens, positions, kv_len=kv_len), None
        # each row's token counter (its draw's index): advanced on the device, no host copy
        settings, counters = plan.settings, plan.counters + offset if offset else plan.counters
        # the row count as an unbacked size: no specialisation to 1 row, nor to the slot
        # count when every slot runs
        for tensor in (tokens, positions, settings, counters):
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        # (set and restored by hand: a context manager's own cost is not small against a
        # CPU decode step)
        # Deterministic algorithms off for the step: its only scatter is the cache write,
        # one (row, position) per row, with no duplicate index, so its result does not
        # depend on the flag. Traced under the flag, inductor routes those writes through
        # aten's deterministic index_put, which from the generated C++ copies each whole
        # cache tensor at every step (generation many times slower on the CPU).
        deterministic = torch.are_deterministic_algorithms_enabled()
        if deterministic:
            warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            torch.use_deterministic_algorithms(False)
        attention = swap_attention_implementation(self.config, DECODE_ATTENTION) \
            if self._decode_attention else None
        try:
            # a graph's first call traces it: the layers' float constants (norm epsilons,
            # attention scales) are baked in instead of becoming inputs converted to tensors
            # at every call (the config patch has a cost of its own, so later calls go
            # without)
            graph = plan.sample, steps
            with torch._dynamo.config.patch(specialize_float=True) \
                    if graph not in self._traced else contextlib.nullcontext():
                logits, tokens, draw = self._compiled_decode(
                    tokens, positions, settings, counters, kv_len=kv_len, sample=plan.sample,
                    steps=steps)
            self._traced.add(graph)
            return logits, (tokens, draw) if plan.drawable else None
        except torch._dynamo.exc.TorchDynamoException as err:  # incl. inductor errors
            cause = getattr(err, "inner_exception", None) or err  # a backend's own error
            lines = str(cause).strip().splitlines()
            raise RuntimeError(
                f"rollout.compile: torch.compile could not compile the engine's decode step "
                f"({type(cause).__name__}: {lines[0] if lines else ''}); set "
                f"rollout.compile=false (compiling needs a C++ compiler on the CPU, Triton "
                f"on a GPU)") from err
        finally:
            if attention is not None:
                restore_attention_implementation(self.config, attention)
            if deterministic:
                torch.use_deterministic_algorithms(True, warn_only=warn_only)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, *, kv_len: int
                ) -> torch.Tensor:
        """One token for each running slot ``0..n-1`` at ``positions`` (a device tensor);
        returns next-token logits ``[n, V]``."""
        n = tokens.shape[0]
        device = tokens.device
        hidden = self._run(tokens.view(n, 1), positions.view(n, 1),
                           torch.arange(n, device=device), kv_len=kv_len, contiguous=True)
        return self.lm_head(self.base.norm(hidden[:, -1])).float()

    def _decode_draw(self, tokens: torch.Tensor, positions: torch.Tensor,
                     settings: torch.Tensor, counters: torch.Tensor, *, kv_len: int,
                     sample: bool, steps: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compiled step: :meth:`_decode`, then :func:`_draw` from its logits, ``steps``
        times, each drawn token the input of the next step (one graph per ``sample`` and
        ``steps``). Returns the last step's logits and tokens, and the draws: ``[2, n]``
        for one step, ``[2, n, steps]`` for more."""
        n = tokens.shape[0]
        settings, counters = settings.view(n, 4), counters.view(n)
        draws = []
        for step in range(steps):
            logits = self._decode(tokens, positions + step if step else positions,
                                  kv_len=kv_len + step)
            tokens, draw = _draw(logits, settings, counters + step if step else counters,
                                 sample)
            draws.append(draw)
        return logits, tokens, draws[0] if steps == 1 else torch.stack(draws, -1)

    def _run(self, input_ids, positions, slots, *, kv_len: int, contiguous: bool):
        """The decoder layers over new tokens at ``positions`` of the given slots."""
        cache = SlotCache(self._keys, self._values)
        cache.slots, cache.positions, cache.kv_len = slots, positions, kv_len
        cache.contiguous = contiguous
        hidden = self.base.embed_tokens(input_ids)
        position_embeddings = self.base.rotary_emb(hidden, positions)
        # key j is visible to the token at position p iff j <= p (earlier tokens of its row),
        # and on sliding layers iff also j > p - window
        keys = torch.arange(kv_len, device=hidden.device).view(1, 1, 1, kv_len)
        query = positions.unsqueeze(1).unsqueeze(-1)
        full = attention_mask(keys <= query, self.config, hidden.dtype)
        sliding = full
        # (compiled: always, and with the window as a tensor, as a branch or a bound on the
        # symbolic kv_len would compile a second graph; the sliding mask equals the full
        # one while kv_len <= window)
        compiling = torch.compiler.is_compiling()
        if self._window is not None and (compiling or kv_len > self._window):
            window = torch.tensor(self._window, device=hidden.device) if compiling \
                else self._window
            sliding = attention_mask((keys <= query) & (keys > query - window), self.config,
                                     hidden.dtype)
        for layer, slides in zip(self.base.layers, self._sliding, strict=True):
            out = layer(hidden, attention_mask=sliding if slides else full,
                        position_embeddings=position_embeddings, position_ids=positions,
                        use_cache=True, **{self._cache_keyword: cache})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    # ------------------------------------------------------------------ sampling

    def _sampling_plan(self) -> _SamplingPlan:
        """The running rows' sampling settings as device tensors, built once per decode
        run (host lists turned into device tensors would otherwise copy every step)."""
        running = self._running
        device = self._device()
        params = [r.params for r in running]
        is_greedy = [p.greedy for p in params]
        where = [r.length for r in running]
        plan = _SamplingPlan(
            greedy=torch.tensor(is_greedy, device=device),
            all_greedy=all(is_greedy),
            temperature=torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                     device=device).unsqueeze(-1),
            positions=torch.tensor(where, device=device), longest=max(where))
        if any(is_greedy) and not plan.all_greedy:
            plan.greedy_rows = torch.tensor([i for i, g in enumerate(is_greedy) if g],
                                            device=device)
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            plan.top_k, plan.top_p = _filter_settings(top_k, top_p,
                                                      self.lm_head.weight.shape[0], device)
        sampled = [i for i, g in enumerate(is_greedy) if not g]
        seeded = [i for i in sampled if running[i].seed_words is not None]
        shared = [i for i in sampled if running[i].seed_words is None]
        if shared:
            plan.shared_rows = torch.tensor(shared, device=device)
        if seeded:  # counter-based: the draw depends on (seed, token index) only
            plan.seeded_all = len(seeded) == len(running)
            plan.seeded_rows = torch.tensor(seeded, device=device)
            plan.seed_words = torch.tensor(
                [(*running[i].seed_words, len(running[i].tokens)) for i in seeded],
                device=device)
        if self._compiled_decode is not None:  # what the compiled step draws with
            plan.drawable = not shared and plan.top_k is None
            plan.sample = plan.drawable and bool(seeded)
            plan.settings = torch.tensor(
                [(1.0, 1.0, 0, 0) if r.params.greedy or r.seed_words is None else
                 (r.params.temperature, 0.0, *r.seed_words) for r in running],
                dtype=torch.float64, device=device)
            plan.counters = torch.tensor([len(r.tokens) for r in running], device=device)
        return plan

    @staticmethod
    def _seeded_uniforms(plan: _SamplingPlan, offset: int, chunk: int = 64) -> torch.Tensor:
        """The seeded rows' draws for token ``offset`` of the plan: counter-based uniforms
        computed ``chunk`` tokens at a time (one hash pass instead of one per step)."""
        column = offset - plan.uniforms_from
        if plan.uniforms is None or column >= plan.uniforms.shape[1]:
            words = plan.seed_words
            ahead = torch.arange(chunk, device=words.device)
            plan.uniforms = counter_uniform(words[:, 0:1], words[:, 2:3] + offset + ahead,
                                            words[:, 1:2])
            plan.uniforms_from, column = offset, 0
        return plan.uniforms[:, column]

    def _sample(self, logits: torch.Tensor, plan: _SamplingPlan, offset: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled token and its log-probability for each running request, ``offset``
        tokens into a decode run (no host-to-device copy, no device sync)."""
        processed = logits / plan.temperature.to(logits.dtype)
        if plan.top_k is not None:
            processed = _filter_top_k_top_p(processed, plan.top_k, plan.top_p, plan.greedy)
        logp = torch.log_softmax(processed, dim=-1)
        if plan.all_greedy:
            tokens = logits.argmax(-1)
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
            if plan.greedy_rows is not None:  # index rows, not a boolean mask (no sync)
                tokens[plan.greedy_rows] = logits[plan.greedy_rows].argmax(-1)
            if plan.shared_rows is not None:
                rows = plan.shared_rows
                tokens[rows] = torch.multinomial(logp[rows].exp(), 1).squeeze(-1)
            if plan.seed_words is not None:
                uniform = self._seeded_uniforms(plan, offset)
                if plan.seeded_all:  # every row: no gather
                    tokens = sample_inverse_cdf(logp.exp(), uniform)
                else:
                    rows = plan.seeded_rows
                    tokens[rows] = sample_inverse_cdf(logp[rows].exp(), uniform)
        return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# Decode steps per compiled call (and host sync) of a compiled CPU engine by default:
# fewer calls against more compilation (a graph of N steps takes ~N times as long to
# compile) and more compute spent on rows that finished inside a run.
_CPU_COMPILED_RUN = 4

# Element-wise results of more operations than this are stored by the compiled CPU
# decode step instead of recomputed inside their consumers' loops (see __init__).
_REALIZE_OPCOUNT = 10


# Guards torch.compile would check on every decode step that protect what the engine
# never changes once built: the model's module structure (types, attributes absent from
# a module's dict, empty hook dicts; ~650 of ~870 guards on a 4-layer model), and the
# identity of global functions and classes. Tensors (shapes, dtypes, devices of the
# weights, the caches and the inputs), the shape environment, constants read from the
# engine and config (the attention implementation, sliding layers) and the global state
# (grad mode, default device) stay guarded. Consequence: a forward hook registered on the
# model after the engine's first decode step is not run by the compiled step.
_UNGUARDED = frozenset({"EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT",
                        "TYPE_MATCH", "DICT_NOT_CONTAINS", "CLOSURE_MATCH", "BUILTIN_MATCH",
                        "MODULE_MATCH", "CLASS_MATCH"})


def _decode_guards(entries) -> list[bool]:
    """torch.compile's guard filter for the decode step: which guards to keep."""
    return [entry.guard_type not in _UNGUARDED for entry in entries]


@dataclass
class _SamplingPlan:
    """Per-run device tensors of the running rows' sampling settings."""

    greedy: torch.Tensor                       # [n] bool
    all_greedy: bool
    temperature: torch.Tensor                  # [n, 1]
    positions: torch.Tensor                    # [n] position of the first token of the run
    longest: int                               # max of positions
    greedy_rows: torch.Tensor | None = None
    shared_rows: torch.Tensor | None = None    # unseeded sampled rows (global generator)
    seeded_rows: torch.Tensor | None = None
    seeded_all: bool = False
    seed_words: torch.Tensor | None = None     # [m, 3]: seed low, seed high, tokens so far
    top_k: torch.Tensor | None = None          # [n, 1] (vocab size = off)
    top_p: torch.Tensor | None = None          # [n, 1]
    drawn: int = 0                             # tokens sampled since the plan was made
    uniforms: torch.Tensor | None = None       # [m, chunk] seeded draws ahead
    uniforms_from: int = 0                     # the token offset of uniforms[:, 0]
    # compiled engines: each row's (temperature, greedy, seed low, seed high) for _draw,
    # float64 [n, 4] (unseeded rows as greedy), and its tokens so far, int64 [n]; whether
    # the draw is the plan's own (no unseeded sampled rows, no top-k/top-p) and whether it
    # samples (a seeded row that is not greedy)
    settings: torch.Tensor | None = None
    counters: torch.Tensor | None = None
    drawable: bool = False
    sample: bool = False


def _draw(logits: torch.Tensor, settings: torch.Tensor, counters: torch.Tensor,
          sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row, and ``[2, n]`` float64 of the tokens and their
    log-probabilities, for greedy and seeded rows without top-k/top-p: the arithmetic of
    :meth:`PlaitEngine._sample`, written to run inside the compiled decode step (compiled,
    its kernels round differently: log-probs agree to float rounding, and a token differs
    only where a row's uniform falls within rounding of a boundary of its CDF).
    ``settings``: float64 ``[n, 4]``, each row's (temperature, greedy, seed low word, seed
    high word); ``counters``: int64 ``[n]``, the index of each row's token to draw.
    ``sample=False``: every row as greedy (no inverse-CDF pass over the vocabulary)."""
    temperature = settings[:, 0:1].to(logits.dtype)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    tokens = logits.argmax(-1)
    if sample:
        words = settings[:, 2:].long()
        uniform = counter_uniform(words[:, 0], counters, words[:, 1])
        tokens = torch.where(settings[:, 1] > 0, tokens, sample_inverse_cdf(logp.exp(), uniform))
    return tokens, torch.stack([tokens.double(),
                                logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()])


def _filter_settings(top_k: list[int], top_p: list[float], vocab: int, device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k (0 = off, as the vocabulary size) and top-p as ``[n, 1]`` tensors."""
    return (torch.tensor([k if k > 0 else vocab for k in top_k], device=device).unsqueeze(-1),
            torch.tensor(top_p, device=device).unsqueeze(-1))


def _filter_top_k_top_p(logits: torch.Tensor, top_k, top_p, greedy: torch.Tensor
                        ) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus (HF order).
    ``top_k`` / ``top_p``: per-row lists or ``[n, 1]`` tensors (top-k 0 or the vocabulary
    size = off, top-p 1 = off)."""
    vocab = logits.shape[-1]
    device = logits.device
    if not isinstance(top_k, torch.Tensor):
        top_k, top_p = _filter_settings(top_k, top_p, vocab, device)
    p = top_p.to(logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    kth = sorted_logits.gather(-1, (top_k - 1).clamp(max=vocab - 1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)  # ties kept, as HF
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass before it already reaches p (keep at least one); rows
    # with top_p = 1 are left alone (cumsum rounding would otherwise trim their tail)
    before = probs.cumsum(-1) - probs
    remove_p = (before >= p) & (ranks > 0) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(remove_p, -math.inf)
    filtered = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.where(greedy.unsqueeze(-1), logits, filtered)
