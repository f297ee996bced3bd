"""Broken model directories fail on load with one line naming the file and the fix.

Each fault starts from a tiny model saved with ``save_tiny_model`` and removes or damages
one thing: the tokenizer files, the weights, config.json. The loaders are checked
directly, then the ``plait train`` command for model.path, model.ref_path and
model.critic_path, which must exit 2 with a single ``plait: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_JOB
from safetensors.torch import load_file, save_file

from plait.cli import main
from plait.config import ConfigError
from plait.models.loading import load_causal_lm, load_critic, load_tokenizer
from plait.models.tiny import TinyModelSpec, save_tiny_model

SPEC = TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", SPEC)


def _copy(tiny_dir: Path, tmp_path: Path, fault: Callable[[Path], None]) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(tiny_dir, directory)
    fault(directory)
    return directory


def _remove(*names: str) -> Callable[[Path], None]:
    def fault(directory: Path) -> None:
        for name in names:
            (directory / name).unlink()
    return fault


def _truncate(name: str) -> Callable[[Path], None]:
    def fault(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 2])
    return fault


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    return weights


def _unsafe_pickle(directory: Path) -> None:
    """A state dict that also pickles a non-tensor object (as training scripts often
    store their arguments): torch's weights_only loading refuses it."""
    state = {**_weights(directory), "training_args": argparse.Namespace(lr=1e-5)}
    torch.save(state, directory / "pytorch_model.bin")


def _safe_pickle(directory: Path) -> None:
    torch.save(_weights(directory), directory / "pytorch_model.bin")


def _truncated_pickle(directory: Path) -> None:
    _safe_pickle(directory)
    _truncate("pytorch_model.bin")(directory)


def _missing_shard(directory: Path) -> None:
    weights = _weights(directory)
    names = sorted(weights)

    save_file({name: weights[name] for name in names[::2]},
              directory / "model-00001-of-00002.safetensors")
    weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors"
                  for i, name in enumerate(names)}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def _config(text: str) -> Callable[[Path], None]:
    return lambda directory: (directory / "config.json").write_text(text)


def _model_type(name: str) -> Callable[[Path], None]:
    def fault(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config["model_type"] = name
        (directory / "config.json").write_text(json.dumps(config))
    return fault


def _wider_config(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_size=2 * SPEC.hidden_size, intermediate_size=2 * SPEC.intermediate_size)
    (directory / "config.json").write_text(json.dumps(config))


NO_TOKENIZER = _remove("tokenizer.json", "tokenizer_config.json")
NO_WEIGHTS = _remove("model.safetensors")

# (name, fault, fragments the one-line message must hold)
WEIGHT_FAULTS = [
    ("no-weights", NO_WEIGHTS, ("no weights", "model.safetensors", "pytorch_model.bin",
                                "model.safetensors.index.json")),
    ("truncated-safetensors", _truncate("model.safetensors"),
     ("model.safetensors", "truncated or corrupt")),
    ("missing-shard", _missing_shard,
     ("model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing")),
    ("unsafe-pickle", _unsafe_pickle,
     ("pytorch_model.bin", "argparse.Namespace", "plait loads safetensors", "tensors only",
      "model.safetensors")),
    ("truncated-pickle", _truncated_pickle, ("pytorch_model.bin", "truncated or corrupt")),
    ("config-not-json", _config('{"model_type": "qwen2",'),
     ("config.json is not valid JSON",)),
    ("config-not-object", _config("[1, 2]"), ("config.json must hold a JSON object",)),
    ("config-without-model-type", _config('{"hidden_size": 32}'), ("has no model_type",)),
    ("unknown-model-type", _model_type("qwen-2"),
     ("model_type 'qwen-2'", "does not know", "did you mean 'qwen2'")),
    ("config-of-other-shape", _wider_config, ("shapes differ", "config.json")),
]


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, fault, says", WEIGHT_FAULTS, ids=[f[0] for f in WEIGHT_FAULTS])
@pytest.mark.parametrize("loader", [load_causal_lm, load_critic], ids=["policy", "critic"])
def test_broken_weights_or_config_are_named(tiny_dir, tmp_path, loader, name, fault, says):
    directory = _copy(tiny_dir, tmp_path, fault)
    with pytest.raises(ConfigError) as err:
        loader(directory)
    message = _one_line(err)
    assert str(directory) in message
    for fragment in says:
        assert fragment in message, message


def test_tokenizer_without_files_names_them(tiny_dir, tmp_path):
    directory = _copy(tiny_dir, tmp_path, NO_TOKENIZER)
    with pytest.raises(ConfigError) as err:
        load_tokenizer(directory)
    message = _one_line(err)
    assert "tokenizer is empty" in message
    assert "tokenizer.json" in message and "tokenizer_config.json" in message
    assert "save_pretrained" in message


def test_tokenizer_without_vocabulary_names_only_that(tiny_dir, tmp_path):
    directory = _copy(tiny_dir, tmp_path, _remove("tokenizer.json"))
    with pytest.raises(ConfigError) as err:
        load_tokenizer(directory)
    message = _one_line(err)
    assert "no tokenizer.json" in message and "vocab.txt" in message
    assert "tokenizer_config.json" not in message


def _save_backend(directory: Path, backend) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                            eos_token="[SEP]").save_pretrained(directory)


def _word_level(vocab: list[str], lowercase: bool = False):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(vocab)},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    return backend


