"""Checkpoints: exact round trips, HF loadability, rotation, crash safety, and checksums:
nothing is loaded from a checkpoint whose files do not match its manifest."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

import plait.train.checkpoint as checkpoint_module
from plait.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    restore_rng_state,
    save_checkpoint,
)

TINY_LLAMA = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


class ValueModel(nn.Module):
    """A critic-like module: an HF backbone plus a value head, with one tied weight."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY_LLAMA))
        self.value_head = nn.Linear(16, 1)
        self.mirror = nn.Linear(16, 16, bias=False)
        self.mirror_tied = nn.Linear(16, 16, bias=False)
        self.mirror_tied.weight = self.mirror.weight


def tiny_policy(seed: int, **config: object) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**TINY_LLAMA, **config}))


def training_setup(seed: int) -> tuple[dict, dict, dict]:
    """Models, AdamW optimizers and LambdaLR schedulers, advanced by two steps when seed == 0."""
    models = {"policy": tiny_policy(seed), "critic": ValueModel(seed + 100)}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-2) for name, m in models.items()}
    schedulers = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        for name, opt in optimizers.items()
    }
    if seed == 0:
        for _ in range(2):
            train_step(models, optimizers, schedulers)
    return models, optimizers, schedulers


def train_step(models: dict, optimizers: dict, schedulers: dict) -> None:
    ids = torch.randint(0, 32, (2, 5))
    policy_loss = models["policy"](input_ids=ids, labels=ids).loss
    hidden = models["critic"].backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    critic = models["critic"]
    critic_loss = critic.value_head(critic.mirror_tied(hidden)).pow(2).mean()
    (policy_loss + critic_loss).backward()
    for name in optimizers:
        optimizers[name].step()
        optimizers[name].zero_grad()
        schedulers[name].step()


def assert_same_weights(left: nn.Module, right: nn.Module) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state.keys() == right_state.keys()
    for key in left_state:
        assert torch.equal(left_state[key], right_state[key]), key


