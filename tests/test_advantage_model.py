"""plait rm with rm.objective=advantage: whole prompts a step, several pairs of a
policy's samples per prompt, scores centred per prompt (and so per sub-task), exact
resume of the prompt-grouped order."""

import json
import statistics

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from plait.config import ConfigError, load_config
from plait.data.tasks import make_task
from plait.recipes.pairs import PolicySampler, PromptGroups, prompt_key
from plait.recipes.reward_model import train_reward_model

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
        "train.threads=2", "run.tensorboard=false", "run.progress=false"]


def _rows(prompts: int) -> list[dict]:
    """Prompt i has i % 3 + 1 pairs."""
    return [{"prompt": f"p{i}", "chosen": f"c{i}{j}", "rejected": f"r{i}{j}"}
            for i in range(prompts) for j in range(i % 3 + 1)]


def test_prompt_groups_take_whole_prompts_and_resume():
    rows = _rows(20)
    per_prompt = {}
    for row in rows:
        per_prompt[prompt_key(row)] = per_prompt.get(prompt_key(row), 0) + 1
    groups = PromptGroups(rows, seed=3)
    seen = []
    for _ in range(4):
        batch = groups.next_batch(5)
        keys = [prompt_key(r) for r in batch]
        assert len(batch) >= 5 and len(batch) - per_prompt[keys[-1]] < 5  # stops once full
        for key in set(keys):  # every pair of each prompt in the batch, adjacent
            assert keys.count(key) == per_prompt[key]
            first = keys.index(key)
            assert keys[first:first + per_prompt[key]] == [key] * per_prompt[key]
        seen += list(dict.fromkeys(keys))
    assert len(seen) == len(set(seen))  # no prompt twice within the epoch
    state = groups.state_dict()
    again = PromptGroups(rows, seed=3)
    again.load_state_dict(state)
    assert again.next_batch(7) == groups.next_batch(7)


def test_several_pairs_of_a_policys_samples_per_prompt(tmp_path):
    config = load_config(None, [*TINY, "data.task=reverse", f"run.dir={tmp_path}",
                                "pairs.source=policy", "pairs.samples_per_prompt=5",
                                "pairs.pairs_per_prompt=3", "rollout.max_new_tokens=8"])
    pairs = PolicySampler(config)(make_task("reverse"), 60, "train")
    assert len(pairs) == 60
    keys = [p["prompt"] for p in pairs]
    assert max(keys.count(k) for k in keys) > 1 and max(keys.count(k) for k in keys) <= 3
    for key in set(keys):  # adjacent, and no pair of two responses twice
        first = keys.index(key)
        mine = pairs[first:first + keys.count(key)]
        assert all(p["prompt"] == key for p in mine)
        assert len({frozenset((p["chosen"], p["rejected"])) for p in mine}) == len(mine)
    try:
        load_config(None, ["pairs.pairs_per_prompt=2"])
    except ConfigError as err:
        assert "pairs.source=policy" in str(err)
    else:
        raise AssertionError("pairs_per_prompt > 1 with edit pairs was accepted")


def _source_means(run_dir) -> dict[str, float]:
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if "eval/score_mean/add" in r][-1]
    return {s: final[f"eval/score_mean/{s}"] for s in ("reverse", "sort", "add")} | \
        {"std": final["eval/score_std"]}


