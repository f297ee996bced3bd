"""The HF reference engine: grouping, finish reasons, and log-probs that match a
teacher-forced forward pass of the same weights."""

import torch

from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model
from plait.rollout.base import SamplingParams
from plait.rollout.hf_engine import HFGenerateEngine
from plait.train.experience import experience_from_completions
from plait.train.forward import response_logprobs

SPEC = TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1)


def setup():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(SPEC, tokenizer, seed=3).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ("1+2=", "37+85=", "a*3=")]
    return tokenizer, model, prompts


def test_groups_finish_reasons_and_logprobs_match_forward():
    tokenizer, model, prompts = setup()
    engine = HFGenerateEngine(model, tokenizer, return_logprobs=True)
    torch.manual_seed(0)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20)
    groups = engine.generate(prompts, params, n=4)
    assert [len(g) for g in groups] == [4, 4, 4]
    for index, group in enumerate(groups):
        for c in group:
            assert c.prompt_index == index
            assert len(c.token_ids) == len(c.logprobs) <= 8
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == tokenizer.eos_token_id
            else:
                assert len(c.token_ids) == 8
    batch = experience_from_completions(prompts, groups, [0, 1, 2], tokenizer.pad_token_id)
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the sampler draws from top-k filtered logits / T; the forward pass uses logits / T.
    # Sampled tokens lie in the top-k set, so the two agree up to the renormalisation
    # over the kept tokens; with top-k off they must agree exactly.
    torch.manual_seed(0)
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.7), n=4)
    batch = experience_from_completions(prompts, groups, [0, 1, 2], tokenizer.pad_token_id)
    with torch.no_grad():
        forward = response_logprobs(model, batch, temperature=0.7)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(forward[mask], batch.sampled_logprobs[mask], atol=1e-5, rtol=1e-5)


def test_greedy_matches_hf_generate():
    tokenizer, model, prompts = setup()
    engine = HFGenerateEngine(model, tokenizer, return_logprobs=True)
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    for prompt, (completion,) in zip(prompts, groups, strict=False):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        expected = out[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert completion.token_ids == expected


def test_experience_micro_batches_trim_padding():
    tokenizer, model, prompts = setup()
    engine = HFGenerateEngine(model, tokenizer, return_logprobs=True)
    torch.manual_seed(1)
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=8), n=2)
    batch = experience_from_completions(prompts, groups, [0, 1, 2], tokenizer.pad_token_id)
    parts = batch.micro_batches(2)
    assert sum(p.batch_size for p in parts) == batch.batch_size
    for part in parts:
        assert part.prompt_mask[:, 0].any()  # no all-padding leading column
        assert part.response_mask[:, -1].any()  # no all-padding trailing column
    # log-probs computed per micro-batch equal those of the whole batch
    with torch.no_grad():
        whole = response_logprobs(model, batch)
        pieces = [response_logprobs(model, p) for p in parts]
    row = 0
    for part, lp in zip(parts, pieces, strict=False):
        width = lp.shape[1]
        m = part.response_mask.bool()
        torch.testing.assert_close(lp[m], whole[row:row + part.batch_size, :width][m],
                                   atol=1e-5, rtol=1e-5)
        row += part.batch_size


def test_kv_cache_is_released_after_generation_when_asked(tiny_job, reward_spec):
    """The hybrid engine frees its KV cache for training (default on CUDA only; asked
    for here on the CPU) and rebuilds it at the next generation with the same results."""
    from plait.config import load_config
    from plait.recipes.rl import RLTrainer
    from plait.telemetry.timing import StageTimer

    batches = {}
    for release in ("true", "false"):
        trainer = RLTrainer(load_config(None, [
            *tiny_job, f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
            f"rollout.release_kv_cache={release}"]))
        try:
            first, _ = trainer.source.collect(0, StageTimer())
            assert bool(trainer.engine.slots.keys) == (release == "false")
            second, _ = trainer.source.collect(0, StageTimer())
            batches[release] = (first, second)
        finally:
            trainer.close()
    for a, b in zip(batches["true"], batches["false"], strict=True):
        assert torch.equal(a.response_ids, b.response_ids)


def test_rollout_workers_keep_their_kv_cache(tiny_job, reward_spec):
    """Nothing trains in a rollout worker's process: rollout.release_kv_cache does not
    free its cache between batches."""
    from plait.config import load_config
    from plait.runtime.generation import sampling_params
    from plait.runtime.rollout_worker import RolloutWorker

    worker = RolloutWorker(load_config(None, [
        *tiny_job, f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
        "rollout.release_kv_cache=true"]))
    try:
        worker.generator.rollout(worker.draw_rows(), sampling_params(worker.config), 2)
        assert worker.generator.engine.slots.keys
    finally:
        worker.close()
