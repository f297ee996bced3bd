"""A saved reward model as a reward function: its scores equal transformers' own forward on
the sequence built by hand; a job trained against it gives the same update whether groups
are scored as they stream out of the engine (one rank) or the whole batch at once (the
single controller's driver, two ranks); what is not a reward model is refused clearly."""

import json

import pytest
import torch
from test_runtime import assert_same_weights, run_cli
from transformers import AutoModelForSequenceClassification

from plait.config import ConfigError, load_config
from plait.models.reward_model import load_reward_model
from plait.models.tiny import TinyModelSpec, build_char_tokenizer, save_tiny_model
from plait.rewards.loading import RewardLoadError
from plait.rewards.model import ModelReward
from plait.train.forward import packed_response_scores

SPEC = TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A reward model saved as plait rm saves one: a tiny decoder with a seeded head."""
    root = tmp_path_factory.mktemp("rm")
    save_tiny_model(root / "causal", SPEC, seed=5)
    tokenizer = build_char_tokenizer()
    model = load_reward_model(root / "causal", pad_token_id=tokenizer.pad_token_id, seed=11)
    with torch.no_grad():  # a head with a clear spread of scores
        model.score.weight.mul_(40.0)
    model.save_pretrained(root / "rm", safe_serialization=True)
    tokenizer.save_pretrained(root / "rm")
    return root / "rm"


PAIRS = [("12+34=", "46"), ("5+5=", "10"), ("99+1=", "100"), ("7+8=", ""), ("3+4=", "7777777"),
         ("5+5=", "1"), ("12+34=", "4")]  # two prompts twice


@pytest.mark.parametrize("packed", [None, packed_response_scores])
def test_scores_equal_transformers_forward_on_each_sequence(rm_dir, packed):
    """Padded rows, or each prompt once with its completions packed after it."""
    tokenizer = build_char_tokenizer()
    assert tokenizer.chat_template is None  # the prompt is its own tokens
    reference = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    # 3 micro-batches, regrouped by length (padded), or one packed call
    scorer = ModelReward(rm_dir, batch_size=2, packed=packed)
    scores = scorer([p for p, _ in PAIRS], [c for _, c in PAIRS])
    for (prompt, completion), score in zip(PAIRS, scores, strict=True):
        ids = tokenizer(prompt)["input_ids"] + \
            tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert max(scores) - min(scores) > 0.1  # the scores say something
    one_by_one = [scorer([p], [c])[0] for p, c in PAIRS]
    assert one_by_one == pytest.approx(scores, abs=1e-5)


def test_what_is_not_a_reward_model_is_refused(rm_dir, tmp_path):
    with pytest.raises(RewardLoadError, match="not a model directory"):
        ModelReward(tmp_path / "nowhere", key="reward.functions[0].model")
    causal = rm_dir.parent / "causal"
    with pytest.raises(RewardLoadError, match=r"Qwen2ForCausalLM, not a reward model.*plait rm"):
        ModelReward(causal, key="reward.functions[0].model")


def test_fn_and_model_in_one_entry_are_refused(rm_dir):
    with pytest.raises(ConfigError, match=r"reward.functions\[1\] gives more than one of fn, model and judge"):
        load_config(None, [f"reward.functions=[{{fn: task}}, {{fn: task, model: '{rm_dir}'}}]"])
    config = load_config(None, [f"reward.functions=[{{model: '{rm_dir}', weight: 2}}]"])
    assert config.reward.functions[0].spec == f"model:{rm_dir}"


def _job(tiny_job, run_dir, rm_dir, *extra):
    base = [a for a in tiny_job if not a.startswith(("run.dir=", "train.threads="))]
    return [*base, f"run.dir={run_dir}", "train.threads=1", "train.steps=3", "optim.lr=1e-2",
            f"reward.functions=[{{model: '{rm_dir}', batch_size: 3}}]", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_streamed_groups_score_as_the_whole_batch(tiny_job, rm_dir, tmp_path):
    """One rank scores each group as it finishes generating; under the single controller
    the driver scores every rank's rows in one call. Same rewards (normalised by the
    running statistics of earlier steps, clipped), same update."""
    one, two = tmp_path / "one", tmp_path / "two"
    shaping = ("reward.normalize=true", "reward.clip=2.0")
    proc = run_cli("train", *_job(tiny_job, one, rm_dir, *shaping))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *_job(tiny_job, two, rm_dir, *shaping, "runtime.num_ranks=2",
                                  "runtime.controller=single"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(one, two)
    steps = [(a, b) for a, b in zip(_metrics(one), _metrics(two), strict=True)
             if "reward/mean" in a]
    assert len(steps) == 3
    for a, b in steps:
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-5)
        assert b["reward_raw/mean"] == pytest.approx(a["reward_raw/mean"], abs=1e-5)
        assert a["reward_raw/std"] > 0.01  # continuous scores, not a constant
    # from step 2 on, rewards are standardised by earlier steps' statistics, then clipped
    # (step 1's raw scores, all above 2, are only clipped)
    assert steps[0][0]["reward/mean"] == 2.0 < steps[0][0]["reward_raw/mean"]
    assert max(abs(a["reward/mean"]) for a, _ in steps) <= 2.0
    assert all(a["reward/std"] > 0.01 for a, _ in steps[1:])


def test_each_reward_function_is_logged_and_a_zero_weight_one_only_logged(tiny_job, rm_dir,
                                                                          tmp_path, reward_spec):
    """The task's verifier at weight 0 beside the reward model: logged per step (a hidden
    true score to watch), not added to the reward trained on."""
    run = tmp_path / "run"
    proc = run_cli("train", *_job(tiny_job, run, rm_dir, "train.steps=2",
                                  f"reward.functions=[{{model: '{rm_dir}'}}, "
                                  f"{{fn: '{reward_spec('digit_fraction')}', weight: 0}}]"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [m for m in _metrics(run) if "reward/mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["reward_fn/reward_model"] == pytest.approx(m["reward/mean"], abs=1e-5)
        assert 0.0 <= m["reward_fn/digit_fraction"] <= 1.0
    assert any(m["reward_fn/digit_fraction"] > 0 for m in steps)
    # the summary holds each function's held-out score before and after
    summary = json.loads((run / "summary.json").read_text())
    evals = [m for m in _metrics(run) if "eval/reward_fn/digit_fraction" in m]
    for name in ("reward_model", "digit_fraction"):
        assert summary[f"reward_fn/{name}_before"] == evals[0][f"eval/reward_fn/{name}"]
        assert summary[f"reward_fn/{name}_after"] == evals[-1][f"eval/reward_fn/{name}"]
