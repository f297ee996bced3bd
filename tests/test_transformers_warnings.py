"""plait's own calls into transformers raise no deprecation warnings.

transformers renames arguments from time to time (``past_key_values`` became ``cache``)
and warns on every call that uses an old name: a FutureWarning per decoder layer per
generation step, which a user would see scroll past for calls they never wrote. Each
tiny architecture is saved in Hugging Face format and loaded as a user's model is, then
driven through everything plait calls it with: loading, plait's engine (the decoder
layers run one by one with plait's KV cache), HF ``generate``, the teacher-forced
forwards (full rows, a shared prompt's cache, packed groups) and the critic.
"""

from __future__ import annotations

import logging
import warnings

import pytest
from transformers.utils import logging as hf_logging

from plait.models.loading import load_causal_lm, load_critic, load_tokenizer
from plait.models.tiny import TINY_ARCHS, TinyModelSpec, save_tiny_model
from plait.rollout.base import SamplingParams
from plait.rollout.engine import PlaitEngine
from plait.rollout.hf_engine import HFGenerateEngine
from plait.train.experience import experience_from_completions
from plait.train.forward import response_logits, response_values

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@pytest.fixture
def transformers_log():
    """What transformers logs at warning level while the test runs; its once-per-process
    messages are reset first, so an earlier test cannot have used them up."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library = logging.getLogger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.warning_once.cache_clear()
    library.addHandler(handler)
    yield records
    library.removeHandler(handler)
    hf_logging.set_verbosity(verbosity)


def _drive(model_dir):
    """Every kind of call plait makes into a user's model."""
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    critic = load_critic(model_dir)
    prompts = [tokenizer.encode(text) for text in ("12+7=", "3+45=")]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)  # every response 4 tokens
    groups = PlaitEngine(model, tokenizer).generate(prompts, params, n=3)
    hf = HFGenerateEngine(model, tokenizer, return_logprobs=True)
    hf.generate(prompts, params, n=2)
    hf.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0, stop=("=",)))
    batch = experience_from_completions(prompts, groups, [0, 1], tokenizer.pad_token_id)
    for share, pack in ((False, 0), (True, 0), (True, 2048)):
        response_logits(model, batch, 0.7, share_prompts=share, pack_tokens=pack)
    response_values(critic, batch)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_plait_calls_raise_no_deprecation_warnings(arch, tmp_path, transformers_log):
    model_dir = save_tiny_model(tmp_path / "model", TinyModelSpec(
        arch=arch, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        num_kv_heads=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _drive(model_dir)
    raised = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                     if issubclass(w.category, DEPRECATIONS)})
    assert not raised, "\n".join(raised)
    logged = sorted({r.getMessage() for r in transformers_log
                     if "deprecat" in r.getMessage().lower()})
    assert not logged, "\n".join(logged)
