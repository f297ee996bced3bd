"""Load causal LMs, tokenizers, critics and reference models from local paths."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from plait.config import ConfigError, ModelConfig, check_local_model_path


def quiet_transformers() -> None:
    """No hub access, no per-load progress bars: plait reports progress itself."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(path: str | Path):
    check_local_model_path(str(path), "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _attention(attn_implementation: str) -> dict:
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


def load_causal_lm(path: str | Path, attn_implementation: str = "auto"):
    """A causal LM with float32 parameters (the master weights; bfloat16 compute is
    applied with autocast, see ``model.dtype``)."""
    check_local_model_path(str(path), "model")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                    local_files_only=True,
                                                    **_attention(attn_implementation))
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ConfigError(f"model.attn_implementation={attn_implementation!r}: {err}") from None


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


def load_critic(path: str | Path, attn_implementation: str = "auto") -> ValueModel:
    """Critic whose backbone starts from the weights at ``path`` (the LM head is dropped)."""
    check_local_model_path(str(path), "critic")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                         **_attention(attn_implementation))
    return ValueModel(backbone, config.hidden_size)


def resolve_model_dir(model_cfg: ModelConfig, run_dir: Path) -> Path:
    """The directory to load the policy from, building the tiny model first if asked."""
    if model_cfg.path != "tiny":
        return Path(model_cfg.path)
    from plait.models.tiny import TinyModelSpec, save_tiny_model

    out = run_dir / "tiny_model"
    if not (out / "config.json").is_file():
        t = model_cfg.tiny
        spec = TinyModelSpec(arch=t.arch, hidden_size=t.hidden_size,
                             intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                             num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                             max_position_embeddings=t.max_position_embeddings)
        save_tiny_model(out, spec, seed=t.seed)
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