def assert_same_optimizer_state(left: torch.optim.Optimizer, right: torch.optim.Optimizer) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state["param_groups"] == right_state["param_groups"]
    assert left_state["state"].keys() == right_state["state"].keys()
    for index, slots in left_state["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, right_state["state"][index][slot]), (index, slot)


def random_draws() -> tuple:
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def save(root: Path, step: int, **kwargs: object) -> Path:
    kwargs.setdefault("models", {"policy": nn.Linear(2, 2)})
    kwargs.setdefault("trainer_state", {"step": step})
    return save_checkpoint(root, step, **kwargs)


# --------------------------------------------------------------------------- round trip


def test_round_trip_restores_weights_optimizer_scheduler_rng_and_state(tmp_path: Path) -> None:
    models, optimizers, schedulers = training_setup(seed=0)
    state = {"step": 2, "data": {"epoch": 0, "index": 17}, "best": 0.5}
    path = save_checkpoint(
        tmp_path,
        2,
        models=models,
        optimizers=optimizers,
        schedulers=schedulers,
        trainer_state=state,
    )
    draws_after_save = random_draws()
    assert read_trainer_state(path) == state

    fresh_models, fresh_optimizers, fresh_schedulers = training_setup(seed=1)
    restored = load_checkpoint(
        path, models=fresh_models, optimizers=fresh_optimizers, schedulers=fresh_schedulers
    )

    assert restored == state
    assert random_draws() == draws_after_save
    for name in models:
        assert_same_weights(models[name], fresh_models[name])
        assert_same_optimizer_state(optimizers[name], fresh_optimizers[name])
        assert schedulers[name].state_dict() == fresh_schedulers[name].state_dict()
    critic = fresh_models["critic"]
    assert critic.mirror.weight is critic.mirror_tied.weight  # tying survives loading

    # Continuing from the restored state matches continuing from the original.
    torch.manual_seed(7)
    train_step(models, optimizers, schedulers)
    torch.manual_seed(7)
    train_step(fresh_models, fresh_optimizers, fresh_schedulers)
    for name in models:
        assert_same_weights(models[name], fresh_models[name])


def test_policy_directory_loads_with_from_pretrained(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    policy = tiny_policy(0, tie_word_embeddings=True)

    path = save_checkpoint(
        tmp_path,
        5,
        models={"critic": nn.Linear(2, 1), "policy": policy},
        tokenizer=tokenizer,
        trainer_state={},
    )

    assert path == tmp_path / "step_000005"
    reloaded = AutoModelForCausalLM.from_pretrained(path / "policy")
    assert_same_weights(policy, reloaded)
    assert AutoTokenizer.from_pretrained(path / "policy")("a b")["input_ids"] == [1, 2]
    assert not (path / "critic" / "tokenizer.json").exists()


def test_moe_model_with_renamed_stored_weights_round_trips(tmp_path: Path) -> None:
    config = transformers.MixtralConfig(**TINY_LLAMA, num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config)
    path = save_checkpoint(tmp_path, 1, models={"policy": original}, trainer_state={})
    torch.manual_seed(1)
    fresh = AutoModelForCausalLM.from_config(config)

    load_checkpoint(path, models={"policy": fresh})

    assert_same_weights(original, fresh)


def test_rng_state_is_json_and_round_trips() -> None:
    random.gauss(0, 1)  # leave a cached gaussian in the python state
    np.random.standard_normal()
    state = capture_rng_state()
    expected = random_draws()
    random_draws()

    restore_rng_state(json.loads(json.dumps(state)))

    assert random_draws() == expected


def test_load_subset_of_models(tmp_path: Path) -> None:
    policy = tiny_policy(0)
    path = save_checkpoint(
        tmp_path, 1, models={"policy": policy, "critic": nn.Linear(3, 1)}, trainer_state={}
    )
    fresh = tiny_policy(1)
    load_checkpoint(path, models={"policy": fresh}, restore_rng=False)
    assert_same_weights(policy, fresh)


# --------------------------------------------------------------------------- rotation, replacement


def test_keep_last_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path, step * 10, keep_last=2)

    assert [checkpoint_step(path) for path in list_checkpoints(tmp_path)] == [40, 50]
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(50)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_000040", "step_000050"]


@pytest.mark.parametrize("keep_last", [None, 0])
def test_keep_last_none_or_zero_keeps_all(tmp_path: Path, keep_last: int | None) -> None:
    for step in range(4):
        save(tmp_path, step, keep_last=keep_last)
    assert len(list_checkpoints(tmp_path)) == 4


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 3, trainer_state={"attempt": 1})
    path = save(tmp_path, 3, trainer_state={"attempt": 2})

    assert load_checkpoint(path, models={}) == {"attempt": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]


def test_saving_an_earlier_step_warns_and_is_not_rotated_away(tmp_path: Path) -> None:
    save(tmp_path, 10)
    save(tmp_path, 20)
    with pytest.warns(UserWarning, match="later steps"):
        path = save(tmp_path, 15, keep_last=1)
    assert path.is_dir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000020"


# --------------------------------------------------------------------------- crash safety


class ExplodingTokenizer:
    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.json").write_text("{")
        raise OSError("disk full")


def test_crash_while_writing_leaves_no_visible_checkpoint(tmp_path: Path) -> None:
    previous = save(tmp_path, 1)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, tokenizer=ExplodingTokenizer())

    assert latest_checkpoint(tmp_path) == previous
    assert [path.name for path in tmp_path.iterdir()] == ["step_000001"]


def test_leftover_temporary_directory_is_ignored_then_cleaned(tmp_path: Path) -> None:
    previous = save(tmp_path, 1)
    leftover = tmp_path / ".tmp-step_000002-abcd"
    leftover.mkdir()
    (leftover / COMPLETE_MARKER).write_text("{}")  # crashed just before the rename

    assert latest_checkpoint(tmp_path) == previous
    save(tmp_path, 3)
    assert not leftover.exists()


def test_checkpoint_without_complete_marker_is_ignored(tmp_path: Path) -> None:
    previous = save(tmp_path, 1)
    unfinished = save(tmp_path, 2, keep_last=None)
    (unfinished / COMPLETE_MARKER).unlink()

    assert latest_checkpoint(tmp_path) == previous
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(unfinished, models={"policy": nn.Linear(2, 2)})


def test_latest_checkpoint_of_missing_or_empty_root_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert latest_checkpoint(tmp_path) is None


# --------------------------------------------------------------------------- clear errors


