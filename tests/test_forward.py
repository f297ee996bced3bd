"""Teacher-forced forwards: a group's shared prompt run once equals every row in full."""

import pytest
import torch

from plait.models.tiny import TINY_ARCHS, TinyModelSpec, build_char_tokenizer, build_tiny_model
from plait.train.experience import Experience
from plait.train.forward import response_logits


def _batch(vocab: int, groups: int = 3, group_size: int = 4, width: int = 5, seed: int = 0):
    """``groups`` prompts of different lengths (left-padded), each answered ``group_size``
    times with responses of different lengths (right-padded), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    prompt_width = 7
    prompt_ids = torch.randint(4, vocab, (groups, prompt_width), generator=g)
    prompt_mask = torch.ones(groups, prompt_width, dtype=torch.long)
    for i in range(groups):
        prompt_mask[i, : i % 3] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    rows = groups * group_size
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    response_ids = torch.randint(4, vocab, (rows, width), generator=g)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0] = width
    response_mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    response_ids = response_ids.masked_fill(response_mask == 0, 0)
    order = torch.randperm(rows, generator=g)
    return Experience(prompt_ids=prompt_ids[group_ids][order],
                      prompt_mask=prompt_mask[group_ids][order],
                      response_ids=response_ids[order], response_mask=response_mask[order],
                      group_ids=group_ids[order])


def _logprob_sum(logits, batch):
    picked = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1))
    return (picked.squeeze(-1) * batch.response_mask).sum()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
@pytest.mark.parametrize("width", [1, 5])
@pytest.mark.parametrize("pack", [0, 2048, 9])
def test_shared_prompts_equal_the_full_forward(arch, width, pack):
    """Cached prompt (pack 0), packed groups, and packed with a cap that splits groups
    over several sequences (9 tokens: a prompt and one or two responses)."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(arch=arch, hidden_size=32, intermediate_size=64,
                                           num_layers=2, num_heads=4, num_kv_heads=2),
                             tokenizer, seed=1)
    batch = _batch(len(tokenizer), width=width)
    params = list(model.parameters())
    full = response_logits(model, batch, 0.7)
    full_grads = torch.autograd.grad(_logprob_sum(full, batch), params)
    shared = response_logits(model, batch, 0.7, share_prompts=True, pack_tokens=pack)
    shared_grads = torch.autograd.grad(_logprob_sum(shared, batch), params)
    mask = batch.response_mask.bool()
    assert shared.shape == full.shape
    torch.testing.assert_close(shared[mask], full[mask], rtol=1e-5, atol=1e-5)
    assert max(float(g.abs().max()) for g in full_grads) > 1e-2
    for a, b in zip(shared_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(TINY_ARCHS) + ["mistral-window"])
