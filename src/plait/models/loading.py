"""Load causal LMs, tokenizers, critics and reference models from local paths.

A model directory is checked before transformers reads it, so that a broken one fails
with one line naming the file and the fix (a ``ConfigError``) rather than a traceback
from deep inside the loader: config.json must be JSON naming a known ``model_type``,
the weight files must exist and open, pickled weights must hold tensors only, and the
tokenizer must have a vocabulary that encodes and decodes a sample prompt."""

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from plait.config import ConfigError, ModelConfig, check_local_model_path

# In the order transformers picks them: the first present is the one it loads.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# The files a tokenizer's vocabulary can come from (tokenizer_config.json names the class).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt",
               "vocab.txt")
# Digits and two symbols: in every real vocabulary, and in the tiny character tokenizer's.
TOKENIZER_PROBE = "12 + 7 = 19"


def quiet_transformers() -> None:
    """No hub access, no per-load progress bars: plait reports progress itself."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _where(path: str | Path, key: str | None) -> str:
    """How a message names a model directory: by its config key when the caller knows it."""
    return f"{key}: {str(path)!r}" if key else f"model directory {str(path)!r}"


def check_model_config(path: str | Path, key: str | None = None) -> dict:
    """config.json of the model directory ``path``, checked to be a JSON object naming a
    ``model_type`` this version of transformers knows."""
    check_local_model_path(str(path), key or "model directory")
    where, file = _where(path, key), Path(path).expanduser() / "config.json"
    try:
        config = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: config.json is not valid JSON ({err}); restore it or "
                          "save the model again with save_pretrained") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json must hold a JSON object, got "
                          f"{type(config).__name__}")
    model_type = config.get("model_type")
    if not model_type:
        raise ConfigError(f"{where}: config.json has no model_type; save the model with "
                          "save_pretrained, which writes it")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1,
                                        cutoff=0.8)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: config.json names model_type {model_type!r}, which "
                          f"transformers {transformers.__version__} does not know; {hint}"
                          "upgrade transformers or fix config.json (plait runs no custom "
                          "model code)")
    return config


def load_tokenizer(path: str | Path, key: str | None = None):
    """The tokenizer saved in ``path``, left-padded; one that cannot encode a sample
    prompt (missing vocabulary files give an empty one) is refused here rather than
    at the first prompt."""
    check_model_config(path, key)
    where = _where(path, key)
    try:
        # a tokenizer saved by the generic fast class is exactly its tokenizer.json (plait's
        # character tokenizer is one); AutoTokenizer would build the model type's own class
        # from it instead (Qwen2's byte-level one drops the character tokenizer's spaces and
        # newlines), so it is loaded by that generic class
        loader = PreTrainedTokenizerFast if _generic_tokenizer(path) else AutoTokenizer
        tokenizer = loader.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{where}: cannot load the tokenizer ({_first_line(err)}); "
                          f"{_tokenizer_files(path)}") from None
    _check_tokenizer(tokenizer, where, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _generic_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` holds a tokenizer.json saved by the generic fast tokenizer class
    (``PreTrainedTokenizerFast``, ``TokenizersBackend`` in transformers 5)."""
    directory = Path(path).expanduser()
    try:
        saved = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (directory / "tokenizer.json").is_file() and isinstance(saved, dict) and \
        saved.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _tokenizer_files(path: str | Path) -> str:
    """What ``path`` lacks of a tokenizer's files (or, if nothing, that they are broken)."""
    directory = Path(path).expanduser()
    has_config = (directory / "tokenizer_config.json").is_file()
    vocab = [name for name in VOCAB_FILES if (directory / name).is_file()]
    if has_config and vocab:
        return (f"its files (tokenizer_config.json, {', '.join(vocab)}) may be damaged; copy "
                "them again from the model's source")
    missing = [] if vocab else ["tokenizer.json (or the vocabulary files tokenizer.model, "
                                "spiece.model, vocab.json + merges.txt or vocab.txt)"]
    missing += [] if has_config else ["tokenizer_config.json"]
    return (f"the directory has no {' and no '.join(missing)}; copy the tokenizer files from "
            "the model's source or save them with tokenizer.save_pretrained(DIR)")


