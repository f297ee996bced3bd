"""The model side of plait's engine: the decoder over a slot KV cache.

Each running request owns one slot (a row) of a preallocated per-layer cache
``[slots, kv_heads, max_len, head_dim]`` and writes at its own positions. The model's own
decoder layers compute every pass, given a cache object that writes into the slots,
per-row rotary positions and an explicit mask (which also applies sliding windows; the
cache keeps whole contexts, it is no ring buffer), so any Llama-style HF model works.
The decode step, and the draw of greedy and seeded tokens, can run through
``torch.compile`` with symbolic shapes (one graph for every batch size and length), and
so can the prefill (one graph for every row count and width; eager by default). No CUDA
graphs are captured: their static buffers would pin the cache that the hybrid engine
releases between generations.
"""

from __future__ import annotations

import contextlib
import gc

import torch
from torch.fx.experimental import _config as fx_config

from plait.models.decoder import (
    DECODE_ATTENTION,
    attention_mask,
    cache_keyword,
    compile_failure,
    decoder_parts,
    restore_attention_implementation,
    sliding_layers,
    swap_attention_implementation,
)
from plait.rollout.sampling import SamplingPlan, draw

__all__ = ["SlotCache", "SlotModel"]


class SlotCache:
    """The KV cache object handed to HF decoder layers for one forward pass."""

    is_compileable = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.slots: torch.Tensor | None = None      # [B] slot of each batch row
        self.positions: torch.Tensor | None = None  # [B, T] cache index of each new token
        self.kv_len = 0
        self.contiguous = False                     # slots == arange(B)
        self.whole = False  # the new tokens are each row's whole context (a prefill)
        # [S] batch row written into each of the slots ``slots`` (None: row i into
        # slots[i]): a prefill writes a context shared by several slots into all of them
        self.source: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        rows = self.slots[:, None]
        keys, values, positions = key_states, value_states, self.positions
        if self.source is not None:
            keys, values = keys[self.source], values[self.source]
            positions = positions[self.source]
        k_cache[rows, :, positions] = keys.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, positions] = values.transpose(1, 2).to(v_cache.dtype)
        if self.whole:  # what was just written is all there is to attend to
            return key_states.to(k_cache.dtype), value_states.to(v_cache.dtype)
        if self.contiguous:  # narrow: sizes exactly n and kv_len, also as symbols
            n = self.slots.shape[0]
            return (k_cache.narrow(0, 0, n).narrow(2, 0, self.kv_len),
                    v_cache.narrow(0, 0, n).narrow(2, 0, self.kv_len))
        return k_cache[self.slots, :, : self.kv_len], v_cache[self.slots, :, : self.kv_len]




