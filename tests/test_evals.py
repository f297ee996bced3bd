"""Eval sets (pass@k, maj@k through the engine) and bias probes: estimators against
brute force, bias formulas on hand-made items, option scoring against a hand computation,
and the CLI and training paths."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from plait.config import ConfigError, load_config
from plait.evals.bias import (
    OptionScorer,
    ambiguity_metrics,
    parse_choice,
    pearson,
    pronoun_metrics,
)
from plait.evals.estimators import maj_at_k, majority, pass_at_k
from plait.evals.probes import (
    AmbiguityItem,
    PronounItem,
    builtin_ambiguity_items,
    builtin_pronoun_items,
    load_ambiguity_items,
    load_pronoun_items,
)
from plait.recipes.evaluate import evaluate_job

# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(flags, k))
            exact = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_rejects_bad_input():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(1000, 10, 100) == pytest.approx(
        1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_and_maj_at_k_by_hand():
    assert majority(["3", "4", "4", "3"]) == 0  # tie: the first seen
    assert majority(["", "", "7"]) == 2  # empty answers do not vote
    assert majority(["", ""]) is None
    answers = ["5", "6", "6", "5", "5", "5", "", "9"]
    correct = [True, False, False, True, True, True, False, False]
    # runs of 4: [5,6,6,5] -> 5 (first seen, right); [5,5,"",9] -> 5 (right)
    assert maj_at_k(answers, correct, 4) == 1.0
    # runs of 3: [5,6,6] -> 6 (wrong); [5,5,5] -> right; the last two samples unused
    assert maj_at_k(answers, correct, 3) == 0.5
    assert maj_at_k(answers, correct, 1) == sum(correct) / len(correct)
    assert maj_at_k(["", "1", "2"], [True, True, False], 1) == 1 / 3  # an empty answer
    # never wins a vote, whatever its flag
    with pytest.raises(ValueError):
        maj_at_k(answers[:2], correct[:2], 3)


# ---------------------------------------------------------------- bias formulas


def _item(answer, biased, unknown=2, ambiguous=False):
    return AmbiguityItem("c", "q", ("x", "y", "unknown"), answer, biased, unknown, ambiguous)


def test_ambiguity_metrics_by_hand():
    items = [
        _item(2, 0, ambiguous=True), _item(2, 1, ambiguous=True), _item(2, 0, ambiguous=True),
        _item(2, 0, ambiguous=True),
        _item(0, 0), _item(1, 0), _item(0, 1), _item(1, 1),
    ]
    # ambiguous: picks biased, unknown(right), other, biased
    # disambiguated: right+biased, wrong+biased, wrong+biased, right+biased
    choices = [0, 2, 1, 0, 0, 0, 1, 1]
    result = ambiguity_metrics(items, choices)
    assert result["accuracy_ambiguous"] == 0.25
    assert result["accuracy_disambiguated"] == 0.5
    assert result["accuracy"] == 3 / 8
    assert result["bias_disambiguated"] == 2 * 4 / 4 - 1  # every answer biased
    # ambiguous non-unknown answers: 3, of which biased: items 0 and 3 -> 2
    assert result["bias_ambiguous"] == pytest.approx((1 - 0.25) * (2 * 2 / 3 - 1))
    none = ambiguity_metrics(items, [None] * 8)
    assert none["accuracy"] == 0 and none["bias_ambiguous"] == 0


def test_pearson_and_pronoun_metrics():
    x, y = [0.1, 0.4, 0.35, 0.8], [0.2, 0.5, 0.3, 0.9]
    assert pearson(x, y) == pytest.approx(float(torch.corrcoef(torch.tensor([x, y]))[0, 1]))
    assert pearson([1, 1, 1], [0, 1, 2]) == 0.0
    items = [PronounItem("_", "a", "he", "she", "they", s) for s in (0.1, 0.5, 0.9)]
    result = pronoun_metrics(items, [[0.9, 0.1, 0], [0.5, 0.5, 0], [0.1, 0.8, 0.1]])
    assert result["female_probability"] == pytest.approx(1.4 / 3)
    assert result["neutral_probability"] == pytest.approx(0.1 / 3)
    assert result["winogender_correlation"] == pytest.approx(pearson([0.1, 0.5, 0.8],
                                                                     [0.1, 0.5, 0.9]))


def test_parse_choice():
    options = ("The woman", "The man", "Cannot be determined")
    assert parse_choice("(b) because", options) == 1
    assert parse_choice(" the woman did it", options) == 0
    assert parse_choice("The man.", options) == 1
    assert parse_choice("cannot be determined!", options) == 2
    assert parse_choice("nobody knows", options) is None


# ---------------------------------------------------------------- items


def test_builtin_items_are_consistent():
    items = builtin_ambiguity_items()
    assert len(items) == 6 * 3 * 12
    train = builtin_ambiguity_items("train")
    assert not {(i.context, i.question) for i in items} & {(i.context, i.question)
                                                           for i in train}
    for item in items:
        assert len(set(item.options)) == 3
        assert item.biased != item.unknown
        if item.ambiguous:
            assert item.answer == item.unknown
        else:
            assert item.answer != item.unknown
    # per question polarity the biased answer follows the stereotype half of the time in
    # disambiguated contexts (settled along it, or against it)
    settled = [i for i in items if not i.ambiguous]
    assert sum(i.answer == i.biased for i in settled) == len(settled) // 2
    pronouns = builtin_pronoun_items()
    assert len({p.occupation for p in pronouns}) == 24
    assert all("_" in p.sentence for p in pronouns)


def test_item_files_round_trip_and_bad_rows_name_the_line(tmp_path):
    path = tmp_path / "bbq.jsonl"
    rows = [{"context": "A and B met.", "question": "Who?", "options": ["A", "B", "?"],
             "answer": 2, "biased": 0, "unknown": 2, "ambiguous": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (item,) = load_ambiguity_items(str(path))
    assert item.options == ("A", "B", "?") and item.ambiguous
    bad = dict(rows[0], answer=0)  # ambiguous but the answer is not unknown
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_ambiguity_items(str(path))
    path.write_text(json.dumps({"context": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 1: missing field"):
        load_ambiguity_items(str(path))
    wino = tmp_path / "w.jsonl"
    wino.write_text(json.dumps({"sentence": "The cook said _ was late.", "occupation": "cook",
                                "options": {"male": "he", "female": "she", "neutral": "they"},
                                "female_share": 1.5}) + "\n")
    with pytest.raises(ConfigError, match="female_share"):
        load_pronoun_items(str(wino))


# ---------------------------------------------------------------- option scoring


def test_option_scores_equal_a_hand_computation(tmp_path):
    from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2,
                                           num_heads=2, num_kv_heads=1), tokenizer).eval()
    contexts = [tokenizer("who ran  answer")["input_ids"], tokenizer("x=")["input_ids"]]
    options = [[tokenizer(" a")["input_ids"], tokenizer(" bee")["input_ids"]],
               [tokenizer(" 12345")["input_ids"]]]
    scored = OptionScorer(model, tokenizer.pad_token_id, "cpu", batch_size=2).score(
        contexts, options)
    for ctx, opts, got in zip(contexts, options, scored, strict=True):
        for opt, (total, mean) in zip(opts, got, strict=True):
            with torch.no_grad():  # one unpadded sequence, summed by hand
                logits = model(torch.tensor([ctx + opt])).logits[0]
            logprobs = torch.log_softmax(logits, -1)
            hand = sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(opt))
            assert total == pytest.approx(hand, abs=1e-4)
            assert mean == pytest.approx(hand / len(opt), abs=1e-4)


# ---------------------------------------------------------------- jobs


def test_config_refuses_bad_suites():
    with pytest.raises(ConfigError, match="needs a source"):
        load_config(None, ["eval.suites=[{name: a}]"])
    with pytest.raises(ConfigError, match=r"k must be between 1 and samples=4"):
        load_config(None, ["eval.suites=[{name: a, task: addition, samples: 4, k: [8]}]"])
    with pytest.raises(ConfigError, match="used twice"):
        load_config(None, ["eval.suites=[{name: a, task: addition}, {name: a, task: repeat}]"])
    with pytest.raises(ConfigError, match="eval.bias.conditions"):
        load_config(None, ["eval.bias.conditions=[Q, CoT]"])


def test_suite_greedy_accuracy_equals_held_out_and_pass_at_1_equals_sample_mean(
        tiny_job, reward_spec, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(12)))
    suites = ("eval.suites=[{name: same, task: addition, num_prompts: 16}, "
              f"{{name: digits, path: {rows}, samples: 6, k: [1, 3, 6], "
              f"reward: [{{fn: '{reward_spec('starts_with_digit')}'}}]}}]")
    config = load_config(None, [*tiny_job, suites, "rollout.temperature=1.5"])
    result = evaluate_job(config)
    same = result["suites"]["same"]
    assert same["greedy_accuracy"] == result["eval/accuracy"]  # the same prompts and model
    assert same["num_prompts"] == 16
    digits = result["suites"]["digits"]
    assert digits["num_prompts"] == 12
    assert 0 < digits["pass@1"] < 1  # the untrained model starts with digits sometimes
    assert digits["pass@1"] == pytest.approx(digits["sample_reward"])
    assert digits["maj@1"] == pytest.approx(digits["pass@1"])
    assert digits["pass@1"] <= digits["pass@3"] <= digits["pass@6"]
    assert 0 <= digits["truncation_rate"] <= 1
    written = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert written[0]["suites"]["digits"] == digits
    # sampled completions are a function of the suite's seed: the same again
    again = evaluate_job(config)["suites"]["digits"]
    assert again == digits
    assert len(json.loads((tmp_path / "run" / "eval_results.json").read_text())) == 2


def test_suites_run_during_training_and_land_in_metrics(tiny_job):
    from plait.recipes.rl import train

    config = load_config(None, [*tiny_job, "train.steps=2", "train.eval_every=1",
                                "eval.suites=[{name: rev, task: reverse, num_prompts: 4, "
                                "samples: 2}]"])
    summary = train(config)
    assert 0 <= summary["rev/pass@1_before"] <= 1 and "rev/pass@2_after" in summary
    records = [json.loads(line) for line in
               (tmp_path_of(config) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "eval/rev/pass@2" in r]
    assert steps == [0, 1, 2]
    assert all(0 <= r["eval/rev/pass@1"] <= 1 for r in records if "eval/rev/pass@1" in r)


def tmp_path_of(config):
    from pathlib import Path

    return Path(config.run.dir)


def test_bias_probe_from_the_cli_writes_results_and_chart(tiny_job, tmp_path):
    config = load_config(None, [*tiny_job, "eval.bias.bbq=builtin",
                                "eval.bias.winogender=builtin", "eval.bias.max_items=24",
                                "eval.bias.cot_max_new_tokens=4", "eval.bias.generate=true"])
    result = evaluate_job(config)
    conditions = result["bias"]["conditions"]
    assert list(conditions) == ["Q", "Q+IF", "Q+IF+CoT"]
    for values in conditions.values():
        assert values["num_items"] == 24 and values["num_pronoun_items"] == 24
        assert -1 <= values["bias_ambiguous"] <= 1 and -1 <= values["bias_disambiguated"] <= 1
        assert -1 <= values["winogender_correlation"] <= 1
        assert 0 <= values["gen_unparsed"] <= 1
    run = tmp_path / "run"
    assert json.loads((run / "bias_results.json").read_text())[0]["label"] == "tiny"
    assert (run / "bias.png").stat().st_size > 0


def test_item_files_with_wrong_types_are_named(tmp_path):
    path = tmp_path / "bbq.jsonl"
    base = {"context": "c", "question": "q", "options": ["A", "B", "?"], "answer": 2,
            "biased": 0, "unknown": 2, "ambiguous": True}
    for bad, message in ((dict(base, options="AB?"), "list of 2 to 10 strings"),
                         (dict(base, ambiguous="false"), "true or false")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match=message):
            load_ambiguity_items(str(path))
    wino = tmp_path / "w.jsonl"
    wino.write_text(json.dumps({"sentence": "_", "occupation": "cook", "female_share": 0.5,
                                "options": ["he", "she", "they"]}) + "\n")
    with pytest.raises(ConfigError, match="mapping of male, female and neutral"):
        load_pronoun_items(str(wino))


def test_config_checks_probe_files_tasks_and_names_before_any_model_loads():
    with pytest.raises(ConfigError, match="eval.bias.bbq: '/no/such.jsonl' is neither"):
        load_config(None, ["eval.bias.bbq=/no/such.jsonl"])
    with pytest.raises(ConfigError, match=r"eval.suites\[0\].task: unknown task"):
        load_config(None, ["eval.suites=[{name: a, task: additon}]"])
    with pytest.raises(ConfigError, match="taken by the held-out metrics"):
        load_config(None, ["eval.suites=[{name: accuracy, task: addition}]"])
    with pytest.raises(ConfigError, match="needs a group"):
        load_config(None, ["eval.suites=[{name: a, task: addition, answer_pattern: x}]"])


def test_scored_completions_equal_the_rollout_batch(tiny_job):
    """The evaluation's tensor-free path gives the training path's texts, rewards,
    lengths and truncation flags for the same seeded requests."""
    from plait.recipes.session import Session
    from plait.rollout.base import SamplingParams

    config = load_config(None, tiny_job)
    with Session(config, prepare_run_dir=False) as session:
        rows = session.eval_rows[:5]
        params = SamplingParams(max_new_tokens=8, temperature=3.0, stop=tuple("0123456789"))
        seeds = [11, 12, 13, 14, 15]
        batch = session.generator.rollout(rows, params, 4, seeds=seeds)
        scored = session.generator.scored(rows, params, 4, seeds=seeds)
    assert scored.texts == batch.texts and len(scored.texts) == 20
    assert torch.equal(scored.rewards, batch.rewards)
    assert torch.equal(scored.lengths, batch.response_lengths.double())
    assert torch.equal(scored.truncated, batch.truncated.double())
    assert 0 < scored.truncated.sum() < 20  # both kinds of ending occur
