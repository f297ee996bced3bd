"""Config: YAML + overrides, typed validation, and messages that say what and where."""

import re

import pytest

from plait.config import (
    Config,
    ConfigError,
    describe,
    dump_yaml,
    inert_settings_note,
    load_config,
)


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


# ----------------------------------------------------------------- contradictions


@pytest.mark.parametrize("overrides, message", [
    (["algo.name=ppo", "algo.advantage=grpo"], r"algo.name=ppo trains a critic .*'grpo' uses none"),
    (["algo.name=ppo", "algo.group_size=1", "algo.advantage=reinforce++"],
     r"algo.name=grpo for a critic-free job with algo.advantage=reinforce\+\+"),
    (["rollout.temperature=0"], r"rollout.temperature=0 decodes greedily.*identical"),
    (["data.eval_path=."], r"data.eval_path is read only with data.train_path"),
    (["run.overwrite=true", "run.resume=must"], r"run.overwrite=true deletes the run directory"),
    (["model.attn_implementation=flash_attention_2"],
     r"flash_attention_2 runs only under rollout.engine=hf"),
    (["model.attn_implementation=flash_attention_2", "rollout.engine=hf", "train.device=cpu"],
     r"flash_attention_2 needs a GPU"),
])
def test_contradictory_settings_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("override, message", [
    ("data.task=additon", r"data.task: unknown task 'additon'.*Did you mean 'addition'"),
    ("data.task_args={digit: 2}", r"data.task_args: task 'addition' has no setting\(s\) \['digit'\]"),
    ("data.task_args={digits: 0}", r"data.task_args: .*digits must be between 1 and 18"),
])
def test_built_in_task_and_its_settings_are_checked_with_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_critic_free_reinforce_pp_runs_with_groups_of_one():
    cfg = load_config(None, ["algo.advantage=reinforce++", "algo.group_size=1"])
    assert cfg.algo.name == "grpo"
    load_config(None, ["algo.name=ppo", "algo.group_size=1"])  # PPO: GAE with a critic


# ----------------------------------------------------------------- settings with no effect

# (a setting where the part it configures does not run, what makes it run: [] where the
# setting's own row already turns the part off)
INERT = [
    (["algo.vf_coef=1.0"], ["algo.name=ppo", "algo.group_size=1"]),
    (["algo.vf_clip=null"], ["algo.name=ppo", "algo.group_size=1"]),
    (["algo.lam=0.9", "algo.advantage=reinforce++"],
     ["algo.name=ppo", "algo.group_size=1", "algo.advantage=gae"]),
    (["optim.critic_lr=1e-3"], ["algo.name=ppo", "algo.group_size=1"]),
    (["model.critic_path=MODEL_DIR"], ["algo.name=ppo", "algo.group_size=1"]),
    (["algo.gamma=0.9"], ["algo.advantage=reinforce++"]),
    (["algo.kl_estimator=k1"], ["algo.kl_coef=0.1"]),
    (["algo.kl_mode=reward"], ["algo.kl_coef=0.1"]),
    (["model.ref_path=MODEL_DIR"], ["algo.kl_coef=0.1"]),
    (["algo.grpovi_weights=reference"], ["algo.reward_adjust=grpovi"]),
    (["algo.grpovi_split_ties=true"], ["algo.reward_adjust=grpovi"]),
    (["algo.max_draws=2"], ["algo.dynamic_sampling=true"]),
    (["algo.overlong_penalty=0.5"], ["algo.overlong_buffer=4"]),
    (["algo.loss_norm_constant=10"], ["algo.loss_agg=seq-mean-token-sum-norm"]),
    (["algo.off_policy_cap=3"], ["algo.off_policy=tis"]),
    (["algo.pack_group_tokens=0", "algo.share_prompt_forward=false"], []),
    (["algo.use_engine_logprobs=true"], ["algo.epochs=2"]),
    (["rollout.top_k=5", "rollout.temperature=0", "algo.advantage=reinforce++"], []),
    (["rollout.top_p=0.9", "rollout.temperature=0", "algo.advantage=reinforce++"], []),
    (["rollout.sync_every=2", "rollout.engine=hf"], []),
    (["rollout.prefill_tokens=64", "rollout.engine=hf"], []),
    (["rollout.release_kv_cache=true", "rollout.engine=hf"], []),
    (["runtime.stream_groups=true", "runtime.placement=disaggregated", "algo.epochs=2"], []),
    (["sft.lr=0.01"], ["sft.steps=5"]),
    (["sft.batch_size=8"], ["sft.steps=5"]),
    (["sft.warmup_steps=2"], ["sft.steps=5"]),
    (["model.tiny.num_layers=2", "model.path=MODEL_DIR"], ["model.path=tiny"]),
    (["data.task_args={digits: 3}", "data.task=null", "data.train_path=DATA"],
     ["data.task=addition"]),
    (["data.split=test"], ["data.train_path=DATA"]),
    (["data.fields={prompt: q}"], ["data.train_path=DATA"]),
    (["data.num_train=10", "data.train_path=DATA"], ["data.train_path=null"]),
    (["reward.fallback_reward=-1"], ["reward.on_error=fallback"]),
    (["reward.max_consecutive_timeouts=5"], ["reward.on_error=fallback"]),
    (["reward.max_consecutive_timeouts=5", "reward.on_error=fallback", "reward.timeout_s=null"],
     []),
    (["reward.import_timeout_s=5"], [f"reward.functions=[{{fn: '{__file__}:f'}}]"]),
    (["optim.min_lr_ratio=0.1"], ["optim.schedule=cosine"]),
    (["train.max_nan_skips=3", "train.nan_policy=stop"], ["train.nan_policy=skip"]),
]


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from plait.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("inputs")
    model_dir = save_tiny_model(root / "model")
    data = root / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 300)
    return {"MODEL_DIR": str(model_dir), "DATA": str(data)}


