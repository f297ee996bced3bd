"""An LLM judge as a reward: scores read from its answers, answers equal to transformers'
greedy generation, bad settings named, and a judge fine-tuned with plait sft ranks the
built-in task's responses as the hidden truth does."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from plait.cli import main
from plait.config import ConfigError, load_config
from plait.data.tasks import make_task
from plait.models.tiny import TinyModelSpec, save_tiny_model
from plait.rewards.judge import compile_parse, parse_score
from plait.rewards.loading import RewardLoadError
from plait.runtime.inputs import build_judge, build_rewards

SMALL = TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1)
TEMPLATE = "{prompt}{completion}"  # the judge answers right after the completion


@pytest.mark.parametrize(("text", "parse", "score"), [
    ("7", "number", 7.0), (" 8.5 out of 10", "number", 8.5), ("-2", "number", -2.0),
    ("no idea", "number", math.nan), ("Score: 9 (I think 3)", r"Score: (\d+)", 9.0),
    ("score 9", r"Score: (\d+)", math.nan),
])
def test_the_score_is_read_from_the_answer(text, parse, score):
    value = parse_score(text, compile_parse(parse))
    assert (math.isnan(value) and math.isnan(score)) or value == score


def _config(tmp_path, *functions):
    return load_config(None, ["data.task=reverse", f"run.dir={tmp_path / 'run'}",
                              f"reward.functions={json.dumps(list(functions))}"])


def test_bad_judge_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"more than one of fn, model and judge"):
        _config(tmp_path, {"fn": "task", "judge": "x"})
    with pytest.raises(ConfigError, match="sets template or parse, which only a judge reads"):
        _config(tmp_path, {"fn": "task", "parse": "(\\d)"})
    judge = save_tiny_model(tmp_path / "judge", SMALL)
    cases = [({"template": str(tmp_path / "missing.txt")}, "template file .* not found"),
             ({"parse": "Score: \\d+"}, "needs a group around the score"),
             ({"parse": "(\\d"}, "is not a regular expression")]
    (tmp_path / "blind.txt").write_text("{prompt}")
    cases.append(({"template": str(tmp_path / "blind.txt")}, "has no {completion}"))
    for extra, message in cases:
        config = _config(tmp_path, {"judge": str(judge), **extra})
        with pytest.raises(RewardLoadError, match=message):
            build_judge(config, config.reward.functions[0], 0, "cpu")
    config = _config(tmp_path, {"judge": str(tmp_path / "nowhere")})
    with pytest.raises(RewardLoadError, match="not a model directory"):
        build_judge(config, config.reward.functions[0], 0, "cpu")


def test_the_judge_answers_as_transformers_greedy_generate_does(tmp_path):
    judge_dir = save_tiny_model(tmp_path / "judge", SMALL, seed=3)
    (tmp_path / "t.txt").write_text(TEMPLATE)
    config = _config(tmp_path, {"judge": str(judge_dir), "template": str(tmp_path / "t.txt"),
                                "max_new_tokens": 5, "batch_size": 3})
    judge = build_judge(config, config.reward.functions[0], 0, "cpu")
    prompts = ["abc=", "hello=", "xy=", "plait=", "q="]
    completions = ["cba", "olleh", "", "tialp", "qq"]
    scores = judge(prompts, completions)
    model = AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(judge_dir)  # its tokenizer.json as is
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([tokenizer(judge.prompt(p, c))["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert judge.answers == expected
    for answer, score in zip(judge.answers, scores, strict=True):
        want = parse_score(answer, compile_parse("number"))
        assert (math.isnan(score) and math.isnan(want)) or score == want


def _judging_rows(task, n, seed, split):
    """The task's responses (the answer, edits of it) written into the template, each
    answered with the digit of its true score (0-9)."""
    rng = random.Random(seed)
    rows = []
    for pair in task.make_pairs(n, seed=seed, split=split):
        for text, score in ((pair["chosen"], pair["chosen_score"]),
                            (pair["rejected"], pair["rejected_score"])):
            rows.append({"prompt": TEMPLATE.format(prompt=pair["prompt"], completion=text),
                         "answer": str(max(0, min(9, round(9 * score)))), "truth": score})
    rng.shuffle(rows)
    return rows


@pytest.mark.slow
def test_a_judge_fine_tuned_with_plait_sft_ranks_as_the_truth_does(tmp_path):
    task = make_task("reverse")
    data = tmp_path / "judging.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                            for r in _judging_rows(task, 3000, 0, "train")))
    tiny = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
            "model.tiny.num_layers=2", "train.threads=2", "run.progress=false",
            "run.tensorboard=false"]
    assert main(["sft", *tiny, "data.task=null", f"data.train_path={data}",
                 "data.num_eval=64", "sft.steps=1500", "sft.lr=3e-3", "sft.batch_size=32",
                 "model.chat_template=never", f"run.dir={tmp_path / 'judge'}"]) == 0
    (tmp_path / "t.txt").write_text(TEMPLATE)
    config = load_config(None, [
        "data.task=reverse", "model.chat_template=never", f"run.dir={tmp_path / 'run'}",
        "reward.on_error=fallback",
        f"reward.functions=[{{judge: '{tmp_path / 'judge' / 'sft_model'}', "
        f"template: '{tmp_path / 't.txt'}', max_new_tokens: 2}}]"])
    rewards = build_rewards(config, task)
    pairs = task.make_pairs(200, seed=1, split="test")
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    scores = rewards.score(prompts, completions).total.tolist()
    n = len(pairs)
    decided = [(scores[i], scores[n + i], p) for i, p in enumerate(pairs)
               if scores[i] != scores[n + i]]
    right = sum((c > r) == (p["chosen_score"] > p["rejected_score"]) for c, r, p in decided)
    # a tie is a coin toss: half right (an untrained judge, all ties, is at 0.5)
    accuracy = (right + 0.5 * (n - len(decided))) / n
    assert accuracy > 0.6, (right, len(decided))
    rewards.close()


def test_plait_train_takes_the_judge_as_a_reward(tmp_path, capsys):
    judge = save_tiny_model(tmp_path / "judge", SMALL, seed=5)
    (tmp_path / "t.txt").write_text(TEMPLATE)
    run_dir = tmp_path / "run"
    code = main(["train", "data.task=reverse", "model.tiny.hidden_size=32",
                 "model.tiny.intermediate_size=64", "model.tiny.num_layers=2",
                 "train.steps=2", "algo.prompts_per_step=4", "algo.group_size=2",
                 "rollout.max_new_tokens=6", "run.progress=false", "run.tensorboard=false",
                 "train.threads=2", "reward.on_error=fallback", "data.num_eval=8",
                 f"reward.functions=[{{judge: '{judge}', template: '{tmp_path / 't.txt'}', "
                 "max_new_tokens: 3}, {fn: task, weight: 0}]", f"run.dir={run_dir}"])
    assert code == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_fn/judge" in r for r in steps if r["step"] in (1, 2) and
               "loss/policy" in r)