def test_last_layer_at_read_positions_equals_the_whole_layer(arch):
    """masked_hidden with ``read``: the last layer run only at the read positions (its
    keys and values at all) gives the whole forward's hidden states there, values and
    gradients, for every tiny family, block-diagonal masks with padding, and a sliding
    window narrower than the sequences."""
    from plait.models.decoder import decoder_parts
    from plait.train.forward import masked_hidden

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(arch=arch.split("-")[0], hidden_size=32,
                                           intermediate_size=64, num_layers=2, num_heads=4,
                                           num_kv_heads=2), tokenizer, seed=3)
    if arch == "mistral-window":
        model.config.sliding_window = 5
    base, _ = decoder_parts(model)
    g = torch.Generator().manual_seed(0)
    units, span = 3, 16
    ids = torch.randint(4, len(tokenizer), (units, span), generator=g)
    block = (torch.arange(span) // 6).expand(units, span).clone()
    block[1, 13:] = -1  # padding
    positions = torch.arange(span) % 6
    positions = positions.expand(units, span)
    visible = (block.unsqueeze(1) == block.unsqueeze(2)) & (block.unsqueeze(1) >= 0) & \
        (positions.unsqueeze(1) <= positions.unsqueeze(2))
    visible |= torch.eye(span, dtype=torch.bool)
    read = torch.tensor([[5, 11, 15], [0, 5, 5], [2, 8, 12]])
    params = list(base.embed_tokens.parameters()) + list(base.layers.parameters())
    full = masked_hidden(model, base, ids, positions, visible)
    want = full[torch.arange(units).unsqueeze(1), read]
    weight = torch.randn(want.shape, generator=g)
    want_grads = torch.autograd.grad((want * weight).sum(), params)
    got = masked_hidden(model, base, ids, positions, visible, read=read)
    assert got.shape == (units, 3, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad((got * weight).sum(), params)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_distinct_prompts_ignore_padding_and_map_every_row():
    batch = _batch(40, groups=4, group_size=3)
    first, inverse = batch.prompt_index()
    assert first.numel() == 4
    assert torch.equal(batch.prompt_ids[first][inverse], batch.prompt_ids)
    assert torch.equal(batch.prompt_mask[first][inverse], batch.prompt_mask)
    assert first.tolist() == sorted(first.tolist())  # numbered in row order
    assert all(inverse[f] == i for i, f in enumerate(first.tolist()))


def test_rows_without_a_shared_prompt_run_in_full(monkeypatch):
    """No two rows alike: the forward is the plain one (one model call)."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=1,
                                           num_heads=2, num_kv_heads=1), tokenizer)
    batch = _batch(len(tokenizer), groups=4, group_size=1)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k) or forward(*a, **k))
    out = response_logits(model, batch, share_prompts=True)
    assert len(calls) == 1 and calls[0]["use_cache"] is False
    assert out.shape[:2] == batch.response_ids.shape


@pytest.mark.parametrize("budget", [12, 30, 1000])
def test_token_budget_keeps_a_prompt_with_its_rows(budget):
    """With shared prompts, a micro-batch costs prompts x prompt width + rows x response
    width; a prompt's rows stay in one micro-batch unless they alone exceed the budget."""
    batch = _batch(40, groups=5, group_size=4, width=6, seed=2)
    parts = batch.micro_batch_indices(8, token_budget=budget, share_prompts=True)
    assert sorted(torch.cat(parts).tolist()) == list(range(batch.batch_size))
    _, inverse = batch.prompt_index()
    homes = {}
    for idx in parts:
        micro = batch.select(idx).trimmed()
        prompts = micro.prompt_index()[0].numel()
        cost = prompts * micro.prompt_ids.shape[1] + micro.batch_size * micro.response_ids.shape[1]
        assert micro.batch_size <= 8
        assert cost <= budget or prompts == 1 and micro.batch_size == 1
        for unit in inverse[idx].unique().tolist():
            homes.setdefault(unit, []).append(len(idx))
    for unit, sizes in homes.items():
        rows = int((inverse == unit).sum())
        mine = inverse == unit
        alone = batch.prompt_mask[mine][0].sum() + rows * batch.response_mask[mine].sum(-1).max()
        if len(sizes) > 1:  # split only when the whole prompt group cannot fit
            assert rows > 8 or alone > budget
    if budget == 1000:
        assert len(parts) == 3  # 20 rows, 8 at most per micro-batch, whole groups of 4


def test_attention_implementation_is_a_setting(tmp_path):
    """model.attn_implementation picks the kernels; eager and sdpa give the same logits."""
    from plait.models.loading import load_causal_lm
    from plait.models.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "tiny", TinyModelSpec(hidden_size=32, intermediate_size=64,
                                                           num_layers=2, num_heads=2,
                                                           num_kv_heads=1))
    eager = load_causal_lm(path, "eager")
    default = load_causal_lm(path)
    assert eager.config._attn_implementation == "eager"
    assert default.config._attn_implementation == "sdpa"
    batch = _batch(eager.config.vocab_size)
    mask = batch.response_mask.bool()
    full = response_logits(default, batch)[mask]
    for share, pack in ((False, 0), (True, 0), (True, 2048)):
        for model in (eager, default):
            torch.testing.assert_close(
                response_logits(model, batch, share_prompts=share, pack_tokens=pack)[mask],
                full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
@pytest.mark.parametrize("pack", [0, 2048])
def test_shared_prompts_under_sliding_window_attention(arch, pack):
    """A window shorter than prompt + response: the shared path still equals the full one
    (the cache's sliding layers keep what the mask would show)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = MistralConfig(sliding_window=4, **common) if arch == "mistral" else Qwen3Config(
        sliding_window=4, use_sliding_window=True, max_window_layers=1,
        layer_types=["sliding_attention", "full_attention"], **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch = _batch(50, width=5)
    mask = batch.response_mask.bool()
    full = response_logits(model, batch)
    shared = response_logits(model, batch, share_prompts=True, pack_tokens=pack)
    torch.testing.assert_close(shared[mask], full[mask], rtol=1e-5, atol=1e-5)


def _spy_forward(monkeypatch, model):
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k) or forward(*a, **k))
    return calls


@pytest.mark.parametrize("cap", [2048, 9])
def test_packed_groups_run_as_few_sequences(monkeypatch, cap):
    """The packed path is the one taken: no model.forward call (the model's own modules
    run the packed sequences), one sequence per prompt under a large cap, more under a
    cap a prompt and one or two responses fill, none longer than needed."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=1,
                                           num_heads=2, num_kv_heads=1), tokenizer)
    batch = _batch(len(tokenizer), groups=3, group_size=4, width=5)
    calls = _spy_forward(monkeypatch, model)
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: shapes.append(a[0].shape))
    response_logits(model, batch, share_prompts=True, pack_tokens=cap)
    assert calls == [] and len(shapes) == 1
    sequences, span = shapes[0]
    prompt_len = batch.prompt_mask.sum(-1)
    fed = (batch.response_mask.sum(-1) - 1).clamp(min=0)
    if cap == 2048:
        assert sequences == 3  # one per prompt
        _, inverse = batch.prompt_index()
        longest = max(int(prompt_len[inverse == g][0] + fed[inverse == g].sum())
                      for g in range(3))
        assert span == longest  # prompt + every response but its last token, no padding
    else:
        assert sequences > 3 and span <= max(cap, int((prompt_len + fed).max()))


