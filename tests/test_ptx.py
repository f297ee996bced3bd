"""PTX: a supervised next-token loss mixed into each actor update with its weight. The
gradient equals the hand-built one on the same rows; text and prompt/answer rows load;
two ranks give the one-rank update; the job logs the loss."""

import json

import pytest
import torch
from test_runtime import assert_same_weights, job, run_cli

from plait.config import ConfigError, load_config
from plait.data.datasets import DataError, load_text_rows
from plait.models.loading import load_causal_lm
from plait.models.tiny import TinyModelSpec, build_char_tokenizer, save_tiny_model
from plait.parallel.dist import Dist
from plait.train.supervised import PtxLoss


def test_the_gradient_is_the_weighted_mean_answer_token_loss(tmp_path):
    save_tiny_model(tmp_path / "m", TinyModelSpec(hidden_size=32, intermediate_size=64,
                                                 num_layers=2, num_heads=2, num_kv_heads=1))
    tokenizer = build_char_tokenizer()
    rows = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "", "answer": "hello"}]
    config = load_config(None, ["algo.ptx_coef=0.25", "algo.ptx_batch_size=6"])
    model = load_causal_lm(tmp_path / "m").train()
    ptx = PtxLoss(config, rows, lambda p: tokenizer(p)["input_ids"], tokenizer,
                  Dist.single(), torch.device("cpu"))
    logged = ptx.backward(model, step=3, index=1)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # by hand: the same draw, each answer token's (and EOS's) loss given what precedes it
    generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + 3 * 1009 + 1 + 17)
    picked = torch.randint(len(rows), (6,), generator=generator).tolist()
    model.zero_grad(set_to_none=True)
    losses = []
    for i in picked:
        prompt = tokenizer(rows[i]["prompt"])["input_ids"] if rows[i]["prompt"] else []
        answer = tokenizer(rows[i]["answer"], add_special_tokens=False)["input_ids"] + \
            [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for position in range(max(len(prompt), 1), ids.shape[1]):
            losses.append(-logp[position - 1, ids[0, position]])
    mean = torch.stack(losses).mean()
    (0.25 * mean).backward()
    assert logged["loss/ptx"] == pytest.approx(mean.item(), rel=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(got[name], param.grad, atol=1e-6), name


def test_supervised_rows_load_from_text_or_prompt_and_answer(tmp_path):
    path = tmp_path / "ptx.jsonl"
    path.write_text('{"text": "abc"}\n{"prompt": "q", "completion": "a"}\n'
                    '{"prompt": "q", "answer": "b"}\n')
    assert load_text_rows(path) == [{"prompt": "", "answer": "abc"},
                                    {"prompt": "q", "answer": "a"},
                                    {"prompt": "q", "answer": "b"}]
    path.write_text('{"text": "abc"}\n{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"ptx.jsonl.*line 2.*needs a non-empty 'text'"):
        load_text_rows(path)


def test_sharded_or_streamed_jobs_refuse_ptx():
    with pytest.raises(ConfigError, match="algo.ptx_coef runs its forward outside"):
        load_config(None, ["algo.ptx_coef=1", "runtime.data_parallel=fsdp",
                           "runtime.num_ranks=2"])
    with pytest.raises(ConfigError, match="runtime.stream_groups"):
        load_config(None, ["algo.ptx_coef=1", "runtime.stream_groups=true",
                           "runtime.placement=disaggregated", "runtime.num_ranks=2"])


def test_two_ranks_give_the_one_rank_update_with_ptx(tiny_job, reward_spec, tmp_path):
    """Also with two mini-batches: each rank takes its rows of the one-rank split."""
    one, two = tmp_path / "one", tmp_path / "two"
    ptx = ("algo.ptx_coef=0.5", "algo.ptx_batch_size=5", "algo.mini_batches=2")
    proc = run_cli("train", *job(tiny_job, reward_spec, one, *ptx))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, two, *ptx, "runtime.num_ranks=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, two)
    m1, m2 = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()
               if '"loss/ptx"' in line] for d in (one, two))
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2, strict=True):
        assert a["loss/ptx"] > 0 and b["loss/ptx"] == pytest.approx(a["loss/ptx"], rel=1e-5)