def test_the_advantage_model_centres_every_sub_tasks_scores(tmp_path):
    """On the mixed task (three sub-tasks, label noise 0 / 0.1 / 0.25), the advantage
    model's held-out scores of each sub-task average near 0; the reward model's sit
    wherever Bradley-Terry, blind to offsets, left them."""
    job = [*TINY, "data.task=mixed", "pairs.num_pairs=2048", "pairs.num_eval_pairs=192",
           "rm.steps=300", "rm.batch_size=32", "rm.lr=3e-3", "rm.eval_every=0",
           "train.save_every=0"]
    reward = train_reward_model(load_config(None, [*job, f"run.dir={tmp_path / 'rm'}"]))
    advantage = train_reward_model(load_config(None, [*job, f"run.dir={tmp_path / 'am'}",
                                                      "rm.objective=advantage"]))
    assert (reward["objective"], advantage["objective"]) == ("reward", "advantage")
    assert (advantage["center_coef"], advantage["score_bound"]) == (1.0, 5.0)
    rm, am = _source_means(tmp_path / "rm"), _source_means(tmp_path / "am")
    sources = ("reverse", "sort", "add")
    # every sub-task's held-out mean near 0 for the advantage model, and the sub-tasks'
    # means closer together in units of its scores' spread than the reward model's (whose
    # offset per sub-task is free)
    assert max(abs(am[s]) for s in sources) < 0.15, am

    def spread(means):
        return (max(means[s] for s in sources) - min(means[s] for s in sources)) / means["std"]

    assert spread(am) < 0.5 * spread(rm), (am, rm)
    assert advantage["accuracy_vs_truth_after"] > advantage["accuracy_vs_truth_before"]
    # pairwise accuracy per sub-task: the held-out pairs' shares add up to the whole
    held_out = make_task("mixed").make_pairs(192, seed=0, split="test")
    counts = {s: sum(p["source"] == s for p in held_out) for s in sources}
    final = [json.loads(line) for line in
             (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if "eval/accuracy/add" in r][-1]
    for key in ("eval/accuracy", "eval/accuracy_vs_truth"):
        parts = sum(counts[s] * final[f"{key}/{s}"] for s in sources) / len(held_out)
        assert parts == pytest.approx(final[key], abs=1e-6), key


def test_a_resumed_advantage_model_continues_the_prompt_order(tmp_path):
    job = [*TINY, "data.task=reverse", "pairs.source=policy", "pairs.samples_per_prompt=4",
           "pairs.pairs_per_prompt=2", "pairs.num_pairs=96", "pairs.num_eval_pairs=16",
           "rollout.max_new_tokens=8", "rm.objective=advantage", "rm.batch_size=8",
           "rm.lr=3e-3", "rm.eval_every=0", "train.save_every=3", "train.keep_last=0"]
    train_reward_model(load_config(None, [*job, "rm.steps=6", f"run.dir={tmp_path / 'a'}"]))
    train_reward_model(load_config(None, [*job, "rm.steps=3", f"run.dir={tmp_path / 'b'}"]))
    train_reward_model(load_config(None, [*job, "rm.steps=6", f"run.dir={tmp_path / 'b'}"]))
    one = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "reward_model")
    two = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "reward_model")
    for (name, x), (_, y) in zip(one.state_dict().items(), two.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name
    losses = [[json.loads(line)["loss/pairwise"] for line in
               (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "loss/pairwise" in line] for d in ("a", "b")]
    assert losses[0] == losses[1] and statistics.pstdev(losses[0]) > 0


def test_a_mixed_task_run_reports_each_sub_task(tmp_path):
    """plait train on held-out rows of several sources: each source's accuracy and each
    reward function's mean, which average (by the sources' row counts) to the whole."""
    from plait.recipes.rl import train

    config = load_config(None, [*TINY, "data.task=mixed", "data.num_eval=30", "train.steps=1",
                                "algo.prompts_per_step=2", "algo.group_size=2",
                                "rollout.max_new_tokens=6", f"run.dir={tmp_path}",
                                "reward.functions=[{fn: task}, {fn: exact_match, weight: 0}]"])
    train(config)
    before = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
              .splitlines()][0]
    rows = make_task("mixed").make_rows(30, seed=0, split="test")
    counts = {s: sum(r["source"] == s for r in rows) for s in ("reverse", "sort", "add")}
    assert all(counts.values())
    for key in ("eval/reward", "eval/reward_fn/task", "eval/reward_fn/exact_match"):
        parts = sum(before[f"{key}/{s}"] * n for s, n in counts.items()) / 30
        assert parts == pytest.approx(before[key], abs=1e-9), key
    assert {f"eval/accuracy/{s}" for s in counts} <= set(before)
