"""The parts of a Llama-style HF decoder that plait drives layer by layer.

plait's generation engine and the packed teacher-forced forward
(:mod:`plait.train.forward`) run a model's own modules with masks and positions of their
own making: embedding, decoder layers, final norm, head. This is exactly the forward of
the families below; other models (scaled embeddings or logits, soft-capping, attention
kernels that take no explicit mask) are refused with a ``ValueError``.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.modeling_utils import AttentionInterface

# Model families whose forward is exactly: embed -> decoder layers -> norm -> lm_head.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe",
                         "mixtral")
# Config settings that change the forward beyond those parts (scaled embeddings or
# logits, soft-capping).
_UNSUPPORTED_SETTINGS = ("logit_scale", "logits_scaling", "embedding_multiplier",
                         "final_logit_softcapping", "attn_logit_softcapping")
# Families with one mask for every layer (sliding everywhere when a window is set).
_ONE_MASK_FAMILIES = ("mistral", "mixtral", "qwen3_moe")


def decoder_parts(model, hint: str = "; use rollout.engine=hf"):
    """``(base, lm_head)`` of a supported causal LM; ``ValueError`` (ending in ``hint``)
    for any other."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"plait's engine supports the {', '.join(SUPPORTED_MODEL_TYPES)} "
                         f"families, not {config.model_type!r}{hint}")
    for name in _UNSUPPORTED_SETTINGS:
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(f"the model's config sets {name}, which plait's engine does not "
                             f"apply{hint}")
    if config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"plait's engine drives 'sdpa' or 'eager' attention, the model uses "
                         f"{config._attn_implementation!r}{hint}")
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or not all(hasattr(base, name) for name in needed):
        raise ValueError(f"{type(model).__name__} is not a Llama-style decoder (needs "
                         f"model.embed_tokens, layers, norm, rotary_emb){hint}")
    return base, model.get_output_embeddings()


def sliding_layers(config) -> tuple[int | None, list[bool]]:
    """The attention window and which decoder layers slide, by HF's rules: families with
    one mask for all layers (Mistral, Mixtral, Qwen3-MoE) slide everywhere when
    ``sliding_window`` is set; the others follow ``layer_types``."""
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    if not window or not getattr(config, "use_sliding_window", True):
        return None, [False] * layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types and config.model_type not in _ONE_MASK_FAMILIES:
        slides = [kind == "sliding_attention" for kind in layer_types]
    else:
        slides = [True] * layers
    return (window, slides) if any(slides) else (None, slides)


def cache_keyword(module) -> str:
    """The keyword ``module``'s forward takes its KV cache by: ``cache`` in transformers
    versions that renamed it, ``past_key_values`` before. Newer versions still accept the
    old name but warn (a FutureWarning) on every call, which a user would see on every
    generation step; a model output holds its cache under the same name."""
    return _cache_keyword(type(module).forward)


@functools.cache
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def attention_mask(visible: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """The mask a decoder layer takes for a boolean ``visible`` (True = may attend):
    sdpa and the decode attention take it as is; eager attention adds it (0 or the
    dtype's min)."""
    if config._attn_implementation in ("sdpa", DECODE_ATTENTION):
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device
                       ).masked_fill_(~visible, torch.finfo(dtype).min)


# ---------------------------------------------------------------------- decode attention

DECODE_ATTENTION = "plait_decode"


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor, scaling: float | None = None, **kwargs
                     ) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row over that row's keys, written as products and
    sums: compiled, each layer's attention becomes two fused loops over (row, head, key)
    instead of one fused-attention kernel call per (row, head) problem, which dominates
    on the CPU when every problem is a single query over a few hundred keys.

    Args:
        query: [rows, heads, 1, head_dim]; key, value: [rows, kv_heads, keys, head_dim]
            (query head ``h`` reads key/value head ``h // (heads // kv_heads)``, as HF's
            ``repeat_kv``).
        attention_mask: boolean [rows, 1, 1, keys], True = may attend.
    Returns:
        ``([rows, 1, heads, head_dim], None)``, the layout HF's attention functions return.
    Any other query length goes to HF's sdpa attention with the same mask.
    """
    rows, heads, length, dim = query.shape
    if length != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.view(rows, kv_heads, heads // kv_heads, 1, dim)
    scores = (q * key.unsqueeze(2)).sum(-1) * scale                 # [rows, kv, group, keys]
    scores = scores.masked_fill(~attention_mask.unsqueeze(1)[:, :, :, 0], -torch.inf)
    # the softmax in at least float32 (as HF's eager attention)
    weights = torch.softmax(scores, dim=-1,
                            dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(value.dtype)
    out = (weights.unsqueeze(-1) * value.unsqueeze(2)).sum(-2)      # [rows, kv, group, dim]
    return out.view(rows, 1, heads, dim), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def swap_attention_implementation(config, name: str) -> tuple[str, str]:
    """Set the model's attention implementation to ``name``; returns what
    :func:`restore_attention_implementation` needs to undo it."""
    # the property's setter walks sub-configs, at every decode step; a decoder has none,
    # so the value behind it is set directly when transformers keeps one
    attribute = "_attn_implementation_internal"
    if attribute not in vars(config) or getattr(config, "sub_configs", None):
        attribute = "_attn_implementation"
    before = config._attn_implementation
    setattr(config, attribute, name)
    return attribute, before


def restore_attention_implementation(config, swapped: tuple[str, str]) -> None:
    attribute, before = swapped
    setattr(config, attribute, before)


def compile_failure(err: Exception, key: str, what: str) -> RuntimeError:
    """The error to raise when torch.compile fails on ``what`` under setting ``key``: the
    backend's own first line and how to turn compiling off."""
    cause = getattr(err, "inner_exception", None) or err  # a backend's own error
    lines = str(cause).strip().splitlines()
    return RuntimeError(
        f"{key}: torch.compile could not compile {what} ({type(cause).__name__}: "
        f"{lines[0] if lines else ''}); set {key}=false (compiling needs a C++ compiler on "
        "the CPU, Triton on a GPU)")
