"""Teacher-forced forward passes over an Experience: per-token log-probs,
entropies and critic values, aligned with the response tokens."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.distributed.fsdp import FSDPModule

from plait.models.decoder import (
    attention_mask,
    cache_keyword,
    compile_failure,
    decoder_parts,
    sliding_layers,
)
from plait.train.experience import Experience, experience_from_tokens


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, batch: Experience, temperature: float = 1.0,
                    share_prompts: bool = False, pack_tokens: int = 0) -> torch.Tensor:
    """Logits that predict each response token: ``[B, R, V]``, divided by ``temperature``.

    ``share_prompts``: rows with the same prompt (a GRPO group) compute that prompt once;
    the result equals the full forward of every ``[prompt | response]`` row (gradients
    flow through the shared prompt into every response that attends to it). With
    ``pack_tokens`` > 0 each prompt and its responses are packed, several prompts to a
    sequence of at most that many tokens (see :func:`_packed_group_logits`); otherwise, or
    for a model whose layers plait does not drive, the responses run as padded rows
    against the prompt's cached keys and values."""
    width = batch.response_ids.shape[1]
    logits = None
    if share_prompts and batch.batch_size > 1:
        first, inverse = batch.prompt_index()
        if first.numel() < batch.batch_size:  # some rows share a prompt
            if pack_tokens > 0:
                logits = _packed_group_logits(model, batch, first, inverse, pack_tokens)
            if logits is None:
                logits = _shared_prompt_logits(model, batch, width, first, inverse)
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


def _shared_prompt_logits(model, batch: Experience, width: int, first: torch.Tensor,
                          inverse: torch.Tensor) -> torch.Tensor | None:
    """Response logits with each distinct prompt (``first``, ``inverse``: see
    :meth:`Experience.prompt_index`) computed once and every response run against its
    cached keys and values; ``None`` when the model keeps no selectable cache (the caller
    runs rows in full)."""
    prompt_ids, prompt_mask = batch.prompt_ids[first], batch.prompt_mask[first]
    keep = int(prompt_mask.any(0).nonzero().min())  # columns padded in every distinct prompt
    prompt_ids, prompt_mask = prompt_ids[:, keep:], prompt_mask[:, keep:]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                position_ids=position_ids_from_mask(prompt_mask), use_cache=True,
                logits_to_keep=1)
    keyword = cache_keyword(model)  # by transformers' current name: the old one warns
    cache = getattr(out, keyword, None)
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
                 use_cache=True, **{keyword: cache}).logits
    return torch.cat([head, tail], dim=1)