def test_packed_path_falls_back_where_it_cannot_run(monkeypatch):
    """A response mask with a hole, or a model whose layers plait does not drive: the
    cached-prompt path (two model calls) runs instead, with the same result."""
    import plait.train.forward as forward_module

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=1,
                                           num_heads=2, num_kv_heads=1), tokenizer)
    batch = _batch(len(tokenizer), width=5)
    full = response_logits(model, batch)
    mask = batch.response_mask.bool()
    holed = _batch(len(tokenizer), width=5)
    row = int(holed.response_mask.sum(-1).argmax())
    holed.response_mask[row, 1] = 0  # a masked token inside the response
    calls = _spy_forward(monkeypatch, model)
    out = response_logits(model, holed, share_prompts=True, pack_tokens=2048)
    assert len(calls) == 2
    torch.testing.assert_close(out, response_logits(model, holed, share_prompts=True))

    def refuse(*args, **kwargs):
        raise ValueError("not a supported decoder")

    monkeypatch.setattr(forward_module, "decoder_parts", refuse)
    calls.clear()
    out = response_logits(model, batch, share_prompts=True, pack_tokens=2048)
    assert len(calls) == 2
    torch.testing.assert_close(out[mask], full[mask], rtol=1e-5, atol=1e-5)


def test_attention_crossover_counts_the_layers_flops():
    """N / (2 x attention width x layers), N the weights a token multiplies by: the tiny
    default model by hand, and a mixture of experts counting only the routed share."""
    from types import SimpleNamespace

    from plait.models.decoder import decoder_parts
    from plait.train.forward import attention_crossover

    model = build_tiny_model(TinyModelSpec(), build_char_tokenizer())
    base, _ = decoder_parts(model)
    # per layer: q 128x128 + 128, k and v 128x64 + 64 each, o 128x128, MLP 3 x 128x384,
    # two norms of 128; width 4 heads x 32 = 128; 4 layers
    per_layer = 128 * 128 + 128 + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert attention_crossover(model.config, base) == 4 * per_layer / (2 * 128 * 4)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(8, 8, bias=False)  # 64 weights
            self.mlp = torch.nn.Module()
            self.mlp.experts = torch.nn.ModuleList(
                torch.nn.Linear(8, 16, bias=False) for _ in range(4))  # 4 x 128

    moe = SimpleNamespace(layers=torch.nn.ModuleList([Layer(), Layer()]))
    config = SimpleNamespace(num_experts=4, num_experts_per_tok=1, num_attention_heads=2,
                             hidden_size=8, head_dim=None)
    # 2 layers x (64 + 128 routed to) over 2 x (2 heads x 4) x 2 layers
    assert attention_crossover(config, moe) == 2 * (64 + 128) / (2 * 8 * 2)


def _partitions(items):
    if not items:
        yield []
        return
    for rest in _partitions(items[1:]):
        for i in range(len(rest)):
            yield rest[:i] + [[items[0]] + rest[i]] + rest[i + 1:]
        yield [[items[0]]] + rest