def _replace_tokenizer(directory: Path) -> None:
    """Drop the tokenizer; as a llama config, so that transformers reads the tokenizer.json
    saved next (for qwen2 it rebuilds a BPE tokenizer from the vocabulary instead)."""
    NO_TOKENIZER(directory)
    _model_type("llama")(directory)


def test_tokenizer_normalising_spaces_and_symbols_is_accepted(tiny_dir, tmp_path):
    """Words joined by spaces, lower-casing and unknown symbols are not faults."""
    directory = _copy(tiny_dir, tmp_path, _replace_tokenizer)
    _save_backend(directory, _word_level(["[UNK]", "[SEP]", "12", "7", "19", "="],
                                         lowercase=True))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.decode(tokenizer("12 + 7")["input_ids"], skip_special_tokens=True) == "12 7"


def test_tokenizer_that_loses_the_text_is_refused(tiny_dir, tmp_path):
    directory = _copy(tiny_dir, tmp_path, _replace_tokenizer)
    _save_backend(directory, _word_level(["[UNK]", "[SEP]", "a", "b"]))
    with pytest.raises(ConfigError) as err:
        load_tokenizer(directory)
    message = _one_line(err)
    assert "does not round-trip" in message and "tokenizer.json" in message


def test_tokenizer_load_checks_config_json(tiny_dir, tmp_path):
    directory = _copy(tiny_dir, tmp_path, _config("{"))
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_tokenizer(directory)


def test_pickled_tensors_still_load(tiny_dir, tmp_path):
    """Pickles of tensors only are safe to load and are not refused by the checks."""
    directory = _copy(tiny_dir, tmp_path, _safe_pickle)
    model = load_causal_lm(directory)
    assert model.config.hidden_size == SPEC.hidden_size


def test_unsafe_pickle_conversion_advice_works(tiny_dir, tmp_path):
    """The command the message suggests converts the file into a directory plait loads."""
    directory = _copy(tiny_dir, tmp_path, _unsafe_pickle)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(directory / "pytorch_model.bin", weights_only=True)
    with pytest.raises(ConfigError) as err:
        load_causal_lm(directory)
    snippet = re.search(r'python -c "([^"]+)"', _one_line(err)).group(1)
    exec(snippet, {})  # the user's step on a machine where they trust the file
    model = load_causal_lm(directory)
    loaded = model.state_dict()
    for name, tensor in load_file(tiny_dir / "model.safetensors").items():
        torch.testing.assert_close(loaded[name], tensor)


def _cli_error(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("plait: error:"), err[-3000:]
    assert "Traceback" not in out + err
    return code, lines[0]


CLI_FAULTS = [
    ("no-tokenizer", NO_TOKENIZER, ("tokenizer.json", "tokenizer_config.json")),
    *[fault for fault in WEIGHT_FAULTS
      if fault[0] in ("no-weights", "truncated-safetensors", "unsafe-pickle", "config-not-json",
                      "unknown-model-type")],
]
# The reference is built only with a KL term; the critic only for PPO.
KEYS = {"model.path": [], "model.ref_path": ["algo.kl_coef=0.05"],
        "model.critic_path": ["algo.name=ppo"]}


# Only the policy's directory provides the tokenizer.
CLI_CASES = [(key, *fault) for key in KEYS for fault in CLI_FAULTS
             if key == "model.path" or fault[0] != "no-tokenizer"]


@pytest.mark.parametrize("key, name, fault, says", CLI_CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in CLI_CASES])
def test_train_with_broken_model_dir_prints_one_line(tiny_dir, tmp_path, capfd, monkeypatch,
                                                     key, name, fault, says):
    monkeypatch.chdir(tmp_path)
    directory = _copy(tiny_dir, tmp_path, fault)
    job = [o for o in TINY_JOB if key != "model.path" or not o.startswith("model.tiny.")]
    argv = ["train", *job, f"run.dir={tmp_path / 'run'}", "train.steps=1", f"{key}={directory}",
            *KEYS[key]]
    code, line = _cli_error(argv, capfd)
    assert code == 2, line
    assert str(directory) in line
    for fragment in says:
        assert fragment in line, line


def test_eval_without_tokenizer_fails_on_load(tiny_dir, tmp_path, capfd, monkeypatch):
    """Not at the first prompt, where an empty tokenizer used to give empty prompts."""
    monkeypatch.chdir(tmp_path)
    directory = _copy(tiny_dir, tmp_path, NO_TOKENIZER)
    job = [o for o in TINY_JOB if not o.startswith("model.tiny.")]
    code, line = _cli_error(["eval", *job, f"run.dir={tmp_path / 'run'}", "data.num_eval=4",
                             f"model.path={directory}"], capfd)
    assert code == 2, line
    assert "tokenizer is empty" in line and "tokenizer.json" in line


def test_the_character_tokenizer_keeps_spaces_and_newlines_through_saves(tmp_path):
    """A saved tiny model's tokenizer loads as its tokenizer.json says, not as the model
    type's own tokenizer class (Qwen2's byte-level one drops the spaces and newlines of the
    character vocabulary), also after plait saves it again with a trained model."""
    from transformers import AutoModelForCausalLM

    from plait.models.loading import save_model_dir

    text = "who is it\nthe nurse 12+7=19"  # within the character vocabulary
    first = load_tokenizer(save_tiny_model(tmp_path / "tiny"))
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and first.decode(ids) == text
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    again = load_tokenizer(save_model_dir(model, first, tmp_path / "sft_model"))
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text
