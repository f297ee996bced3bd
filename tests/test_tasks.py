"""Built-in synthetic tasks: determinism, split disjointness, answers and verifiers."""

import statistics

import pytest

from plait.data.datasets import DataError
from plait.data.tasks import CHAR_VOCAB, TASKS, AdditionTask, RepeatTask, ReverseTask, make_task


@pytest.mark.parametrize("task", [AdditionTask(digits=2), RepeatTask(), ReverseTask()],
                         ids=["addition", "repeat", "reverse"])
def test_rows_are_a_pure_function_of_seed_and_split(task):
    assert task.make_rows(50, seed=3, split="train") == task.make_rows(50, seed=3, split="train")
    assert task.make_rows(50, seed=3) != task.make_rows(50, seed=4)
    assert task.make_rows(50, seed=3, split="train") != task.make_rows(50, seed=3, split="test")


@pytest.mark.parametrize(
    "task", [AdditionTask(digits=2), RepeatTask(max_count=20), ReverseTask(max_len=4)],
    ids=["addition", "repeat", "reverse"]
)
def test_train_and_test_splits_never_share_a_prompt(task):
    train = {row["prompt"] for row in task.make_rows(3000, seed=0, split="train")}
    test = {row["prompt"] for row in task.make_rows(1000, seed=0, split="test")}
    assert train and test
    assert not train & test
    # The split belongs to the problem, not to the seed that drew it.
    other_seed_test = {row["prompt"] for row in task.make_rows(1000, seed=9, split="test")}
    assert not train & other_seed_test


def test_addition_rows_hold_correct_sums_within_the_declared_sizes():
    task = AdditionTask(digits=3)
    rows = task.make_rows(500, seed=1)
    for row in rows:
        left, right = row["prompt"].rstrip("=").split("+")
        assert row["answer"] == str(int(left) + int(right))
        assert len(row["answer"]) <= task.max_answer_chars
        assert len(row["prompt"]) <= task.max_prompt_chars
    operand_lengths = {len(row["prompt"].split("+")[0]) for row in rows}
    assert operand_lengths == {1, 2, 3}


def test_repeat_answer_lengths_are_long_tailed():
    task = RepeatTask(min_count=1, max_count=64)
    rows = task.make_rows(2000, seed=0)
    lengths = [len(row["answer"]) for row in rows]
    assert statistics.median(lengths) <= 12  # most answers are short...
    assert max(lengths) >= 50  # ...and a few are long
    assert max(lengths) <= task.max_answer_chars
    for row in rows[:50]:
        letter, count = row["prompt"].rstrip("=").split("*")
        assert row["answer"] == letter * int(count)
        assert len(row["prompt"]) <= task.max_prompt_chars


def test_char_vocab_covers_every_built_in_prompt_and_answer():
    produced = set()
    for task in (AdditionTask(digits=4), RepeatTask()):
        for split in ("train", "test"):
            for row in task.make_rows(300, seed=0, split=split):
                produced.update(row["prompt"] + row["answer"])
    assert produced <= set(CHAR_VOCAB)
    assert len(set(CHAR_VOCAB)) == len(CHAR_VOCAB) <= 48
    assert set(AdditionTask.stop_strings[0]) <= set(CHAR_VOCAB)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("122", 1.0),
        ("122  ", 1.0),
        (" 122\n", 1.0),
        ("122\n5+5=10", 1.0),  # text after the end marker is ignored
        ("123", 0.0),
        ("1222", 0.0),
        ("", 0.0),
        ("\n122", 0.0),  # nothing before the end marker
    ],
)
def test_verify_reads_the_answer_up_to_the_end_marker(completion, expected):
    assert AdditionTask().verify(completion, "122") == expected


def test_repeat_verify():
    task = RepeatTask()
    assert task.verify("aaaa\n", "aaaa") == 1.0
    assert task.verify("aaa", "aaaa") == 0.0


def test_make_task_builds_registered_tasks_with_settings():
    assert set(TASKS) == {"addition", "repeat", "reverse", "mixed"}
    assert make_task("addition", digits=3) == AdditionTask(digits=3)
    assert make_task("repeat", max_count=8).max_answer_chars == 8


def test_make_task_unknown_name_lists_tasks_and_suggests_nearest():
    with pytest.raises(
        DataError, match=r"unknown task 'adition'.*'addition'.*'repeat'.*Did you mean 'addition'"
    ):
        make_task("adition")


def test_make_task_unknown_setting_lists_accepted_settings():
    with pytest.raises(DataError, match=r"no setting\(s\) \['digit'\].*'digits'"):
        make_task("addition", digit=3)


@pytest.mark.parametrize(
    "build",
    [
        lambda: AdditionTask(digits=0),
        lambda: RepeatTask(min_count=5, max_count=2),
        lambda: RepeatTask(min_count=0),
        lambda: AdditionTask(test_fraction=1.0),
    ],
)
def test_invalid_settings_are_rejected(build):
    with pytest.raises(DataError):
        build()


def test_unknown_split_is_rejected():
    with pytest.raises(DataError, match="unknown split 'eval'"):
        AdditionTask().make_rows(1, split="eval")


