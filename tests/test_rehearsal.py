"""Selective rehearsal: k-means and the per-cluster selection by hand, the rehearsal
loss's gradient against a hand-built one, and in plait train: what is kept, that it
enters the update, that a resumed run keeps the pool and the kept responses exactly,
and two ranks == one rank."""

import json

import pytest
import torch
from test_runtime import assert_same_weights, job, run_cli

from plait.algos.rehearsal import kmeans, select_per_cluster
from plait.config import ConfigError, load_config
from plait.models.loading import load_causal_lm
from plait.models.tiny import TinyModelSpec, save_tiny_model
from plait.parallel.dist import Dist
from plait.train.checkpoint import read_trainer_state
from plait.train.rehearsal import Rehearsal


def test_kmeans_finds_separated_groups_the_same_way_each_time():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(20, 2, generator=generator) for c in centres])
    labels, found = kmeans(points, 3, seed=4)
    for group in range(3):  # each true group is one cluster
        assert len(set(labels[group * 20:(group + 1) * 20].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    assert torch.equal(kmeans(points, 3, seed=4)[0], labels)
    torch.testing.assert_close(found[labels[0]], points[:20].double().mean(0))
    assert kmeans(points[:2], 5, seed=0)[1].shape == (2, 2)  # k capped at N


def test_selection_takes_each_clusters_best_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.8, 0.2])
    # size 3: one each; cluster 0's best is a tie of 1 and 3 -> the lower index
    assert select_per_cluster(labels, scores, 3) == [1, 5, 6]
    # size 5: quotas 2 / 2 / 1 (the remainder to the largest clusters)
    assert select_per_cluster(labels, scores, 5) == [1, 3, 5, 4, 6]
    # size 6: quotas 2 / 2 / 2, cluster 2 holds one, the best of the rest (0.5) fills in
    assert select_per_cluster(labels, scores, 6) == [1, 3, 2, 5, 4, 6]
    assert sorted(select_per_cluster(labels, scores, 99)) == list(range(7))


def test_the_rehearsal_gradient_is_the_weighted_mean_response_token_loss(tmp_path):
    save_tiny_model(tmp_path / "m", TinyModelSpec(hidden_size=32, intermediate_size=64,
                                                 num_layers=2, num_heads=2, num_kv_heads=1))
    model = load_causal_lm(tmp_path / "m").train()
    config = load_config(None, ["rehearsal.coef=0.3", "rehearsal.batch_size=5"])
    state = {"rehearsal": {"pool": [], "selected_at": 2,
                           "kept": [[[5, 6, 7], [8, 9, 2]], [[10], [11, 2]]]}}
    rehearsal = Rehearsal(config, 0, Dist.single(), torch.device("cpu"), lambda: state)
    logged = rehearsal.backward(model, step=4, index=0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + 4 * 1009 + 29)
    picked = torch.randint(2, (5,), generator=generator).tolist()
    model.zero_grad(set_to_none=True)
    losses = []
    for i in picked:  # each response token given its prompt and the tokens before it
        prompt, response = state["rehearsal"]["kept"][i]
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for position in range(len(prompt), ids.shape[1]):
            losses.append(-logp[position - 1, ids[0, position]])
    mean = torch.stack(losses).mean()
    (0.3 * mean).backward()
    assert logged["loss/rehearsal"] == pytest.approx(mean.item(), rel=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(got[name], param.grad, atol=1e-6), name
    state["rehearsal"]["kept"] = []  # nothing kept yet: no loss, no gradient
    model.zero_grad(set_to_none=True)
    assert rehearsal.backward(model, step=1, index=0) == {"loss/rehearsal": 0.0}
    assert all(p.grad is None for p in model.parameters())


def test_a_prompt_is_embedded_as_its_mean_last_hidden_state(tmp_path):
    save_tiny_model(tmp_path / "m", TinyModelSpec(hidden_size=32, intermediate_size=64,
                                                 num_layers=2, num_heads=2, num_kv_heads=1))
    model = load_causal_lm(tmp_path / "m").train()
    rehearsal = Rehearsal(load_config(None, ["rehearsal.coef=1"]), 0, Dist.single(),
                          torch.device("cpu"), lambda: {})
    prompts = [[5, 6, 7, 8], [9, 10]]
    got = rehearsal.embed(model, prompts)
    assert model.training  # the mode is given back
    model.eval()
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # each prompt alone, no padding
            hidden = model(input_ids=torch.tensor([prompt]),
                           output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(got[row], hidden.mean(0).double(), atol=1e-5, rtol=1e-5)


REHEARSE = ("rehearsal.coef=0.5", "rehearsal.size=6", "rehearsal.clusters=2",
            "rehearsal.pool_steps=2", "rehearsal.refresh_every=2", "rehearsal.batch_size=4")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_job_rehearses_each_clusters_best_and_resumes_exactly(tiny_job, reward_spec,
                                                               tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = (*REHEARSE, "train.save_every=2", "train.keep_last=0")
    proc = run_cli("train", *job(tiny_job, reward_spec, straight, *common, "train.steps=5"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in _metrics(straight) if "loss/policy" in r]
    assert [r.get("loss/rehearsal", 0.0) > 0 for r in rows] == [False, True, True, True, True]
    assert [r["step"] for r in rows if "rehearsal/kept" in r] == [2, 4]
    assert all(r["rehearsal/kept"] == 6 for r in rows if "rehearsal/kept" in r)
    state = read_trainer_state(straight / "checkpoints" / "step_000004")["rehearsal"]
    assert state["selected_at"] == 4 and len(state["kept"]) == 6
    assert {entry[0] for entry in state["pool"]} == {3, 4}  # the last pool_steps steps
    best = {}
    for _, prompt, response, reward in state["pool"]:
        key = (tuple(prompt), tuple(response))
        best[key] = max(reward, best.get(key, reward))
    kept = [best[(tuple(p), tuple(r))] for p, r in state["kept"]]
    assert sum(kept) / len(kept) > sum(best.values()) / len(best)  # better than the pool
    # stopped after step 2's checkpoint, resumed: the same pool, selection and weights
    proc = run_cli("train", *job(tiny_job, reward_spec, resumed, *common, "train.steps=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, resumed, *common, "train.steps=5"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for step in ("step_000004", "step_000005"):
        assert read_trainer_state(resumed / "checkpoints" / step)["rehearsal"] == \
            read_trainer_state(straight / "checkpoints" / step)["rehearsal"]
    assert_same_weights(straight, resumed, atol=0)


def test_two_ranks_give_the_one_rank_update_with_rehearsal(tiny_job, reward_spec, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli("train", *job(tiny_job, reward_spec, one, *REHEARSE, "train.steps=4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *job(tiny_job, reward_spec, two, *REHEARSE, "train.steps=4",
                                 "runtime.num_ranks=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, two)
    a, b = ([r["loss/rehearsal"] for r in _metrics(d) if "loss/rehearsal" in r]
            for d in (one, two))
    assert len(a) == 4 and a[2] > 0 and b == pytest.approx(a, rel=1e-5)


def test_sharded_or_streamed_jobs_refuse_rehearsal():
    with pytest.raises(ConfigError, match="rehearsal.coef runs its forward outside"):
        load_config(None, ["rehearsal.coef=1", "runtime.data_parallel=fsdp",
                           "runtime.num_ranks=2"])
    with pytest.raises(ConfigError, match="runtime.stream_groups"):
        load_config(None, ["rehearsal.coef=1", "runtime.stream_groups=true",
                           "runtime.placement=disaggregated", "runtime.num_ranks=2"])