def test_mismatched_keys_raise_checkpoint_error_naming_them(tmp_path: Path) -> None:
    path = save(tmp_path, 1, models={"critic": nn.Sequential(nn.Linear(2, 2))})
    with pytest.raises(
        CheckpointError,
        match=r"step_000001.*missing weights \[bias, weight\]; unexpected weights \[0\.bias",
    ):
        load_checkpoint(path, models={"critic": nn.Linear(2, 2)})
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \[0\.bias: checkpoint \(2,\) vs model \(3,\)"
    ):
        load_checkpoint(path, models={"critic": nn.Sequential(nn.Linear(2, 3))})


def test_hf_model_with_other_architecture_raises_checkpoint_error(tmp_path: Path) -> None:
    path = save(tmp_path, 1, models={"policy": tiny_policy(0)})
    wrong = tiny_policy(0, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="step_000001.*'policy' does not fit"):
        load_checkpoint(path, models={"policy": wrong})


def test_truncated_weights_file_raises_checkpoint_error(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    weights = path / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="corrupt: policy/model.safetensors"):
        load_checkpoint(path, models={"policy": nn.Linear(2, 2)})


def test_requesting_an_absent_name_raises_checkpoint_error(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="no optimizer named 'policy'"):
        load_checkpoint(
            path,
            models={},
            optimizers={"policy": torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)},
        )