def _fill(overrides, paths):
    out = []
    for text in overrides:
        for name, value in paths.items():
            text = text.replace(f"={name}", f"={value}")
        out.append(text)
    return out


@pytest.mark.parametrize("inert, active", INERT, ids=[i[0].split("=")[0] for i, _ in INERT])
def test_a_setting_with_no_effect_is_named_and_not_where_it_acts(inert, active,
                                                                 model_and_data):
    key = inert[0].split("=")[0]
    note = inert_settings_note(load_config(None, _fill(inert, model_and_data)))
    assert note is not None and re.search(rf"no effect in this job, ignored: .*{key}=", note)
    if active:
        note = inert_settings_note(load_config(None, _fill([*inert, *active], model_and_data)))
        assert note is None or f"{key}=" not in note, note


def test_every_setting_with_no_effect_is_named_in_one_line():
    note = inert_settings_note(
        load_config(None, ["algo.kl_mode=reward", "algo.vf_coef=1", "sft.lr=0.01"]))
    assert note.count("\n") == 0
    for part in ("algo.kl_mode=reward (algo.kl_coef=0", "algo.vf_coef=1.0 (no critic",
                 "sft.lr=0.01 (sft.steps=0", "defaults: algo.vf_coef=0.5 algo.kl_mode=loss "
                 "sft.lr=0.001"):
        assert part in note, note


def test_the_command_line_shows_the_note_and_runs(capsys):
    from plait.cli import main

    assert main(["config", "examples/grpo_addition.yaml", "sft.steps=0"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("plait: note:")]
    assert len(notes) == 1 and "sft.lr=" in notes[0], captured.err
    assert "steps: 0" in captured.out


def test_the_no_effect_table_names_real_settings():
    from plait.config import _inert_settings, _setting

    for _, keys, _ in _inert_settings(Config()):
        for key in keys:
            _setting(Config(), key)  # raises for a misspelt key


def test_default_values_are_not_named_even_where_they_have_no_effect():
    assert inert_settings_note(load_config(None, [
        "algo.kl_mode=loss", "algo.vf_coef=0.5", "sft.lr=1e-3",
        "runtime.controller=parallel"])) is None


def test_turning_off_a_result_preserving_speedup_is_allowed_anywhere():
    load_config(None, ["algo.name=ppo", "algo.group_size=1", "algo.skip_zero_advantage=false"])
    load_config(None, ["rollout.engine=hf", "rollout.fuse_forwards=false"])


@pytest.mark.parametrize("path", ["examples/grpo_addition.yaml", "examples/ppo_addition.yaml"])
def test_examples_load(path):
    from pathlib import Path

    load_config(Path(__file__).parent.parent / path)


# ----------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize("text, line, key", [
    ("train:\n  steps: 3\n  seed: 1\n  steps: 4\n", 4, "steps"),            # in a section
    ("train:\n  steps: 3\nalgo:\n  name: grpo\ntrain:\n  seed: 1\n", 5, "train"),  # top level
    ("reward:\n  functions:\n    - fn: task\n      weight: 1\n      fn: exact_match\n", 5, "fn"),
    ("data:\n  task_args: {digits: 2, digits: 3}\n", 2, "digits"),            # flow mapping
])
def test_duplicate_yaml_keys_are_refused_with_file_and_line(tmp_path, text, line, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"cfg.yaml, line {line}: key '{key}' appears twice"):
        load_config(path)


@pytest.mark.parametrize("override", ["reward.functions=[{fn: task, fn: exact_match}]",
                                      "data.task_args={digits: 2, digits: 3}"])
def test_duplicate_keys_in_an_override_are_refused(override):
    with pytest.raises(ConfigError, match=r"command line: override .* twice in one mapping"):
        load_config(None, [override])


def test_yaml_merge_keys_still_override(tmp_path):
    """Explicit keys override those a merge key (<<) brings in: not a duplicate."""
    path = write(tmp_path, "train:\n  <<: {steps: 3, seed: 1}\n  steps: 4\n")
    assert load_config(path).train.steps == 4


def test_settings_of_where_a_job_runs_are_allowed_in_any_placement():
    """A cluster config runs on one process by changing only the rank count, launcher and
    placement: its Ray, rank, rollout-worker and timeout settings are not refused."""
    cluster = ["runtime.ray_address=auto", "runtime.cpus_per_rank=2", "runtime.gpus_per_rank=1",
               "runtime.rollout_workers=2", "runtime.weight_bucket_mb=8",
               "runtime.controller=single", "runtime.data_parallel=fsdp", "runtime.backend=gloo",
               "runtime.collective_timeout_s=60", "runtime.heartbeat_timeout_s=5",
               "runtime.progress_timeout_s=5", "runtime.master_port=29500"]
    config = load_config(None, cluster)
    assert config.runtime.num_ranks == 1 and config.runtime.launcher == "local"


@pytest.mark.parametrize("key", ["reward.timeout_s", "reward.import_timeout_s"])
def test_a_zero_reward_time_limit_is_refused_when_the_config_loads(key):
    with pytest.raises(ConfigError, match=rf"{key}=0 would fail every"):
        load_config(None, [f"{key}=0"])


def test_the_config_names_every_built_in_reward():
    from plait.config import BUILTIN_REWARD_NAMES
    from plait.rewards import BUILTIN_REWARDS

    assert set(BUILTIN_REWARD_NAMES) == set(BUILTIN_REWARDS)