def test_pack_plan_is_valid_and_close_to_the_cheapest_partition():
    """Every plan places each row once, in a block of its own prompt inside a sequence,
    the blocks and each block's responses tiling the sequence, within the cap unless it
    holds a single response; its cost is within 25% of the cheapest of all partitions of
    the rows into sequences (brute force; a sequence holds each of its rows' prompts
    once), 1% on average."""
    import random

    from plait.train.forward import pack_plan

    ratios = []
    for seed in range(150):
        rng = random.Random(seed)
        groups, per_group = rng.randint(1, 3), rng.randint(1, 3)
        group = [g for g in range(groups) for _ in range(per_group)]
        rng.shuffle(group)
        plen = [rng.randint(1, 12) for _ in range(groups)]
        fed = [int(rng.random() ** 2 * 60) for _ in group]
        cap, crossover = rng.choice([20, 40, 80, 1000]), rng.choice([10.0, 30.0, 100.0, 1e9])
        plan = pack_plan(plen, fed, group, cap, crossover)
        assert sorted(set(plan.row_block)) == list(range(len(plan.block_group)))
        for u, length in enumerate(plan.unit_len):
            pieces = []  # (start, length, what) of every block's prompt and row in u
            for b in range(len(plan.block_group)):
                if plan.block_unit[b] == u:
                    pieces.append((plan.block_start[b], plen[plan.block_group[b]], ("p", b)))
            rows = [r for r in range(len(group)) if plan.row_unit[r] == u]
            for r in rows:
                assert group[r] == plan.block_group[plan.row_block[r]]
                assert plan.block_unit[plan.row_block[r]] == u
                pieces.append((plan.row_start[r], fed[r], ("r", plan.row_block[r])))
            pieces.sort(key=lambda piece: (piece[0], piece[1] > 0, piece[2][0] != "p"))
            at, block = 0, None
            for start, size, (kind, b) in pieces:
                assert start == at
                assert kind == "p" or b == block  # a row follows its own block's prompt
                block = b
                at += size
            assert rows and at == length and (len(rows) == 1 or length <= cap)

        def cost(lengths, crossover=crossover):
            span = max(lengths)
            return len(lengths) * span * (1 + span / crossover)

        def length(unit, plen=plen, group=group, fed=fed):
            return sum(plen[g] for g in {group[r] for r in unit}) + sum(fed[r] for r in unit)

        cheapest = min(cost([length(u) for u in p]) for p in _partitions(list(range(len(group))))
                       if all(len(u) == 1 or length(u) <= cap for u in p))
        ratios.append(cost(plan.unit_len) / cheapest)
    assert min(ratios) >= 1 - 1e-9
    assert max(ratios) <= 1.25 and sum(ratios) / len(ratios) <= 1.01


def test_pack_plan_splits_groups_whose_attention_outweighs_the_prompt():
    """Eight 100-token responses to a 4-token prompt: one 804-token sequence when attention
    is cheap (or no cost model: filled to the cap), several when a 100-token sequence's
    attention already costs as much as its other layers."""
    from plait.train.forward import pack_plan

    fed, group = [100] * 8, [0] * 8
    assert len(pack_plan([4], fed, group, 2048).unit_len) == 1
    assert len(pack_plan([4], fed, group, 2048, crossover=1e6).unit_len) == 1
    # 8 x 104 x (1 + 1.04) = 1697 against 4 x 204 x 3.04 for pairs, 804 x 9.04 for one
    assert len(pack_plan([4], fed, group, 2048, crossover=100.0).unit_len) == 8
    assert len(pack_plan([4], fed, group, 300).unit_len) == 4  # the cap: 4 + 3 x 100 > 300


def test_packed_groups_split_by_the_cost_model_equal_the_full_forward(monkeypatch):
    """Long responses on a small model (crossover ~146 tokens): the groups run as more
    sequences than prompts, with the full forward's logits and gradients."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=1,
                                           num_heads=2, num_kv_heads=1), tokenizer)
    batch = _batch(len(tokenizer), groups=3, group_size=4, width=40)
    batch.response_mask[:] = 1.0  # every response 40 tokens: each group ~163 long
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: shapes.append(a[0].shape))
    packed = response_logits(model, batch, share_prompts=True, pack_tokens=2048)
    assert shapes[0][0] > 3
    full = response_logits(model, batch)
    torch.testing.assert_close(packed, full, rtol=1e-5, atol=1e-5)
    _logprob_sum(packed, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _logprob_sum(response_logits(model, batch), batch).backward()
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