class SlotModel:
    """The engine's model passes: prefill into slots, decode steps (eager or compiled) and
    the slot cache they write, which it allocates, grows, copies rows of and releases."""

    def __init__(self, model, *, max_batch: int, max_len: int | None, compile: bool,
                 pad_id: int, compile_prefill: bool = False):
        self.model = model
        self.base, self.lm_head = decoder_parts(model)
        self.config = model.config
        self.max_batch = max_batch
        self.max_len = max_len
        self.pad_id = pad_id
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.window, self.sliding = sliding_layers(self.config)
        self.cache_keyword = cache_keyword(self.base.layers[0])  # the layers' cache argument
        on_cpu = self.device().type == "cpu"
        # the decode step compiled once with symbolic batch and cache lengths: no recompile
        # as rows finish, lengths grow or the cache is reallocated; weights updated in
        # place (trainer steps, weight pushes) are read by the compiled code as they are
        # The compiled step runs attention as fused products and sums (decode_attention):
        # on the CPU instead of one flash-attention problem per (row, head); on a GPU
        # because sdpa's kernel choice guards on the row count, which is left unbacked
        # (below). On the CPU it also calls its kernels from generated C++ instead of
        # Python (inductor's cpp_wrapper: less overhead per step).
        self.decode_attention = bool(compile)
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
        self.compiled = torch.compile(self.decode_draw, dynamic=True, fullgraph=True,
                                      options=options) if compile else None
        self.traced: set[tuple[bool, int]] = set()  # graphs traced: (sample, steps)
        # the prefill compiled apart, with symbolic rows and width: on the CPU an eager
        # prefill of a few short prompts is mostly the layers' per-operation overhead
        self.compiled_prefill = torch.compile(
            self.prefill_pass, dynamic=True, fullgraph=True, options=options) \
            if compile_prefill else None
        self.prefill_traced = False

    def device(self) -> torch.device:
        """Where the model's weights (and so the cache) live."""
        return next(self.model.parameters()).device

    @property
    def vocab(self) -> int:
        """Rows of the output head: the tokens a step can draw."""
        return self.lm_head.weight.shape[0]

    @property
    def length(self) -> int:
        """Positions the cache holds per slot (0 while unallocated)."""
        return self.keys[0].shape[2] if self.keys else 0

    def release(self) -> None:
        """Free the cache; the next :meth:`ensure` allocates it again."""
        self.keys, self.values = [], []

    def copy_rows(self, moves: list[tuple[int, int]], width: int) -> None:
        """Copy cache rows ``(source, destination)`` over their first ``width`` positions:
        one indexed copy per cache tensor, every source row read before any is written."""
        device = self.keys[0].device
        src = torch.tensor([a for a, _ in moves], device=device)
        dst = torch.tensor([b for _, b in moves], device=device)
        for cache in (*self.keys, *self.values):
            cache[dst, :, :width] = cache[src, :, :width]

    def ensure(self, needed_len: int, spare: int = 0) -> None:
        """Allocate (or grow) the slot cache to hold ``needed_len`` positions, and up to
        ``spare`` more where the model allows (room for steps past a row's token limit)."""
        limit = self.max_len or self.config.max_position_embeddings
        if needed_len > limit:
            raise ValueError(f"a request needs {needed_len} positions but the model supports "
                             f"{limit}; shorten prompts or rollout.max_new_tokens")
        have = self.length
        wanted = min(limit, needed_len + spare)
        if wanted <= have:
            return
        length = min(limit, max(wanted, 2 * have, 64))
        heads = self.config.num_key_value_heads
        head_dim = getattr(self.config, "head_dim", None) or \
            self.config.hidden_size // self.config.num_attention_heads
        device = self.device()
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
        old_keys = self.keys or [None] * layers
        old_values = self.values or [None] * layers
        self.keys = [grown(k) for k in old_keys]
        self.values = [grown(v) for v in old_values]

    def prefill(self, contexts: list[list[int]], slots: torch.Tensor,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """Run right-padded contexts into ``slots`` (context ``source[i]`` into
        ``slots[i]``; by default context i into ``slots[i]``), computing each context
        once; return the contexts' last-token logits."""
        device = self.device()
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        for row, context in enumerate(contexts):
            input_ids[row, : len(context)] = torch.tensor(context)
        last = torch.tensor([len(c) - 1 for c in contexts])
        if source is None and self.compiled_prefill is not None:  # one graph for both
            source = torch.tensor(range(len(contexts)))
        inputs = (input_ids.to(device), slots.to(device), last.to(device),
                  None if source is None else source.to(device))
        if self.compiled_prefill is None:
            return self.prefill_pass(*inputs)
        # traced without duck sizing: the slot count equals the context count in one
        # admission and not in the next (contexts shared by several slots), which would
        # otherwise compile a second graph
        tracing = contextlib.nullcontext() if self.prefill_traced else \
            fx_config.patch(use_duck_shape=False)
        with _nondeterministic_scatter(), tracing:  # (the scatter: see decode_step)
            try:
                logits = self.compiled_prefill(*inputs)
            except torch._dynamo.exc.TorchDynamoException as err:
                raise compile_failure(err, "rollout.compile", "the engine's prefill") \
                    from err
        if not self.prefill_traced:
            self.prefill_traced = True
            gc.collect()
            gc.freeze()
        return logits

    def prefill_pass(self, input_ids: torch.Tensor, slots: torch.Tensor,
                     last: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """The prefill's model pass: right-padded ``input_ids`` ``[B, W]``, row
        ``source[i]`` (None: row i) into ``slots[i]``; the logits at each row's ``last``
        index (eager or compiled)."""
        rows, width = input_ids.shape
        positions = torch.arange(width, device=input_ids.device).expand(rows, width)
        hidden = self.run(input_ids, positions, slots, kv_len=width, contiguous=False,
                          whole=True, source=source)
        last_hidden = hidden[torch.arange(rows, device=hidden.device), last]
        return self.lm_head(self.base.norm(last_hidden)).float()

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, *, kv_len: int,
                    plan: SamplingPlan | None = None, offset: int = 0, steps: int = 1
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Next-token logits of the running rows and, compiled, what
        :func:`~plait.rollout.sampling.draw` drew from them ``offset`` tokens into ``plan``
        (None where the plan has rows the compiled draw does not cover: unseeded sampling,
        top-k/top-p). ``steps`` > 1
        (compiled, drawable plans only): that many steps in one call, each on the token
        drawn before it; the logits and tokens are the last step's, the draws
        ``[2, n, steps]``."""
        if self.compiled is None:
            return self.decode(tokens, positions, kv_len=kv_len), None
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
            if self.decode_attention else None
        try:
            # a graph's first call traces it: the layers' float constants (norm epsilons,
            # attention scales) are baked in instead of becoming inputs converted to tensors
            # at every call (the config patch has a cost of its own, so later calls go
            # without)
            graph = plan.sample, steps
            with torch._dynamo.config.patch(specialize_float=True) \
                    if graph not in self.traced else contextlib.nullcontext():
                logits, tokens, drawn = self.compiled(
                    tokens, positions, settings, counters, kv_len=kv_len, sample=plan.sample,
                    steps=steps)
            if graph not in self.traced:
                self.traced.add(graph)
                # the compiler's records live as long as the engine: out of the cyclic
                # collector's walks from now on (see plait.runtime.heap)
                gc.collect()
                gc.freeze()
            return logits, (tokens, drawn) if plan.drawable else None
        except torch._dynamo.exc.TorchDynamoException as err:  # incl. inductor errors
            raise compile_failure(err, "rollout.compile", "the engine's decode step") from err
        finally:
            if attention is not None:
                restore_attention_implementation(self.config, attention)
            if deterministic:
                torch.use_deterministic_algorithms(True, warn_only=warn_only)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, *, kv_len: int
               ) -> torch.Tensor:
        """One token for each running slot ``0..n-1`` at ``positions`` (a device tensor);
        returns next-token logits ``[n, V]``."""
        n = tokens.shape[0]
        device = tokens.device
        hidden = self.run(tokens.view(n, 1), positions.view(n, 1),
                          torch.arange(n, device=device), kv_len=kv_len, contiguous=True)
        return self.lm_head(self.base.norm(hidden[:, -1])).float()

    def decode_draw(self, tokens: torch.Tensor, positions: torch.Tensor,
                    settings: torch.Tensor, counters: torch.Tensor, *, kv_len: int,
                    sample: bool, steps: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compiled step: :meth:`decode`, then :func:`~plait.rollout.sampling.draw`
        from its logits, ``steps`` times, each drawn token the input of the next step (one
        graph per ``sample`` and ``steps``). Returns the last step's logits and tokens, and the draws: ``[2, n]``
        for one step, ``[2, n, steps]`` for more."""
        n = tokens.shape[0]
        settings, counters = settings.view(n, 4), counters.view(n)
        draws = []
        for step in range(steps):
            logits = self.decode(tokens, positions + step if step else positions,
                                 kv_len=kv_len + step)
            tokens, drawn = draw(logits, settings, counters + step if step else counters,
                                 sample)
            draws.append(drawn)
        return logits, tokens, draws[0] if steps == 1 else torch.stack(draws, -1)

    def run(self, input_ids, positions, slots, *, kv_len: int, contiguous: bool,
            whole: bool = False, source: torch.Tensor | None = None):
        """The decoder layers over new tokens at ``positions`` of the given slots
        (``whole``: positions 0..kv_len-1 of every row, so attention reads the new keys
        and values as they are instead of gathering them back from the slots; ``source``:
        the row written into each slot, see :class:`SlotCache`)."""
        cache = SlotCache(self.keys, self.values)
        cache.slots, cache.positions, cache.kv_len = slots, positions, kv_len
        cache.contiguous, cache.whole, cache.source = contiguous, whole, source
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
        if self.window is not None and (compiling or kv_len > self.window):
            window = torch.tensor(self.window, device=hidden.device) if compiling \
                else self.window
            sliding = attention_mask((keys <= query) & (keys > query - window), self.config,
                                     hidden.dtype)
        for layer, slides in zip(self.base.layers, self.sliding, strict=True):
            out = layer(hidden, attention_mask=sliding if slides else full,
                        position_embeddings=position_embeddings, position_ids=positions,
                        use_cache=True, **{self.cache_keyword: cache})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


@contextlib.contextmanager
def _nondeterministic_scatter():
    """Deterministic algorithms off around a compiled pass whose only scatter is the
    cache write (no duplicate index: the result does not depend on the flag)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if deterministic:
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


# Element-wise results of more operations than this are stored by the compiled CPU
# decode step instead of recomputed inside their consumers' loops (see SlotModel).
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


