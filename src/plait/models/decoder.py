"""The parts of a Llama-style HF decoder that plait drives layer by layer.

plait's generation engine and the packed teacher-forced forward
(:mod:`plait.train.forward`) run a model's own modules with masks and positions of their
own making: embedding, decoder layers, final norm, head. This is exactly the forward of
the families below; other models (scaled embeddings or logits, soft-capping, attention
kernels that take no explicit mask) are refused with a ``ValueError``.
"""

from __future__ import annotations

import torch

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


def attention_mask(visible: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """The mask a decoder layer takes for a boolean ``visible`` (True = may attend):
    sdpa takes it as is; eager attention adds it (0 or the dtype's min)."""
    if config._attn_implementation == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device
                       ).masked_fill_(~visible, torch.finfo(dtype).min)