def _packed_group_logits(model, batch: Experience, first: torch.Tensor, inverse: torch.Tensor,
                         max_tokens: int, last_only: bool = False) -> torch.Tensor | None:
    """Response logits from packed sequences: blocks of a prompt and some of its rows'
    responses, one or more blocks to a sequence of at most ``max_tokens`` (a sequence
    holds at least one response; how groups are split and blocks combined is
    :func:`pack_plan`'s choice), each response attending to its block's prompt and to its
    own earlier tokens at the positions it has in its own row. Equal to the
    full forward of every row; no row is padded to the longest response, and the many
    small per-row attention problems become one per sequence. The model's own embedding,
    layers (with these masks), norm and head compute it. With ``last_only``, only the
    logits that predict each row's last response token: ``[B, 1, V]``. ``None`` when
    plait does not drive the model's layers (other families or attention kernels, sharded
    modules) or a response mask has holes: the caller takes another path."""
    if isinstance(model, FSDPModule):  # its parameters are gathered by its own forward
        return None
    try:
        base, head = decoder_parts(model, hint="")
    except ValueError:
        return None
    device = batch.response_ids.device
    rows, response_width = batch.response_ids.shape
    lengths = batch.response_mask.sum(-1).long()
    steps = torch.arange(response_width, device=device)
    if not torch.equal(batch.response_mask.bool(), steps < lengths.unsqueeze(1)):
        return None  # not right-padded prefixes: the cached path masks keys as given
    prompt_mask = batch.prompt_mask[first].bool()
    prompt_len = prompt_mask.sum(-1)
    # a row feeds its response but the last token (whose logits predict nothing scored)
    fed_len = (lengths - 1).clamp(min=0)
    # the plan (host): the sequence and block of each row and where its fed tokens start
    plan = pack_plan(prompt_len.tolist(), fed_len.tolist(), inverse.tolist(), max_tokens,
                     attention_crossover(model.config, base))
    units, span = len(plan.unit_len), max(plan.unit_len)
    blocks = len(plan.block_group)
    unit_of = torch.tensor(plan.row_unit, device=device)
    row_start = unit_of * span + torch.tensor(plan.row_start, device=device)  # flat index
    block_group = torch.tensor(plan.block_group, device=device)
    block_at = torch.tensor(plan.block_unit, device=device) * span + \
        torch.tensor(plan.block_start, device=device)  # flat index of each block's start
    row_block = torch.tensor(plan.row_block, device=device)
    flat = units * span
    ids = torch.zeros(flat, dtype=torch.long, device=device)
    positions = torch.zeros(flat, dtype=torch.long, device=device)
    block = torch.full((flat,), -1, dtype=torch.long, device=device)  # -1: padding
    segment = torch.zeros(flat, dtype=torch.long, device=device)
    # each block's prompt (its real tokens, in order) at positions 0..P-1: segment 0
    pmask = prompt_mask[block_group]
    ppos = pmask.long().cumsum(-1) - 1
    at = block_at.unsqueeze(1) + ppos
    ids[at[pmask]] = batch.prompt_ids[first[block_group]][pmask]
    positions[at[pmask]] = ppos[pmask]
    block[at[pmask]] = torch.arange(blocks, device=device).unsqueeze(1).expand_as(pmask)[pmask]
    # each row's fed response tokens after its block's prompt: segment row + 1
    fmask = steps < fed_len.unsqueeze(1)
    at = row_start.unsqueeze(1) + steps
    row_len = prompt_len[inverse].unsqueeze(1)
    ids[at[fmask]] = batch.response_ids[fmask]
    positions[at[fmask]] = (row_len + steps).expand(rows, response_width)[fmask]
    block[at[fmask]] = row_block.unsqueeze(1).expand(rows, response_width)[fmask]
    segment[at[fmask]] = (torch.arange(rows, device=device) + 1).unsqueeze(1).expand(
        rows, response_width)[fmask]
    ids, positions, block, segment = (t.view(units, span)
                                      for t in (ids, positions, block, segment))
    # a token sees its block's prompt and its own segment, at positions not after its
    # own; padding sees only itself (no query row is left empty)
    query_seg, key_seg = segment.unsqueeze(2), segment.unsqueeze(1)
    key_block = block.unsqueeze(1)
    query_pos, key_pos = positions.unsqueeze(2), positions.unsqueeze(1)
    visible = (key_block == block.unsqueeze(2)) & (key_block >= 0) & \
        ((key_seg == 0) | (key_seg == query_seg)) & (key_pos <= query_pos)
    visible |= torch.eye(span, dtype=torch.bool, device=device)
    # the hidden state that predicts response token t of a row: its prompt's last token
    # for t = 0, its own token t - 1 after that (positions past its length: any, unscored)
    where = row_start.unsqueeze(1) + steps - 1
    where[:, 0] = block_at[row_block] + prompt_len[inverse] - 1
    where = torch.where(steps < lengths.unsqueeze(1), where, where[:, :1])
    if last_only:
        where = where[torch.arange(rows, device=device), lengths - 1].unsqueeze(1)
    read, back = torch.unique(where, return_inverse=True)  # flat positions, ascending
    if 2 * read.numel() > flat:  # most positions are read: the whole last layer
        hidden = masked_hidden(model, base, ids, positions, visible)
        picked = hidden.reshape(flat, hidden.shape[-1])[where]
        return head(base.norm(picked))
    # few positions are read (a score a row): the last layer at those only
    unit = read // span
    count = torch.bincount(unit, minlength=units)
    width = int(count.max())
    slot = torch.arange(read.numel(), device=device) - (count.cumsum(0) - count)[unit]
    at = torch.zeros(units, width, dtype=torch.long, device=device)
    at[unit, slot] = read % span  # unused slots read position 0 (any position would do)
    hidden = masked_hidden(model, base, ids, positions, visible, read=at)
    picked = hidden.reshape(units * width, hidden.shape[-1])[(unit * width + slot)[back]]
    return head(base.norm(picked))


