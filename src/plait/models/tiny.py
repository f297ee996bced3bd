"""Tiny-model factory: a character tokenizer and a small Qwen2/Llama-style model,
saved in Hugging Face format so every loader in plait treats them like any
other local checkpoint. Used by the default job and the tests; nothing here
touches a model hub."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from plait.config import TinyModelConfig
from plait.data.tasks import CHAR_VOCAB

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# A minimal chat template for the character tokenizer (role tag, content, newline).
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] }}:{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)


def build_char_tokenizer(
    chars: str = CHAR_VOCAB, *, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character plus pad/bos/eos/unk.

    Every character is split off by the pre-tokenizer and looked up in a word
    level vocabulary; decoding concatenates without separators, so
    ``decode(encode(s)) == s`` for any string over ``chars``."""
    unique = sorted(set(chars))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in unique:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# The tiny model's shape is one of the config's sections (model.tiny): one definition
# of its fields and defaults, used by the config and by code that builds models alike.
TinyModelSpec = TinyModelConfig

TINY_ARCHS = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config,
              "mistral": MistralConfig}


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0):
    """A randomly initialised causal LM of ``spec``'s shape for ``tokenizer``'s vocabulary."""
    config_cls = TINY_ARCHS.get(spec.arch)
    if config_cls is None:
        raise ValueError(f"tiny model arch must be one of {', '.join(TINY_ARCHS)}, "
                         f"got {spec.arch!r}")
    extra = {}
    if spec.arch == "qwen3":  # per-head q/k RMSNorm; head_dim is a free setting
        extra["head_dim"] = spec.hidden_size // spec.num_heads
    if spec.arch == "mistral":
        extra["sliding_window"] = None  # full attention, as the tiny model's contexts are short
    config = config_cls(
        **extra,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None, *, seed: int = 0,
                    chat_template: str | None = None) -> Path:
    """Build the tiny tokenizer and model and save both in HF format under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(chat_template=chat_template)
    model = build_tiny_model(spec or TinyModelSpec(), tokenizer, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
