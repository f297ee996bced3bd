"""Config: YAML + overrides, typed validation, and messages that say what and where."""

import pytest

from plait.config import Config, ConfigError, describe, dump_yaml, load_config


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\nalgo:\n  clip_high: 0.28\n")
    cfg = load_config(path, ["train.steps=9", "optim.lr=3e-5", "reward.functions=[{fn: task, weight: 2}]"])
    assert cfg.train.steps == 9
    assert cfg.algo.clip_high == 0.28
    assert cfg.optim.lr == 3e-5
    assert cfg.reward.functions[0].weight == 2.0
    assert cfg.algo.group_size == Config().algo.group_size


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stesp'.*did you mean 'train.steps'"):
        load_config(None, ["train.stesp=3"])
    path = write(tmp_path, "algo:\n  grup_size: 4\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml.*algo.grup_size.*algo.group_size"):
        load_config(path)


def test_unknown_section_suggests_nearest():
    with pytest.raises(ConfigError, match=r"'optimm'.*did you mean 'optim'"):
        load_config(None, ["optimm.lr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", r"train.steps: expected an integer, got 'abc'"),
        ("train.steps=-1", r"train.steps: -1 is below the minimum 0"),
        ("rollout.top_p=1.5", r"rollout.top_p: 1.5 is above the maximum 1.0"),
        ("algo.name=grpoo", r"algo.name: 'grpoo' is not one of 'grpo', 'ppo' \(did you mean 'grpo'\?\)"),
        ("run.overwrite=maybe", r"run.overwrite: expected true or false"),
        ("algo.group_size=1", r"group_size must be at least 2 for GRPO"),
        ("data.train_path=/nonexistent/x.jsonl", r"data.train_path: '/nonexistent/x.jsonl' does not exist"),
        ("model.path=/nonexistent/model", r"model.path: model directory '/nonexistent/model' does not exist"),
        ("model.path=Qwen/Qwen2.5-0.5B", r"not a local directory.*never downloads"),
        ("algo.reward_range=[1, 0]", r"reward_range must be \[low, high\] with low < high"),
        ("train.steps", r"must look like key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_model_dir_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(None, [f"model.path={tmp_path / 'm'}"])


def test_every_field_is_documented_and_round_trips(tmp_path):
    rows = describe()
    assert len(rows) > 60
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert undocumented == []
    cfg = load_config(None, ["train.steps=3", "data.task_args={digits: 3}"])
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.train.steps = 5


@pytest.mark.parametrize("overrides, message", [
    (["rollout.compile=true", "rollout.engine=hf"], "rollout.compile compiles the plait engine"),
    (["rollout.compile=true", "runtime.num_ranks=2", "runtime.data_parallel=fsdp"],
     "rollout.compile does not run on FSDP-sharded trainers"),
])
def test_compiled_decode_is_refused_where_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    # sharded trainers with whole-model rollout workers apart may compile
    load_config(None, ["rollout.compile=true", "runtime.num_ranks=2",
                       "runtime.data_parallel=fsdp", "runtime.placement=disaggregated"])


@pytest.mark.parametrize("overrides", [
    ["runtime.partial_rollout=true"],  # colocated: nothing generates across batches
    ["runtime.partial_rollout=true", "runtime.placement=disaggregated"],  # max_staleness=0
    ["runtime.partial_rollout=true", "runtime.placement=dynamic", "runtime.num_ranks=2"],
])
def test_partial_rollout_needs_workers_apart_and_staleness(overrides):
    with pytest.raises(ConfigError, match="runtime.partial_rollout keeps rollout workers apart"):
        load_config(None, overrides)
    for placement in ("disaggregated", "partial"):
        load_config(None, ["runtime.partial_rollout=true", f"runtime.placement={placement}",
                           "runtime.max_staleness=1"])