def masked_hidden(model, base, ids: torch.Tensor, positions: torch.Tensor,
                  visible: torch.Tensor, read: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states (before the final norm) of ``ids`` ``[U, S]`` at
    ``positions``, each query seeing the keys ``visible`` ``[U, S, S]`` allows (and, in
    sliding-window layers, only those within the window).

    With ``read`` (``[U, K]`` positions of each sequence, the only hidden states the
    caller reads; repeats allowed) the result is ``[U, K, H]`` at those positions: the
    last layer computes its keys and values at every position but its queries, attention
    output and MLP only at these (see :func:`_read_layer`), which for a reward model's
    one score a sequence saves most of the last layer."""
    hidden = base.embed_tokens(ids)
    full = attention_mask(visible.unsqueeze(1), model.config, hidden.dtype)
    window, slides = sliding_layers(model.config)
    query_pos, key_pos = positions.unsqueeze(2), positions.unsqueeze(1)
    windowed = visible if window is None else visible & (key_pos > query_pos - window)
    sliding = full if window is None else attention_mask(windowed.unsqueeze(1), model.config,
                                                         hidden.dtype)
    position_embeddings = base.rotary_emb(hidden, positions)
    compiled = _COMPILED.get(base) if torch.is_grad_enabled() else None
    layers = list(zip(compiled or base.layers, slides, strict=True))
    last = layers.pop() if read is not None else None
    try:
        for layer, slide in layers:
            out = layer(hidden, attention_mask=sliding if slide else full,
                        position_embeddings=position_embeddings, position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
    except torch._dynamo.exc.TorchDynamoException as err:  # incl. inductor errors
        raise compile_failure(err, "train.compile", "the decoder layers") from err
    if last is None:
        return hidden
    return _read_layer(model, base.layers[-1], hidden, positions, position_embeddings,
                       windowed if last[1] else visible, read)


class _KeysAndValues:
    """A stand-in KV cache for one layer call: the first :meth:`update` keeps the layer's
    keys and values and stops the call (:class:`_Kept`); later ones put them before the
    queries' own keys and values (which the caller's mask hides)."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, keys, values, layer_idx=None, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = keys, values
            raise _Kept
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


class _Kept(Exception):
    """Raised out of a layer call once its keys and values are kept."""


def _read_layer(model, layer, hidden: torch.Tensor, positions: torch.Tensor,
                position_embeddings, visible: torch.Tensor, read: torch.Tensor
                ) -> torch.Tensor:
    """``layer``'s output at positions ``read`` ``[U, K]`` of ``hidden`` ``[U, S, H]``: a
    first call of the layer on every position stops once its keys and values are made
    (the layer's own projections, norms and rotary embedding, through the cache it is
    given); a second call on the read positions alone attends to those keys, through the
    same cache and a mask of what each read position sees."""
    keyword = cache_keyword(layer)
    kept = _KeysAndValues()
    try:
        layer(hidden, attention_mask=None, position_embeddings=position_embeddings,
              position_ids=positions, **{keyword: kept})
    except _Kept:
        pass
    if kept.keys is None:
        raise RuntimeError(f"{type(layer).__name__} did not pass its keys and values to "
                           "its cache; plait cannot read its output at chosen positions")
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    picked = hidden[rows, read]
    own = torch.zeros(read.shape + read.shape[1:], dtype=torch.bool, device=read.device)
    sees = torch.cat([visible[rows, read], own], dim=-1).unsqueeze(1)  # [U, 1, K, S + K]
    cos, sin = position_embeddings
    out = layer(picked, attention_mask=attention_mask(sees, model.config, hidden.dtype),
                position_embeddings=(cos[rows, read], sin[rows, read]),
                position_ids=positions[rows, read], **{keyword: kept})
    return out[0] if isinstance(out, tuple) else out


# decoder -> its layers wrapped by torch.compile (see compile_layers); the modules
# themselves are not changed, so the engine and no-grad passes run them eagerly
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_layers(model) -> bool:
    """Run ``model``'s decoder layers through ``torch.compile`` (symbolic shapes: one
    graph for every packed batch shape) in plait's packed passes that build a gradient:
    the training forward and backward of plait sft, rm, dpo and of the RL update. Each
    layer's norms, rotary embedding and activations fuse into a few kernels, which on a
    small model is most of a step's time after the matrix products. The first step pays
    the compilation (seconds to a minute, cached on disk for later runs). False when plait
    does not drive the model's layers (nothing is compiled)."""
    view = _ScoreView(model) if hasattr(model, "score") else model
    if not drives_layers(view):
        return False
    base, _ = decoder_parts(view, hint="")
    if base not in _COMPILED:
        _COMPILED[base] = [torch.compile(layer, dynamic=True) for layer in base.layers]
    return True