def test_reverse_rows_and_partial_credit_by_hand():
    task = ReverseTask()
    for row in task.make_rows(200, seed=2):
        word = row["prompt"].rstrip("=")
        assert row["answer"] == word[::-1] and 3 <= len(word) <= 8
        assert set(word) <= set(CHAR_VOCAB)
    assert task.verify("dcba\nzz", "dcba") == 1.0
    assert task.verify("dcb", "dcba") == 3 / 4    # a letter missing
    assert task.verify("dcbaa", "dcba") == 4 / 5  # a letter extra
    assert task.verify("xcba", "dcba") == 3 / 4
    assert task.verify("cba", "dcba") == 0.0      # shifted: no position right
    assert task.verify("", "dcba") == 0.0
    assert task.edit("dcba", __import__("random").Random(0), 0) == "dcba"


def test_reverse_pairs_rank_by_the_true_score_with_the_set_label_noise():
    task = ReverseTask()
    clean = task.make_pairs(300, seed=1)
    assert clean == task.make_pairs(300, seed=1)
    for pair in clean:
        assert pair["chosen_score"] > pair["rejected_score"] and not pair["flipped"]
        assert task.verify(pair["chosen"], pair["answer"]) == pair["chosen_score"]
        assert task.verify(pair["rejected"], pair["answer"]) == pair["rejected_score"]
    assert len({p["chosen"] == p["answer"] for p in clean}) == 2  # exact and edited answers
    noisy = task.make_pairs(3000, seed=1, noise=0.2)
    flipped = [p for p in noisy if p["flipped"]]
    assert abs(len(flipped) / len(noisy) - 0.2) < 0.025
    assert all(p["chosen_score"] < p["rejected_score"] for p in flipped)
    test_prompts = {p["prompt"] for p in task.make_pairs(300, seed=1, split="test")}
    assert not test_prompts & {p["prompt"] for p in noisy}
    with pytest.raises(DataError, match="noise must be in"):
        task.make_pairs(1, noise=0.5)


def test_mixed_task_sources_answers_and_noise_per_source():
    task = make_task("mixed", noise={"reverse": 0.3})
    assert task.noise == {"reverse": 0.3, "sort": 0.1, "add": 0.25}
    rows = task.make_rows(600, seed=2)
    assert {r["source"] for r in rows} == {"reverse", "sort", "add"}
    for row in rows:
        prompt, answer = row["prompt"], row["answer"]
        if row["source"] == "add":
            left, right = prompt[:-1].split("+")
            assert answer == str(int(left) + int(right))
        elif row["source"] == "sort":
            assert prompt.endswith("<") and answer == "".join(sorted(prompt[:-1]))
        else:
            assert prompt.endswith("=") and answer == prompt[-2::-1]
    pairs = task.make_pairs(6000, seed=2)
    for source, share in task.noise.items():
        mine = [p for p in pairs if p["source"] == source]
        assert abs(sum(p["flipped"] for p in mine) / len(mine) - share) < 0.04
        assert all(p["chosen_score"] < p["rejected_score"] for p in mine if p["flipped"])
    digits = [p for p in pairs if p["source"] == "add"]
    assert all(p["chosen"].isdigit() or p["chosen"] == "" for p in digits)
    assert all(p["rejected"].isdigit() or p["rejected"] == "" for p in digits)
    with pytest.raises(DataError, match="noise must map some of"):
        make_task("mixed", noise={"other": 0.1})


def test_mixed_task_draws_the_sub_tasks_asked_for():
    task = make_task("mixed", sources=["reverse", "copy"], noise={"copy": 0.2})
    assert task.sources == ("reverse", "copy")
    assert task.noise == {"reverse": 0.0, "copy": 0.2}
    rows = task.make_rows(400, seed=1)
    assert {r["source"] for r in rows} == {"reverse", "copy"}
    for row in rows:
        word = row["prompt"][:-1]
        if row["source"] == "copy":
            assert row["prompt"].endswith("*") and row["answer"] == word
        else:
            assert row["prompt"].endswith("=") and row["answer"] == word[::-1]
        assert task.source_of(row["prompt"]) == row["source"]
    copies = [p for p in task.make_pairs(3000, seed=1) if p["source"] == "copy"]
    assert abs(sum(p["flipped"] for p in copies) / len(copies) - 0.2) < 0.04
    # the default sub-tasks draw what they drew before sources could be chosen
    assert make_task("mixed").make_rows(50) == make_task(
        "mixed", sources=["reverse", "sort", "add"]).make_rows(50)
    for sources in (["reverse", "reverse"], [], ["echo"], "copy"):
        with pytest.raises(DataError, match="sources must be a list of distinct sub-tasks"):
            make_task("mixed", sources=sources)
    with pytest.raises(DataError, match=r"noise must map some of \['copy'\]"):
        make_task("mixed", sources=["copy"], noise={"sort": 0.1})


@pytest.mark.parametrize("task, settings, message", [
    (RepeatTask, {"min_count": 5, "max_count": 2}, r"RepeatTask: min_count \(5\) is larger than"),
    (ReverseTask, {"min_len": 0}, "ReverseTask: min_len must be a positive int, got 0"),
    (ReverseTask, {"max_len": True}, "ReverseTask: max_len must be a positive int, got True"),
])
def test_bad_bounds_are_named(task, settings, message):
    with pytest.raises(DataError, match=message):
        task(**settings)