def _normalised(text: str) -> str:
    """Letters and digits only, case-folded: what survives any tokenizer's normalisation
    (lower-casing, spaces around symbols, unknown symbols dropped as special tokens)."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _check_tokenizer(tokenizer, where: str, path: str | Path) -> None:
    """The probe must encode to tokens that decode back to its letters and digits."""
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if not ids:
        extra = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        vocabulary = sum(1 for token in tokenizer.get_vocab() if token not in extra)
        raise ConfigError(f"{where}: the tokenizer is empty (vocabulary size {vocabulary}, "
                          f"{TOKENIZER_PROBE!r} encodes to no tokens): {_tokenizer_files(path)}")
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if _normalised(decoded) != _normalised(TOKENIZER_PROBE):
        raise ConfigError(f"{where}: the tokenizer does not round-trip {TOKENIZER_PROBE!r} "
                          f"(it decodes to {decoded!r}); {_tokenizer_files(path)}")


def weight_files(path: str | Path, key: str | None = None) -> list[Path]:
    """The weight files transformers will read from ``path``: the first of
    ``WEIGHT_FILES`` present, or the shards its index names, all of which must exist."""
    directory, where = Path(path).expanduser(), _where(path, key)
    name = next((name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if name is None:
        raise ConfigError(f"{where}: no weights found; expected one of {', '.join(WEIGHT_FILES)} "
                          "(save the model with save_pretrained, or copy its weight files)")
    if not name.endswith(".index.json"):
        return [directory / name]
    try:
        shards = sorted(set(json.loads((directory / name).read_bytes())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{where}: {name} is not a valid weight index (JSON with a "
                          "weight_map of parameter -> shard file); restore it") from None
    missing = [shard for shard in shards if not (directory / shard).is_file()]
    if missing:
        raise ConfigError(f"{where}: {name} lists shard files that are missing: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                          "copy every shard of the model")
    return [directory / shard for shard in shards]


def check_weights(path: str | Path, key: str | None = None) -> None:
    """Every weight file of ``path`` opens: safetensors headers parse and cover the file,
    pickles load with ``weights_only`` (tensors only; zip pickles are memory-mapped)."""
    where = _where(path, key)
    for file in weight_files(path, key):
        if file.suffix == ".safetensors":
            _check_safetensors(file, where)
        else:
            _check_pickle(file, where)


def _check_safetensors(file: Path, where: str) -> None:
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{where}: weights file {file.name} is truncated or corrupt "
                          f"({_first_line(err)}); copy it again or save the model again") from None


def _check_pickle(file: Path, where: str) -> None:
    mmap = zipfile.is_zipfile(file)
    try:
        torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise ConfigError(_unsafe_pickle_message(file, where, refused.group(1))) from None
        raise ConfigError(f"{where}: weights file {file.name} is corrupt or not a PyTorch "
                          "weights file; copy it again or save the model again") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(f"{where}: weights file {file.name} is truncated or corrupt "
                          f"({_first_line(err)}); copy it again or save the model again") from None


def _unsafe_pickle_message(file: Path, where: str, refused: str) -> str:
    """The refusal, and a command that keeps the tensors of every pickle in the directory
    in a model.safetensors beside them (which transformers then reads first)."""
    directory = str(file.parent)
    convert = ("import glob, torch; from safetensors.torch import save_file; sd = {}; "
               f"[sd.update(torch.load(f, weights_only=False)) for f in "
               f"sorted(glob.glob({directory + '/pytorch_model*.bin'!r}))]; "
               "save_file({k: v.contiguous().clone() for k, v in sd.items() "
               f"if isinstance(v, torch.Tensor)}}, {directory + '/model.safetensors'!r}, "
               "metadata={'format': 'pt'})")
    return (f"{where}: {file.name} pickles objects other than tensors ({refused}), and "
            "unpickling them could run arbitrary code; plait loads safetensors, or pickles of "
            "tensors only. On a machine where you trust the file, convert it with "
            f"python -c \"{convert}\" and run again (model.safetensors is read first)")


def _attention(attn_implementation: str) -> dict:
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


def load_causal_lm(path: str | Path, attn_implementation: str = "auto", key: str | None = None):
    """A causal LM with float32 parameters (the master weights; bfloat16 compute is
    applied with autocast, see ``model.dtype``). ``key`` names the config key the path
    came from in error messages."""
    return _load(AutoModelForCausalLM, path, attn_implementation, key)


def _load(auto_class, path: str | Path, attn_implementation: str, key: str | None):
    """``auto_class.from_pretrained(path)`` after checking the directory, with what
    transformers may still raise about the files turned into one line."""
    check_model_config(path, key)
    check_weights(path, key)
    try:
        return auto_class.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                          **_attention(attn_implementation))
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ConfigError(f"model.attn_implementation={attn_implementation!r}: {err}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{_where(path, key)}: cannot load the model "
                          f"({_first_line(err)})") from None
    except RuntimeError as err:
        if "mismatched_sizes" not in str(err):
            raise
        raise ConfigError(f"{_where(path, key)}: the weights' shapes differ from those "
                          "config.json gives (sizes such as hidden_size or vocab_size); the "
                          "config and the weight files must come from the same model") from None


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a reference model in place: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


class ValueModel(nn.Module):
    """A critic: a transformer backbone with a scalar value head on every position.

    ``forward`` returns ``[B, L]`` values. The head starts at zero so the first
    advantages equal the returns, the usual warm start for PPO critics."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


def load_critic(path: str | Path, attn_implementation: str = "auto",
                key: str | None = "model.critic_path") -> ValueModel:
    """Critic whose backbone starts from the weights at ``path`` (the LM head is dropped)."""
    backbone = _load(AutoModel, path, attn_implementation, key)
    return ValueModel(backbone, backbone.config.hidden_size)


def resolve_model_dir(model_cfg: ModelConfig, run_dir: Path) -> Path:
    """The directory to load the policy from, building the tiny model first if asked."""
    if model_cfg.path != "tiny":
        return Path(model_cfg.path)
    from plait.models.tiny import save_tiny_model

    out = run_dir / "tiny_model"
    if not (out / "config.json").is_file():
        save_tiny_model(out, model_cfg.tiny, seed=model_cfg.tiny.seed)
    return out


def format_prompt(tokenizer, text: str, mode: str) -> list[int]:
    """Token ids of a prompt, inside the chat template when ``mode`` asks for it."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if mode == "always" and not has_template:
        raise ConfigError("model.chat_template is 'always' but the tokenizer has no chat "
                          "template; use 'auto' or 'never', or add a template to the tokenizer")
    if mode == "always" or (mode == "auto" and has_template):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    # the tokenizer's own special tokens (BOS for Llama-style models)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


class PromptEncoder:
    """Prompt text -> token ids (the chat template applied per model.chat_template),
    remembered: the same prompts come back every epoch."""

    def __init__(self, tokenizer, chat_template):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = format_prompt(self.tokenizer, text, self.chat_template)
            self._cache[text] = ids
        return ids


def save_model_dir(model, tokenizer, out: str | Path) -> Path:
    """Save ``model`` and ``tokenizer`` as a Hugging Face directory at ``out``, written
    beside it first and moved into place, so ``out`` is never left half written."""
    import os
    import shutil

    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