def drives_layers(model) -> bool:
    """Whether plait runs ``model``'s decoder layers itself with masks of its own (the
    packed passes): a supported decoder family and attention kernel, not sharded."""
    if isinstance(model, FSDPModule):
        return False
    try:
        decoder_parts(model, hint="")
    except ValueError:
        return False
    return True


def segment_logits(model, ids: torch.Tensor, positions: torch.Tensor,
                   segment: torch.Tensor) -> torch.Tensor | None:
    """Logits of packed rows ``[U, S]``: each token sees the earlier tokens of its own
    segment only (``segment`` -1: padding, which sees itself), at its own positions, so
    each packed example is computed as in a row of its own. None for a model whose
    layers plait does not drive (the caller pads examples into rows instead)."""
    if not drives_layers(model):
        return None
    base, head = decoder_parts(model, hint="")
    query_seg, key_seg = segment.unsqueeze(2), segment.unsqueeze(1)
    before = positions.unsqueeze(1) <= positions.unsqueeze(2)
    visible = (key_seg == query_seg) & (key_seg >= 0) & before
    visible |= torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
    return head(base.norm(masked_hidden(model, base, ids, positions, visible)))


class _ScoreView:
    """A one-label sequence classifier seen as a causal LM whose "vocabulary" is its
    score: the decoder and the score head, as :func:`decoder_parts` finds them."""

    def __init__(self, classifier):
        self.model, self.config, self._score = classifier.model, classifier.config, \
            classifier.score

    def get_output_embeddings(self):
        return self._score


def packed_sequence_scores(reward_model, batch: Experience, max_tokens: int
                           ) -> torch.Tensor | None:
    """``[B]`` scores of each ``[prompt | response]`` row at its last response token,
    rows of one prompt computing it once and packed with their responses as in
    :func:`response_logits`; equal to the classifier's forward of every row. None when
    plait does not drive the model's layers (the caller runs padded rows)."""
    if isinstance(reward_model, FSDPModule) or not hasattr(reward_model, "score"):
        return None
    view = _ScoreView(reward_model)
    if not drives_layers(view):
        return None
    rows = batch.batch_size
    lengths = batch.response_mask.sum(-1).long()
    # one more (unread) token per row: its "logits" are the score of the hidden state at
    # the row's last real token
    ids = torch.nn.functional.pad(batch.response_ids, (0, 1))
    ids[torch.arange(rows, device=ids.device), lengths] = 0
    extended = Experience(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask,
                          response_ids=ids,
                          response_mask=torch.nn.functional.pad(batch.response_mask, (0, 1)),
                          group_ids=batch.group_ids)
    extended.response_mask[torch.arange(rows, device=ids.device), lengths] = 1.0
    first, inverse = extended.prompt_index()
    scores = _packed_group_logits(view, extended, first, inverse, max_tokens, last_only=True)
    if scores is None:
        return None
    return scores[:, 0, 0].float()


def packed_response_scores(reward_model, prompts: list[list[int]],
                           responses: list[list[int]], pad: int,
                           max_tokens: int = 1024) -> torch.Tensor | None:
    """:func:`packed_sequence_scores` of token-id prompts and responses (rows with the
    same prompt share it), on the reward model's device."""
    device = next(reward_model.parameters()).device
    keys: dict[tuple, int] = {}
    batch = experience_from_tokens(prompts, responses,
                                   [keys.setdefault(tuple(p), len(keys)) for p in prompts], pad)
    return packed_sequence_scores(reward_model, batch.to(device), max_tokens)


def attention_crossover(config, base) -> float:
    """The packed-sequence length at which a token's attention costs as much as the rest
    of its decoder layers, by floating-point operations: a token's linear layers take
    ``2 N`` (``N``: the weights it multiplies by, only the experts it is routed to in a
    mixture of experts), its attention ``4 w L S`` against ``S`` keys (``w``: query
    heads x head dim, ``L`` layers; a packed sequence's mask is dense, so every key of the
    sequence counts), so the two are equal at ``S = N / (2 w L)``: ~770 tokens for the
    tiny default model, thousands for real ones."""
    dense = routed = 0
    for name, p in base.layers.named_parameters():
        if ".experts." in name:
            routed += p.numel()
        else:
            dense += p.numel()
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if routed and experts:
        routed = routed * getattr(config, "num_experts_per_tok", 1) / experts
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim * len(base.layers)
    return max(1.0, (dense + routed) / (2 * width))


