"""Reward models: scores from plait's path equal transformers' own forward, before and after
a save; padding does not move a score; a new head is seeded."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from plait.models.reward_model import load_reward_model, sequence_scores
from plait.models.tiny import TinyModelSpec, build_char_tokenizer, save_tiny_model


@pytest.fixture(params=["qwen2", "llama"])
def causal_dir(tmp_path, request):
    out = tmp_path / request.param
    save_tiny_model(out, TinyModelSpec(arch=request.param, hidden_size=32, intermediate_size=64,
                                       num_layers=2, num_heads=2, num_kv_heads=1), seed=3)
    return out


def right_padded(texts, tokenizer):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


TEXTS = ["abc=cba", "hello=olleh", "x=x", "qwerty=ytrewq"]


def test_scores_equal_transformers_forward_before_and_after_a_save(causal_dir, tmp_path):
    tokenizer = build_char_tokenizer()
    model = load_reward_model(causal_dir, pad_token_id=tokenizer.pad_token_id, seed=1).eval()
    ids, mask = right_padded(TEXTS, tokenizer)
    with torch.no_grad():
        ours = sequence_scores(model, ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = torch.cat([sequence_scores(model, ids[i:i + 1, :int(mask[i].sum())],
                                           mask[i:i + 1, :int(mask[i].sum())])
                           for i in range(len(TEXTS))])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)  # padding moves nothing
    assert ours.std() > 0
    saved = tmp_path / "rm"
    model.save_pretrained(saved)
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   ours, atol=1e-5, rtol=1e-5)
    again = load_reward_model(saved, pad_token_id=tokenizer.pad_token_id, seed=99).eval()
    with torch.no_grad():  # a saved reward model keeps its head whatever the seed
        torch.testing.assert_close(sequence_scores(again, ids, mask), ours, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_same_scores(causal_dir):
    tokenizer = build_char_tokenizer()
    model = load_reward_model(causal_dir, pad_token_id=tokenizer.pad_token_id).eval()
    ids, mask = right_padded(TEXTS, tokenizer)
    lengths = mask.sum(-1)
    left_ids, left_mask = torch.full_like(ids, tokenizer.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(model, left_ids, left_mask),
                                   sequence_scores(model, ids, mask), atol=1e-5, rtol=1e-5)


def test_a_new_head_is_seeded_and_trains(causal_dir):
    tokenizer = build_char_tokenizer()
    pad = tokenizer.pad_token_id
    one, same = (load_reward_model(causal_dir, pad_token_id=pad, seed=5) for _ in range(2))
    other = load_reward_model(causal_dir, pad_token_id=pad, seed=6)
    assert torch.equal(one.score.weight, same.score.weight)
    assert not torch.equal(one.score.weight, other.score.weight)
    ids, mask = right_padded(TEXTS[:2], tokenizer)
    sequence_scores(one, ids, mask).sum().backward()
    assert one.score.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for name, p in one.named_parameters() if "layers" in name)
