"""Generation engines behind one interface (see :mod:`plait.rollout.base`)."""

from __future__ import annotations


def build_engine(rollout_cfg, model, tokenizer, *, compile: bool):
    """The engine ``rollout.engine`` names, sharing ``model`` with the trainer;
    ``compile``: whether the plait engine compiles its decode step."""
    if rollout_cfg.engine == "hf":
        from plait.rollout.hf_engine import HFGenerateEngine

        return HFGenerateEngine(model, tokenizer, batch_size=rollout_cfg.batch_size)
    from plait.rollout.engine import PlaitEngine

    return PlaitEngine(model, tokenizer, max_batch=rollout_cfg.batch_size,
                       sync_every=rollout_cfg.sync_every,
                       compile=compile, prefill_tokens=rollout_cfg.prefill_tokens,
                       compile_prefill=compile and rollout_cfg.compile_prefill)