# each capacity :func:`pack_plan` tries is at most the previous one / _LADDER: a coarse ladder
# keeps the search short and still lands near the cheapest partition
_LADDER = 1.1


class PackPlan(NamedTuple):
    """Where :func:`pack_plan` puts each row and prompt: row ``r``'s fed tokens start at
    ``row_start[r]`` of sequence ``row_unit[r]`` and belong to block ``row_block[r]``;
    block ``b`` (a prompt and some of its rows' responses) is prompt ``block_group[b]``
    at ``block_start[b]`` of sequence ``block_unit[b]``; sequence ``u`` holds
    ``unit_len[u]`` tokens."""

    row_unit: list[int]
    row_start: list[int]
    row_block: list[int]
    block_unit: list[int]
    block_start: list[int]
    block_group: list[int]
    unit_len: list[int]


def pack_plan(prompt_len: list[int], fed: list[int], group: list[int], max_tokens: int,
              crossover: float | None = None) -> PackPlan:
    """Which packed sequence each row's response goes to, and where in it.

    ``prompt_len[g]``: prompt ``g``'s tokens; ``fed[r]``: row ``r``'s response tokens fed
    (all but its last); ``group[r]``: row ``r``'s prompt. A block is one prompt followed
    by some of its rows' responses; a sequence is one or more blocks, at most
    ``max_tokens`` long unless it holds a single response. The sequences run as one
    ``[sequences, span]`` batch (``span``: the longest), whose cost the plan minimises:
    ``sequences x span x (1 + span / crossover)`` (tokens through the linear layers,
    padding included, plus dense attention; see :func:`attention_crossover`). First the
    blocks: under each capacity of a ladder from ``max_tokens`` down, each group's
    responses go longest first into the first of its blocks with room, a block to a
    sequence; then the cheapest blocks share sequences, longest first into the first with
    room (first-fit decreasing), under capacities growing from the longest block while
    the cost falls. The cheapest plan wins, the first found on a tie. With no
    ``crossover``, the blocks of the largest capacity fill sequences up to
    ``max_tokens`` (fewest sequences)."""
    rows_of: dict[int, list[int]] = {}
    for row, g in enumerate(group):
        rows_of.setdefault(g, []).append(row)
    for members in rows_of.values():
        members.sort(key=lambda r: -fed[r])  # stable: equal lengths keep row order

    def blocks(capacity: int) -> list:
        return _blocks(rows_of, prompt_len, fed, capacity)

    def lengths(made: list) -> list[int]:
        return [length for _, _, length in made]

    # blocks, a sequence each: capacities above the longest whole group or below every
    # pair of responses change nothing, so the ladder spans the capacities between (a
    # capacity from the last block's length up gives the same blocks)
    whole = max(prompt_len[g] + sum(fed[r] for r in members) for g, members in rows_of.items())
    capacity = min(max_tokens, whole)
    made = blocks(capacity)
    if crossover is None:
        return _placed(made, *_bins(lengths(made), min(max_tokens, sum(lengths(made)))),
                       prompt_len, fed, len(group))
    first = made
    best = (made, *_bins(lengths(made), None))
    best_cost = _cost(best[2], crossover)
    pair = min((prompt_len[g] + fed[m[-1]] + fed[m[-2]] for g, m in rows_of.items()
                if len(m) > 1), default=None)
    while pair is not None and capacity >= pair:
        capacity = max(pair - 1, min(int(capacity / _LADDER), max(lengths(made)) - 1))
        made = blocks(capacity)
        if (plan_cost := _cost(lengths(made), crossover)) < best_cost:
            best, best_cost = (made, *_bins(lengths(made), None)), plan_cost
    # the cheapest blocks and the largest ones (whole groups) sharing sequences
    for made in (best[0], first) if best[0] is not first else (first,):
        best, best_cost = _shared(made, best, best_cost, max_tokens, crossover)
    return _placed(*best, prompt_len, fed, len(group))


def _blocks(rows_of: dict[int, list[int]], prompt_len: list[int], fed: list[int],
            capacity: int) -> list:
    """Each group's rows (longest first) in blocks of at most ``capacity`` tokens, a
    block's first response whatever its length: ``[group, rows, block length]`` each."""
    made: list = []
    for g, members in rows_of.items():
        first = len(made)
        for row in members:
            for b in range(first, len(made)):
                if made[b][2] + fed[row] <= capacity:
                    break
            else:  # a new block takes its first response whatever its length
                b = len(made)
                made.append([g, [], prompt_len[g]])
            made[b][1].append(row)
            made[b][2] += fed[row]
    return made