def test_optimizer_of_other_shape_raises_checkpoint_error(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    path = save(
        tmp_path, 1, models={}, optimizers={"policy": torch.optim.SGD(model.parameters(), lr=0.1)}
    )
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer 'policy' does not fit"):
        load_checkpoint(path, models={}, optimizers={"policy": other})


class Schedule:
    """A callable-object lr_lambda whose attributes torch.load(weights_only) refuses."""

    def __init__(self) -> None:
        self.helper = Path("not/a/tensor")

    def __call__(self, step: int) -> float:
        return 1.0


def test_scheduler_state_that_cannot_load_safely_fails_at_save(tmp_path: Path) -> None:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule())
    with pytest.raises(CheckpointError, match="weights_only"):
        save(tmp_path, 1, schedulers={"policy": scheduler})
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("name", ["optimizers", ".hidden", "a/b", ""])
def test_bad_model_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot be a checkpoint directory"):
        save(tmp_path, 1, models={name: nn.Linear(2, 2)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_restoring_cuda_rng_without_cuda_warns() -> None:
    with pytest.warns(UserWarning, match="CUDA RNG states for 1 device"):
        restore_rng_state({"cuda": [[0] * 16]})


def test_resumed_optimizer_keeps_its_own_kernel_choice(tmp_path: Path) -> None:
    """A checkpoint saved with one AdamW kernel resumes with the kernel the resumed run
    asks for (optim.implementation), states intact."""
    model = nn.Linear(4, 3)
    saved_with = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    model(torch.randn(2, 4)).sum().backward()
    saved_with.step()
    path = save_checkpoint(tmp_path, 1, models={}, optimizers={"policy": saved_with},
                           trainer_state={})
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    load_checkpoint(path, models={}, optimizers={"policy": resumed})
    group = resumed.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed.state[p][key], saved_with.state[p][key])


# --------------------------------------------------------------------------- checksums


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def flip_last_byte(file: Path) -> None:
    """A same-size corruption: the size check cannot see it."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def rewrite_manifest(path: Path, **changes: object) -> None:
    """Rewrite the COMPLETE manifest: sizes and checksums of the files as they are now,
    then ``changes`` (a value of None removes the key)."""
    manifest = json.loads((path / COMPLETE_MARKER).read_text())
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != COMPLETE_MARKER)
    manifest["files"] = {f.relative_to(path).as_posix(): f.stat().st_size for f in files}
    manifest["sha256"] = {f.relative_to(path).as_posix(): sha256(f) for f in files}
    manifest.update(changes)
    manifest = {key: value for key, value in manifest.items() if value is not None}
    (path / COMPLETE_MARKER).write_text(json.dumps(manifest))


def policy_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_manifest_records_the_sha256_of_every_file(tmp_path: Path) -> None:
    model, optimizer = policy_and_optimizer()
    path = save(tmp_path, 1, models={"policy": model}, optimizers={"policy": optimizer})
    manifest = json.loads((path / COMPLETE_MARKER).read_text())
    assert manifest["version"] == 1  # the sha256 key is new; older readers ignore it
    assert manifest["sha256"].keys() == manifest["files"].keys()
    for relative, digest in manifest["sha256"].items():
        assert digest == sha256(path / relative), relative


@pytest.mark.parametrize("relative", ["policy/model.safetensors", "optimizers/policy.pt",
                                      "trainer_state.json", "rng.json"])
def test_same_size_corruption_is_never_loaded(tmp_path: Path, relative: str) -> None:
    model, optimizer = policy_and_optimizer()
    path = save(tmp_path, 1, models={"policy": model}, optimizers={"policy": optimizer})
    flip_last_byte(path / relative)
    fresh, fresh_optimizer = policy_and_optimizer()
    before = {key: value.clone() for key, value in fresh.state_dict().items()}

    with pytest.raises(CheckpointError, match=f"corrupt: {relative} checksum mismatch"):
        load_checkpoint(path, models={"policy": fresh}, optimizers={"policy": fresh_optimizer})
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was loaded from a corrupt checkpoint"
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint_module.verify_checkpoint(path)


def test_read_trainer_state_checks_its_file(tmp_path: Path) -> None:
    path = save(tmp_path, 1, trainer_state={"global_step": 1})
    (path / "trainer_state.json").write_text(
        (path / "trainer_state.json").read_text().replace("1", "7"))
    with pytest.raises(CheckpointError, match="trainer_state.json checksum mismatch"):
        read_trainer_state(path)


def test_manifest_without_checksums_is_still_read_by_size(tmp_path: Path) -> None:
    """Checkpoints written before checksums were recorded load as they always did."""
    model = nn.Linear(2, 2)
    path = save(tmp_path, 1, models={"policy": model})
    rewrite_manifest(path, sha256=None)
    fresh = nn.Linear(2, 2)
    load_checkpoint(path, models={"policy": fresh})
    assert_same_weights(model, fresh)
    (path / "policy" / "model.safetensors").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="policy/model.safetensors has 5 bytes"):
        load_checkpoint(path, models={"policy": fresh})


def test_each_file_is_hashed_once_while_it_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    """A resume verifies the checkpoint, then reads its parts in several loads: the files
    are hashed once; a file changed since is hashed again (and caught)."""
    model, optimizer = policy_and_optimizer()
    path = save(tmp_path, 1, models={"policy": model}, optimizers={"policy": optimizer})
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(checkpoint_module.hashlib, "sha256", lambda: hashed.append(1) or real())
    files = len(json.loads((path / COMPLETE_MARKER).read_text())["files"])

    checkpoint_module.verify_checkpoint(path)
    assert len(hashed) == files
    read_trainer_state(path)
    load_checkpoint(path, models={"policy": nn.Linear(2, 2)}, restore_rng=False)
    load_checkpoint(path, models={}, optimizers={"policy": policy_and_optimizer()[1]})
    assert len(hashed) == files

    weights = path / "policy" / "model.safetensors"
    data = weights.read_bytes()
    flip_last_byte(weights)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path, models={"policy": nn.Linear(2, 2)})
    weights.write_bytes(data)
    load_checkpoint(path, models={"policy": nn.Linear(2, 2)})


@pytest.mark.parametrize("changes, message", [
    ({"version": "1"}, "no valid format version"),
    ({"format": "other"}, "not a plait-checkpoint manifest"),
    ({"models": ["policy"]}, "no valid 'models'"),
    ({"models": {"policy": "pickle"}}, "no valid 'models'"),
    ({"optimizers": 5}, "no valid 'optimizers'"),
    ({"files": ["policy/model.safetensors"]}, "no valid 'files'"),
    ({"files": {"../elsewhere": 3}}, "no valid 'files'"),
    ({"files": {"policy/model.safetensors": "84"}}, "no valid 'files'"),
    ({"sha256": {"policy/model.safetensors": "abc"}}, "no valid 'sha256'"),
])
def test_malformed_manifest_is_one_checkpoint_error(tmp_path: Path, changes, message) -> None:
    """Valid JSON with wrong types or unsafe paths: a one-line CheckpointError, no TypeError."""
    path = save(tmp_path, 1)
    rewrite_manifest(path, **changes)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path, models={"policy": nn.Linear(2, 2)}, optimizers={})
    assert "\n" not in str(caught.value)


def test_newer_format_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    rewrite_manifest(path, version=99)
    with pytest.raises(CheckpointError, match="newer than this plait reads"):
        load_checkpoint(path, models={"policy": nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="newer"):  # not skipped as corrupt
        checkpoint_module.latest_intact_checkpoint(tmp_path)


@pytest.mark.parametrize("rng", [{"torch": [1, 2, 3]}, {"torch": [300] * 5056},
                                 {"python": {"version": 3}}])
def test_malformed_rng_state_is_a_checkpoint_error(tmp_path: Path, rng: dict) -> None:
    path = save(tmp_path, 1)
    (path / "rng.json").write_text(json.dumps(rng))
    rewrite_manifest(path)  # consistent files, wrong content
    with pytest.raises(CheckpointError, match="rng.json is malformed"):
        load_checkpoint(path, models={})


def test_malformed_weight_index_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    (path / "policy" / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="no valid weight_map"):
        load_checkpoint(path, models={"policy": nn.Linear(2, 2)})


def test_optimizer_state_of_another_type_is_a_checkpoint_error(tmp_path: Path) -> None:
    model, optimizer = policy_and_optimizer()
    path = save(tmp_path, 1, models={}, optimizers={"policy": optimizer})
    torch.save(torch.zeros(3), path / "optimizers" / "policy.pt")
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="optimizer 'policy' does not fit"):
        load_checkpoint(path, models={}, optimizers={"policy": optimizer})


# --------------------------------------------------------------------------- choosing one


def test_latest_intact_checkpoint_skips_and_sets_aside_corrupt_ones(tmp_path: Path, capsys) -> None:
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    flip_last_byte(second / "policy" / "model.safetensors")

    assert checkpoint_module.latest_intact_checkpoint(tmp_path) == first
    assert f"checkpoint {second} is corrupt (policy/model.safetensors checksum mismatch); " \
           f"resuming from {first}" in capsys.readouterr().err
    assert second.is_dir()  # a reader moves nothing

    assert checkpoint_module.latest_intact_checkpoint(tmp_path, set_aside=True) == first
    assert "renamed corrupt-step_000002 (kept for inspection)" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path) == first
    kept = tmp_path / "corrupt-step_000002"
    assert (kept / "policy" / "model.safetensors").is_file()

    # Saving that step again and rotating leaves the corrupt copy alone.
    save(tmp_path, 2, keep_last=1)
    save(tmp_path, 3, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt-step_000002", "step_000003"]


def test_a_second_corrupt_copy_of_a_step_is_numbered(tmp_path: Path, capsys) -> None:
    save(tmp_path, 1)
    for _ in range(2):
        flip_last_byte(save(tmp_path, 2, keep_last=None) / "rng.json")
        checkpoint_module.latest_intact_checkpoint(tmp_path, set_aside=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["corrupt-step_000002", "corrupt-step_000002-1", "step_000001"]


def test_unfinished_newer_directory_is_reported(tmp_path: Path, capsys) -> None:
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    (second / COMPLETE_MARKER).unlink()
    assert checkpoint_module.latest_intact_checkpoint(tmp_path) == first
    assert f"{second} is corrupt (no COMPLETE manifest" in capsys.readouterr().err


def test_without_fallback_a_corrupt_latest_is_refused(tmp_path: Path) -> None:
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    flip_last_byte(second / "trainer_state.json")
    with pytest.raises(CheckpointError) as caught:
        checkpoint_module.latest_intact_checkpoint(tmp_path, fallback=False, set_aside=True)
    message = str(caught.value)
    assert f"latest checkpoint {second} is corrupt (trainer_state.json checksum mismatch)" \
        in message
    assert f"the newest intact one is {first}" in message and "rename" in message
    assert second.is_dir()


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path: Path) -> None:
    for step in (1, 2):
        flip_last_byte(save(tmp_path, step) / "policy" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as caught:
        checkpoint_module.latest_intact_checkpoint(tmp_path, set_aside=True)
    assert "step_000002 (policy/model.safetensors checksum mismatch); step_000001" \
        in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002"]
    assert checkpoint_module.latest_intact_checkpoint(tmp_path / "none") is None
