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