def _bins(lengths: list[int], capacity: int | None) -> tuple[list[int], list[int]]:
    """Blocks of ``lengths`` in sequences, first-fit decreasing under ``capacity``
    (``None``: one sequence each): the sequence of each block and their lengths."""
    unit_of, unit_len = [0] * len(lengths), []
    for b in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        length, u = lengths[b], len(unit_len)
        if capacity is not None and length <= capacity:
            room = capacity - length
            for at, used in enumerate(unit_len):
                if used <= room:
                    u = at
                    break
        if u == len(unit_len):
            unit_len.append(length)
        else:
            unit_len[u] += length
        unit_of[b] = u
    return unit_of, unit_len


def _cost(unit_len: list[int], crossover: float) -> float:
    """:func:`pack_plan`'s cost of sequences of these lengths run as one batch."""
    span = max(unit_len)
    return len(unit_len) * span * (1.0 + span / crossover)


def _shared(made: list, best: tuple, best_cost: float, max_tokens: int,
            crossover: float) -> tuple[tuple, float]:
    """``best`` or a cheaper plan of blocks ``made`` sharing sequences, under capacities
    growing from the longest block within the cap (a smaller capacity leaves the span and
    only packs worse) to the cap, until the cost has not fallen three times running."""
    lengths = [length for _, _, length in made]
    ordered = sorted(lengths)
    limit, rises = min(max_tokens, sum(lengths)), 0
    fitting = [length for length in ordered if length <= limit]
    if len(fitting) < 2:
        return best, best_cost
    capacity = max(fitting[-1], fitting[0] + fitting[1])
    while capacity <= limit and rises < 3:
        unit_of, unit_len = _bins(lengths, capacity)
        if (plan_cost := _cost(unit_len, crossover)) < best_cost:
            best, best_cost, rises = (made, unit_of, unit_len), plan_cost, 0
        else:
            rises += 1
        capacity = limit if capacity < limit < capacity * _SHARE else \
            int(capacity * _SHARE) + 1
    return best, best_cost


def _placed(made: list, block_unit: list[int], unit_len: list[int], prompt_len: list[int],
            fed: list[int], rows: int) -> PackPlan:
    """The :class:`PackPlan` of blocks ``made`` (group, rows, length) in sequences
    ``block_unit``, each block after the blocks before it in its sequence."""
    block_start, used = [0] * len(made), [0] * len(unit_len)
    row_unit, row_start, row_block = [0] * rows, [0] * rows, [0] * rows
    for b, (g, members, length) in enumerate(made):
        u = block_unit[b]
        block_start[b], at = used[u], used[u] + prompt_len[g]
        used[u] += length
        for row in members:
            row_unit[row], row_start[row], row_block[row] = u, at, b
            at += fed[row]
    return PackPlan(row_unit, row_start, row_block, block_unit, block_start,
                    [g for g, _, _ in made], unit_len)


# the capacities under which blocks share sequences grow by this factor
_SHARE = 1.25


class ResponseLogits(torch.nn.Module):
    """A causal LM whose one call computes an Experience's response logits: the module a
    data-parallel wrapper wraps, so the shared-prompt path (two model calls) is still one
    forward to it."""

    def __init__(self, model, share_prompts: bool = False, pack_tokens: int = 0):
        super().__init__()
        self.model = model
        self.share_prompts = share_prompts
        self.pack_tokens = pack_tokens

    def forward(self, batch: Experience, temperature: float = 1.0) -> torch.Tensor:
        return response_logits(self.model, batch, temperature, self.share_prompts,
                               self.pack_tokens)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: ``[B, R, V], [B, R] -> [B, R]``."""
    logz = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - logz


def response_logprobs(model, batch: Experience, temperature: float = 1.0,
                      share_prompts: bool = False, pack_tokens: int = 0) -> torch.Tensor:
    return token_logprobs(response_logits(model, batch, temperature, share_prompts,
                                          pack_tokens), batch.response_ids)


def response_values(critic, batch: Experience) -> torch.Tensor:
    """Critic value of each response position: ``[B, R]`` (the value of the state before
    the token is emitted, as in GAE's V(s_t))."""
    input_ids = batch.input_ids()
    attention_mask = batch.attention_mask()
    width = batch.response_ids.shape[1]
    values = critic(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask))
    return values[:, -width - 1:-1].float()
