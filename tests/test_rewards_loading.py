"""Reward specs: built-ins, module:function, file.py:function, and their errors."""

import textwrap

import pytest

from plait.data.tasks import AdditionTask, RepeatTask
from plait.rewards import RewardLoadError, TaskReward, exact_match, load_reward_fn
from plait.rewards.loading import check_reward_signature, parse_reward_spec, required_fields

USER_REWARDS = textwrap.dedent(
    """
    import helper_constant_module

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    def bonus_reward(prompts, completions, **kwargs):
        return [helper_constant_module.BONUS] * len(completions)

    class Scorers:
        @staticmethod
        def ones(prompts, completions, **kwargs):
            return [1.0] * len(completions)

    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture
def rewards_file(tmp_path):
    (tmp_path / "helper_constant_module.py").write_text("BONUS = 0.5\n")
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_task_verifier_via_builtin_task_reward():
    name, reward = load_reward_fn("task", task=AdditionTask())
    assert name == "task" and isinstance(reward, TaskReward)
    completions = ["122", "122 \n", "121", "122\n1+1=2"]
    assert reward(["37+85="] * 4, completions, answer=["122"] * 4) == [1.0, 1.0, 0.0, 1.0]
    _, repeat_reward = load_reward_fn("task", task=RepeatTask())
    assert repeat_reward(["a*2="] * 2, ["aa", "a"], answer=["aa", "aa"]) == [1.0, 0.0]


def test_task_reward_needs_a_task_and_an_answer_field():
    with pytest.raises(RewardLoadError, match="no task was given"):
        load_reward_fn("task")
    _, reward = load_reward_fn("task", task=AdditionTask())
    assert required_fields(reward) == required_fields(exact_match) == {"answer"}


def test_exact_match():
    name, reward = load_reward_fn("exact_match")
    assert (name, reward) == ("exact_match", exact_match)
    assert reward(["p", "p"], [" 42\n", "4 2"], answer=[42, "42"]) == [1.0, 0.0]


def test_unknown_builtin_suggests_nearest_and_explains_spec_forms():
    with pytest.raises(
        RewardLoadError, match=r"'exact_mach'.*Did you mean 'exact_match'.*module:function"
    ):
        load_reward_fn("exact_mach")
    with pytest.raises(
        RewardLoadError, match=r"names a file but no function; write 'r\.py:function_name'"
    ):
        load_reward_fn("r.py")


def test_load_from_file_relative_to_cwd_with_sibling_import(rewards_file, monkeypatch):
    monkeypatch.chdir(rewards_file.parent)
    name, reward = load_reward_fn("my_rewards.py:length_reward")
    assert name == "length_reward"
    assert reward(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    _, bonus = load_reward_fn(f"{rewards_file}:bonus_reward")
    assert bonus(["p"], ["c"]) == [0.5]
    name, ones = load_reward_fn(f"{rewards_file}:Scorers.ones")
    assert name == "ones" and ones(["p"], ["c"]) == [1.0]


def test_file_is_executed_once_per_process(rewards_file):
    _, first = load_reward_fn(f"{rewards_file}:length_reward")
    _, second = load_reward_fn(f"{rewards_file}:length_reward")
    assert first is second


def test_load_from_module(tmp_path, monkeypatch):
    package = tmp_path / "spec_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(
        "def half(prompts, completions, **kwargs):\n    return [0.5] * len(prompts)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    name, reward = load_reward_fn("spec_test_pkg.scoring:half")
    assert name == "half" and reward(["a"], ["b"]) == [0.5]


def test_missing_file(tmp_path):
    with pytest.raises(RewardLoadError, match=r"file '.*nope\.py' not found.*current directory"):
        load_reward_fn(f"{tmp_path}/nope.py:fn")


def test_missing_attribute_lists_callables_and_suggests_nearest(rewards_file):
    with pytest.raises(RewardLoadError) as info:
        load_reward_fn(f"{rewards_file}:length_rewad")
    message = str(info.value)
    assert "no attribute 'length_rewad'" in message
    assert "['Scorers', 'bonus_reward', 'length_reward']" in message
    assert "Did you mean 'length_reward'?" in message


def test_not_callable(rewards_file):
    with pytest.raises(RewardLoadError, match="names a int, not a callable"):
        load_reward_fn(f"{rewards_file}:NOT_A_FUNCTION")


def test_module_not_importable_shows_import_error(tmp_path, monkeypatch):
    with pytest.raises(
        RewardLoadError, match=r"cannot import module 'no_such_reward_module'.*No module named"
    ):
        load_reward_fn("no_such_reward_module:fn")
    (tmp_path / "broken_reward_module.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        RewardLoadError,
        match=r"ModuleNotFoundError: No module named 'not_installed_dependency_xyz'",
    ):
        load_reward_fn("broken_reward_module:fn")


def test_file_that_raises_on_import(tmp_path):
    path = tmp_path / "syntax_error.py"
    path.write_text("def broken(:\n")
    with pytest.raises(RewardLoadError, match="raised SyntaxError"):
        load_reward_fn(f"{path}:broken")


def test_parse_spec_forms(tmp_path):
    assert parse_reward_spec("task").kind == "builtin"
    module_spec = parse_reward_spec("pkg.mod:fn")
    assert (module_spec.kind, module_spec.target, module_spec.attribute) == (
        "module",
        "pkg.mod",
        "fn",
    )
    file_spec = parse_reward_spec("sub/r.py:fn")
    assert file_spec.kind == "file" and file_spec.target.endswith("r.py") and file_spec.name == "fn"
    with pytest.raises(RewardLoadError, match="not a function name"):
        parse_reward_spec("pkg.mod:")


def test_signature_must_accept_prompts_completions_and_kwargs():
    def no_kwargs(prompts, completions):
        return []

    with pytest.raises(RewardLoadError, match=r"'no_kwargs'.*does not accept \*\*kwargs"):
        check_reward_signature("no_kwargs", no_kwargs)

    def positional_only(prompts, completions, /, **kwargs):
        return []

    with pytest.raises(
        RewardLoadError, match=r"def positional_only\(prompts, completions, \*\*kwargs\)"
    ):
        check_reward_signature("positional_only", positional_only)


def test_trl_style_signatures_are_accepted():
    def accuracy(completions, solution, *, scale=1.0, **kwargs):
        return [scale * (c == s) for c, s in zip(completions, solution, strict=True)]

    check_reward_signature("accuracy", accuracy)
    check_reward_signature("ok", lambda prompts, completions, **kwargs: [])
    assert required_fields(accuracy) == {"solution"}
