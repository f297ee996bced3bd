"""plait's continuous-batching engine: exact against HF generate and a teacher-forced
forward, streaming, refill, abort/resume and per-request seeds."""

import shutil

import pytest
import torch

from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model
from plait.rollout.base import SamplingParams
from plait.rollout.engine import PlaitEngine
from plait.rollout.hf_engine import HFGenerateEngine
from plait.train.experience import experience_from_completions

PROMPTS = ("1+2=", "37+85=", "a*3=", "99+1=", "zz", "5", "12+34=", "c*10=")


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2,
                                           num_heads=4, num_kv_heads=2), tokenizer, seed=3).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return tokenizer, model, prompts


def early_stopping(engine, tokenizer):
    """Make a frequent character end responses, so rows finish at different steps."""
    engine.end_ids = sorted({*engine.end_ids, tokenizer.convert_tokens_to_ids("1"),
                             tokenizer.convert_tokens_to_ids("a")})
    return engine


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral"])
@pytest.mark.parametrize("slots", [3, 8])
def test_greedy_equals_hf_generate(arch, slots):
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(arch=arch, hidden_size=64, intermediate_size=128,
                                           num_layers=2, num_heads=4, num_kv_heads=2),
                             tokenizer, seed=5).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    ours = PlaitEngine(model, tokenizer, max_batch=slots).generate(prompts, params)
    reference = HFGenerateEngine(model, tokenizer).generate(prompts, params)
    for a, b in zip(ours, reference, strict=True):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].finish_reason == b[0].finish_reason


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(temperature=1.3, top_k=7),
                                      dict(temperature=1.0, top_p=0.8)])
def test_logprobs_match_teacher_forced_forward(setup, sampling):
    tokenizer, model, prompts = setup
    engine = early_stopping(PlaitEngine(model, tokenizer, max_batch=5), tokenizer)
    torch.manual_seed(0)
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=16, **sampling), n=3)
    lengths = {len(c.token_ids) for g in groups for c in g}
    assert len(lengths) > 2  # rows finished at different steps
    batch = experience_from_completions(prompts, groups, list(range(len(prompts))),
                                        tokenizer.pad_token_id)
    with torch.no_grad():
        logits = _forward_logits(model, batch, sampling["temperature"])
    mask = batch.response_mask.bool()
    if "top_k" not in sampling and "top_p" not in sampling:
        expected = torch.log_softmax(logits, -1).gather(
            -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(batch.sampled_logprobs[mask], expected[mask],
                                   atol=1e-5, rtol=1e-5)
    else:  # under filtering, the reported log-prob is of the renormalised distribution
        plain = torch.log_softmax(logits, -1).gather(
            -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        assert (batch.sampled_logprobs[mask] >= plain[mask] - 1e-5).all()
        assert (batch.sampled_logprobs[mask] <= 1e-6).all()


def _forward_logits(model, batch, temperature):
    from plait.train.forward import response_logits

    return response_logits(model, batch, temperature)


def test_groups_stream_as_they_finish_and_refill(setup):
    tokenizer, model, prompts = setup
    engine = early_stopping(PlaitEngine(model, tokenizer, max_batch=4), tokenizer)
    torch.manual_seed(1)
    engine.submit(prompts, SamplingParams(max_new_tokens=24, temperature=1.0), n=2)
    seen = []
    for index, group in engine.stream():
        assert len(group) == 2 and all(c.prompt_index == index for c in group)
        seen.append(index)
    assert sorted(seen) == list(range(len(prompts)))
    assert not engine._running and not engine._waiting


def test_seeded_requests_do_not_depend_on_batch_company(setup):
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    alone = PlaitEngine(model, tokenizer, max_batch=2)
    alone.submit(prompts[:1], params, n=2, seeds=[42])
    alone_out = dict(alone.stream())[0]
    crowd = PlaitEngine(model, tokenizer, max_batch=6)
    crowd.submit(prompts, params, n=2, seeds=[42] + list(range(1, len(prompts))))
    crowd_out = dict(crowd.stream())[0]
    assert [c.token_ids for c in alone_out] == [c.token_ids for c in crowd_out]


def _aborted_then_resumed(engine, count, before_resume=None) -> dict:
    """Stream, abort once the second group is in (some are left), run ``before_resume``,
    resume: every group, by prompt index."""
    results = {}
    for seen, (index, group) in enumerate(engine.stream()):
        results[index] = group
        if seen == 1:
            engine.abort()
    assert len(results) < count
    if before_resume is not None:
        before_resume()
    results.update(dict(engine.resume()))
    return results


def test_abort_then_resume_equals_uninterrupted_greedy(setup):
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=18, temperature=0.0)
    straight = PlaitEngine(model, tokenizer, max_batch=3).generate(prompts, params)
    engine = PlaitEngine(model, tokenizer, max_batch=3)
    engine.submit(prompts, params)
    results = _aborted_then_resumed(engine, len(prompts),
                                    lambda: engine.update_weights(None, version=7))
    for index, group in enumerate(straight):
        assert results[index][0].token_ids == group[0].token_ids


def test_weight_update_in_place_and_release(setup):
    tokenizer, model, prompts = setup
    model = build_tiny_model(TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2,
                                           num_heads=4, num_kv_heads=2), tokenizer, seed=9).eval()
    engine = PlaitEngine(model, tokenizer, max_batch=4)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(prompts, params)
    other = build_tiny_model(TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2,
                                           num_heads=4, num_kv_heads=2), tokenizer, seed=10)
    engine.release()
    engine.update_weights(other.state_dict(), version=3)
    after = engine.generate(prompts, params)
    expected = HFGenerateEngine(other.eval(), tokenizer).generate(prompts, params)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in expected]
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    assert all(g[0].policy_version == 3 for g in after)


def test_paused_stream_continues_without_recomputing(setup):
    """stream(pause): the running rows stay in their slots across the pause (no prefill
    again), a batch submitted meanwhile under its own indices joins them, and every
    seeded completion equals the one of an uninterrupted engine."""
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=20, temperature=1.0)
    straight = early_stopping(PlaitEngine(model, tokenizer, max_batch=6), tokenizer)
    straight.submit(prompts[:4], params, n=2, seeds=[1, 2, 3, 4])
    straight.submit(prompts[4:], params, n=2, seeds=[5, 6, 7, 8], first_index=4)
    expected = dict(straight.stream())
    engine = early_stopping(PlaitEngine(model, tokenizer, max_batch=6), tokenizer)
    prefilled = []
    original = engine.slots.prefill
    engine.slots.prefill = lambda contexts, *args: prefilled.extend(contexts) or \
        original(contexts, *args)
    engine.submit(prompts[:4], params, n=2, seeds=[1, 2, 3, 4])
    runs = []
    got = dict(engine.stream(lambda: runs.append(1) or len(runs) > 3))
    assert engine.busy and len(got) < 4  # paused with rows running
    engine.submit(prompts[4:], params, n=2, seeds=[5, 6, 7, 8], first_index=4)
    got.update(engine.stream())
    assert sorted(got) == list(range(len(prompts)))
    for index, group in expected.items():
        assert sorted(c.token_ids for c in got[index]) == sorted(c.token_ids for c in group)
    # only prompts were prefilled: no row re-prefilled its generated tokens after the pause
    assert {tuple(c) for c in prefilled} <= {tuple(p) for p in prompts}


def test_new_weights_mid_generation_reprefill_the_running_rows(setup):
    """update_weights while rows are running (a paused stream): they keep their tokens,
    are re-prefilled, and every later token is sampled from the new weights: the
    log-probs of the tokens before the switch match a teacher-forced pass of the old
    weights, those after it one of the new weights; greedy rows continue as the new
    weights' greedy continuation of what they had."""
    tokenizer, model, prompts = setup
    spec = TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    old = build_tiny_model(spec, tokenizer, seed=11).eval()
    new = build_tiny_model(spec, tokenizer, seed=12).eval()
    model = build_tiny_model(spec, tokenizer, seed=11).eval()
    engine = PlaitEngine(model, tokenizer, max_batch=8)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9)
    engine.submit(prompts[:4], sampled, seeds=[1, 2, 3, 4])
    engine.submit(prompts[4:], SamplingParams(max_new_tokens=16, temperature=0.0),
                  first_index=4)
    runs = []
    done = dict(engine.stream(lambda: runs.append(1) or len(runs) > 5))
    cut = {r.prompt_index: len(r.tokens) for r in engine._running}
    assert cut and all(0 < t < 16 for t in cut.values())
    engine.update_weights(new.state_dict(), version=1)
    done.update(engine.stream())
    for index in cut:
        completion = done[index][0]
        assert completion.policy_version == 0  # the version its first token came from
        batch = experience_from_completions([prompts[index]], [[completion]], [0],
                                            tokenizer.pad_token_id)
        temperature = 0.9 if index < 4 else 1.0
        with torch.no_grad():
            per_model = [torch.log_softmax(_forward_logits(m, batch, temperature), -1)
                         .gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)[0]
                         for m in (old, new)]
        reported = torch.tensor(completion.logprobs)
        t = cut[index]
        n = len(completion.token_ids)
        torch.testing.assert_close(reported[:t], per_model[0][:t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reported[t:], per_model[1][t:n], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(per_model[0][t:n], per_model[1][t:n], atol=1e-3)
    for index in (i for i in cut if i >= 4):  # greedy: the new weights' continuation
        head = done[index][0].token_ids[:cut[index]]
        rest = HFGenerateEngine(new, tokenizer).generate(
            [prompts[index] + head],
            SamplingParams(max_new_tokens=16 - cut[index], temperature=0.0))[0][0]
        assert done[index][0].token_ids[cut[index]:] == rest.token_ids


def test_prefill_token_budget_admits_over_several_steps(setup):
    """prefill_tokens bounds (distinct contexts x longest) per prefill, re-prefills after a
    weight update included; the completions are those of an unbounded engine."""
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=20, temperature=1.0)

    def run(budget):
        engine = PlaitEngine(model, tokenizer, max_batch=8, prefill_tokens=budget)
        sizes = []
        original = engine.slots.prefill
        engine.slots.prefill = lambda contexts, *args: sizes.append(
            len(contexts) * max(len(c) for c in contexts)) or original(contexts, *args)
        engine.submit(prompts, params, seeds=list(range(len(prompts))))
        runs = []
        out = dict(engine.stream(lambda: runs.append(1) or len(runs) > 6))
        engine.update_weights(None, version=1)  # the running rows re-prefill their tails
        out.update(engine.stream())
        return out, sizes

    free, free_sizes = run(1 << 20)
    bounded, sizes = run(24)
    assert max(free_sizes) > 24 and max(sizes) <= 24 and len(sizes) > len(free_sizes)
    assert {i: g[0].token_ids for i, g in bounded.items()} == \
        {i: g[0].token_ids for i, g in free.items()}


def test_groups_are_not_lost_when_the_consumer_stops_early(setup):
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    engine = PlaitEngine(model, tokenizer, max_batch=4)
    engine.submit(prompts, params)
    seen = {}
    for index, group in engine.stream():
        seen[index] = group
        break  # e.g. an exception in the consumer
    seen.update(dict(engine.resume()))
    assert sorted(seen) == list(range(len(prompts)))
    straight = PlaitEngine(model, tokenizer, max_batch=4).generate(prompts, params)
    assert [seen[i][0].token_ids for i in range(len(prompts))] == \
        [g[0].token_ids for g in straight]


def test_models_the_engine_cannot_run_exactly_are_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = build_char_tokenizer()
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32,
                                                       n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="rollout.engine=hf"):
        PlaitEngine(gpt2, tokenizer)
    llama = build_tiny_model(TinyModelSpec(arch="llama", hidden_size=32, intermediate_size=64,
                                           num_layers=1, num_heads=2, num_kv_heads=1), tokenizer)
    llama.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        PlaitEngine(llama, tokenizer)


def test_top_p_one_rows_are_not_filtered_beside_filtered_rows():
    from plait.rollout.sampling import filter_top_k_top_p

    torch.manual_seed(0)
    logits = torch.randn(2, 5000) * 3
    out = filter_top_k_top_p(logits, [0, 3], [1.0, 1.0], torch.tensor([False, False]))
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).sum() == 3
    tied = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    kept = filter_top_k_top_p(tied, [1], [1.0], torch.tensor([False]))
    assert torch.isfinite(kept).tolist() == [[True, False, True, False]]  # ties at k kept


def test_stop_strings_end_the_completion(setup):
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    free = PlaitEngine(model, tokenizer, max_batch=3).generate(prompts, params)
    texts = [g[0].text for g in free]
    stop = next(t[2:4] for t in texts if len(t) >= 4)  # a string some completion produces
    stopped = PlaitEngine(model, tokenizer, max_batch=3).generate(
        prompts, SamplingParams(max_new_tokens=20, temperature=0.0, stop=(stop,)))
    for full, (completion,) in zip(texts, stopped, strict=True):
        if stop in full:
            assert completion.finish_reason == "stop"
            assert completion.text == full[: full.index(stop)]
            assert tokenizer.decode(completion.token_ids).endswith(stop)
        else:
            assert completion.text == full


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sliding_window_attention_equals_hf_generate(arch, attention):
    """A window of 5 positions, far shorter than prompt + 24 new tokens: the engine's
    masks give HF generate's greedy tokens (Mistral slides everywhere; Qwen2/Qwen3 only on
    the layers ``layer_types`` names), and sampled log-probs match a teacher-forced
    forward (HF's own sliding masks)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

    tokenizer = build_char_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "mistral":
        config = MistralConfig(sliding_window=5, **common)
    else:
        kind = Qwen3Config if arch == "qwen3" else Qwen2Config
        config = kind(sliding_window=5, use_sliding_window=True, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention", "full_attention"],
                      **common)
    config._attn_implementation = attention
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = PlaitEngine(model, tokenizer, max_batch=3)
    assert engine.slots.window == 5
    assert engine.slots.sliding == ([True] * 3 if arch == "mistral" else [False, True, False])
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    ours = engine.generate(prompts, params)
    reference = HFGenerateEngine(model, tokenizer).generate(prompts, params)
    for a, b in zip(ours, reference, strict=True):
        assert a[0].token_ids == b[0].token_ids
    assert sum(len(g[0].token_ids) > 5 for g in ours) >= 4  # most rows outgrew the window
    # the full-attention model would have generated something else
    unslid = PlaitEngine(model, tokenizer, max_batch=3)
    unslid.slots.window, unslid.slots.sliding = None, [False] * 3
    assert [g[0].token_ids for g in unslid.generate(prompts, params)] != \
        [g[0].token_ids for g in ours]
    torch.manual_seed(0)
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.9), n=2)
    batch = experience_from_completions(prompts, groups, list(range(len(prompts))),
                                        tokenizer.pad_token_id)
    assert batch.response_mask.sum(-1).max() > 5
    with torch.no_grad():
        logits = _forward_logits(model, batch, 0.9)
    expected = torch.log_softmax(logits, -1).gather(
        -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(batch.sampled_logprobs[mask], expected[mask],
                               atol=1e-5, rtol=1e-5)


def _mixed_batch(engine, prompts):
    """Greedy, seeded temperature, seeded top-k and top-p requests in one batch."""
    engine.submit(prompts[:3], SamplingParams(max_new_tokens=14, temperature=0.0))
    engine.submit(prompts[3:5], SamplingParams(max_new_tokens=9, temperature=0.8), n=2,
                  seeds=[5, 6])
    engine.submit(prompts[5:], SamplingParams(max_new_tokens=16, temperature=1.2, top_k=6,
                                              top_p=0.9), n=3, seeds=[7, 8, 9])


@pytest.mark.parametrize("sync_every", [2, 5, 32])
def test_decode_runs_between_host_syncs_give_the_same_completions(setup, sync_every):
    """Tokens brought to the host every k steps: rows stopping inside a run are cut at
    their stop, slots refill at the next sync, and every greedy and seeded completion
    (tokens, log-probs, finish reason) equals the step-by-step one, with fewer syncs."""
    tokenizer, model, prompts = setup
    results, runs = {}, {}
    for k in (1, sync_every):
        engine = early_stopping(PlaitEngine(model, tokenizer, max_batch=5, sync_every=k),
                                tokenizer)
        calls = []
        original = engine._decode_run
        engine._decode_run = lambda original=original, calls=calls: calls.append(1) or \
            original()
        _mixed_batch(engine, prompts)
        results[k] = sorted(((c.prompt_index, c.token_ids, c.finish_reason, c.logprobs)
                             for _, group in engine.stream() for c in group),
                            key=lambda x: (x[0], x[1]))
        runs[k] = len(calls)
    one, many = results[1], results[sync_every]
    assert len({len(c[1]) for c in one}) > 3  # rows finished at many different steps
    assert {c[2] for c in one} == {"stop", "length"}
    assert [c[:3] for c in many] == [c[:3] for c in one]
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(torch.tensor(b[3]), torch.tensor(a[3]), atol=1e-5,
                                   rtol=1e-5)
    assert runs[sync_every] < runs[1]


def test_decode_runs_keep_stop_strings_abort_and_resume(setup):
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    free = PlaitEngine(model, tokenizer, max_batch=3).generate(prompts, params)
    stop = next(g[0].text[2:4] for g in free if len(g[0].text) >= 4)
    stopped = SamplingParams(max_new_tokens=20, temperature=0.0, stop=(stop,))
    one = PlaitEngine(model, tokenizer, max_batch=3).generate(prompts, stopped)
    engine = PlaitEngine(model, tokenizer, max_batch=3, sync_every=6)
    engine.submit(prompts, stopped)
    results = _aborted_then_resumed(engine, len(prompts))
    assert any(g[0].finish_reason == "stop" and stop in free[i][0].text
               for i, g in enumerate(one))
    for index, group in enumerate(one):
        assert results[index][0].token_ids == group[0].token_ids
        assert results[index][0].text == group[0].text
        assert results[index][0].finish_reason == group[0].finish_reason
    with pytest.raises(ValueError, match="sync_every"):
        PlaitEngine(model, tokenizer, sync_every=0)


def test_ignore_eos_runs_every_row_to_its_limit(setup):
    tokenizer, model, prompts = setup
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    reference = HFGenerateEngine(model, tokenizer).generate(prompts, params)
    assert all(len(g[0].token_ids) == 12 and g[0].finish_reason == "length"
               for g in reference)
    # a token some row generates early becomes an end token: rows stop there, unless EOS
    # is ignored
    engine = PlaitEngine(model, tokenizer, max_batch=4, sync_every=3)
    engine.end_ids = [*engine.end_ids, reference[0][0].token_ids[2]]
    stopping = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert stopping[0][0].finish_reason == "stop" and len(stopping[0][0].token_ids) <= 3
    ours = engine.generate(prompts, params)
    assert [g[0].token_ids for g in ours] == [g[0].token_ids for g in reference]
    assert all(g[0].finish_reason == "length" for g in ours)
    # HF generate must ignore an EOS the model's own generation config names, too
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = reference[0][0].token_ids[2]
    try:
        hf = HFGenerateEngine(model, tokenizer)
        assert len(hf.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0)
                               )[0][0].token_ids) <= 3
        assert [g[0].token_ids for g in hf.generate(prompts, params)] == \
            [g[0].token_ids for g in reference]
    finally:
        model.generation_config.eos_token_id = saved


def test_gpu_generation_benchmark_runs_at_a_tiny_shape(tmp_path):
    """The GPU benchmark's smoke run on CPU: both engines generate every row's target and
    the JSON carries the ratios and the decode figures."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_generation.py"
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu",
                           "--samples", "8", "--prompt-len", "8", "--max-new-tokens", "40",
                           "--median-new-tokens", "6", "--min-new-tokens", "2",
                           "--sync-every", "1", "4", "--repeats", "1", "--decode-steps", "4",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["ratios_over_hf"]) == {"plait_sync_every_1", "plait_sync_every_4"}
    assert result["targets"]["max"] > result["targets"]["min"]
    assert result["decode"]["step_ms"] > 0 and result["decode"]["weight_bytes"] > 0


needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler")


def _draw_modes(engine) -> set[bool]:
    """Record which graphs of the compiled step (``sample`` on or off) the engine calls."""
    modes, compiled = set(), engine.slots.compiled

    def step(*args, sample, **kwargs):
        modes.add(sample)
        return compiled(*args, sample=sample, **kwargs)

    engine.slots.compiled = step
    return modes


@needs_cxx
def test_compiled_decode_equals_eager_decode_without_recompiling(setup):
    """rollout.compile: greedy and seeded completions (tokens, finish reasons, log-probs)
    equal the eager engine's across batch sizes, refills, decode runs, a cache that grows
    and a weight update in place, from one compilation per draw mode (sampling or not)."""
    from torch._dynamo.utils import counters

    tokenizer, _, prompts = setup
    spec = TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    model = build_tiny_model(spec, tokenizer, seed=3).eval()
    other = build_tiny_model(spec, tokenizer, seed=4).state_dict()

    def completions(engine):
        _mixed_batch(engine, prompts)
        return sorted(((c.prompt_index, c.token_ids, c.finish_reason, c.logprobs)
                       for _, group in engine.stream() for c in group),
                      key=lambda x: (x[0], x[1]))

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    runs = []
    for compile_ in (False, True):
        engine = early_stopping(PlaitEngine(model, tokenizer, max_batch=5, sync_every=1,
                                            compile=compile_), tokenizer)
        if compile_:
            modes = _draw_modes(engine)
        first = completions(engine)
        engine.sync_every = 4
        long = engine.generate(prompts[:2], SamplingParams(max_new_tokens=90, temperature=0.0))
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        engine.update_weights(other, version=1)
        updated = completions(engine)
        model.load_state_dict(saved)
        runs.append((first, [g[0].token_ids for g in long], updated))
    assert counters["stats"]["unique_graphs"] - graphs == len(modes) == 2
    (first, long, updated), (c_first, c_long, c_updated) = runs
    assert first != updated  # the new weights change the completions
    assert c_long == long and max(len(t) for t in long) > 64  # the cache grew past 64
    for eager, compiled in ((first, c_first), (updated, c_updated)):
        assert [c[:3] for c in compiled] == [c[:3] for c in eager]
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(torch.tensor(b[3]), torch.tensor(a[3]), atol=1e-4,
                                       rtol=1e-4)


@needs_cxx
def test_compiled_cpu_runs_decode_several_steps_in_one_call(setup):
    """A compiled CPU engine runs a decode run of rows it draws for (greedy and seeded) as
    one compiled call of sync_every steps, each step on the token drawn before it.
    Completions (tokens, finish reasons, log-probs) equal the eager engine's one step at
    a time through refills, top-k/top-p rows entering and leaving the running set (their
    runs step by step), rows stopping or reaching their token limit inside a call, and
    runs near the end of the cache (which fall back to single steps)."""
    tokenizer, model, prompts = setup
    longest = max(len(p) for p in prompts)

    def completions(engine):
        _mixed_batch(engine, prompts)
        engine.submit(prompts[:2], SamplingParams(max_new_tokens=11, temperature=1.0), n=2,
                      seeds=[3, 4])
        # the longest prompt, to the end of the cache: no room for a whole call there
        engine.submit([max(prompts, key=len)], SamplingParams(max_new_tokens=23,
                                                              temperature=0.0,
                                                              ignore_eos=True))
        return sorted(((c.prompt_index, c.token_ids, c.finish_reason, c.logprobs)
                       for _, group in engine.stream() for c in group),
                      key=lambda x: (x[0], x[1]))

    eager = completions(early_stopping(
        PlaitEngine(model, tokenizer, max_batch=5, sync_every=1, max_len=longest + 23),
        tokenizer))
    engine = early_stopping(PlaitEngine(model, tokenizer, max_batch=5, sync_every=3,
                                        max_len=longest + 23, compile=True), tokenizer)
    calls, original = [], engine.slots.decode_step

    def step(*args, plan, steps=1, **kwargs):
        calls.append((plan.drawable, steps))
        return original(*args, plan=plan, steps=steps, **kwargs)

    engine.slots.decode_step = step
    compiled = completions(engine)
    assert [c[:3] for c in compiled] == [c[:3] for c in eager]
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(torch.tensor(b[3]), torch.tensor(a[3]), atol=1e-4, rtol=1e-4)
    assert any(c[2] == "length" for c in eager) and any(c[2] == "stop" for c in eager)
    # one call per run of drawable rows; step by step for the top-k/top-p rows' runs and
    # at the end of the cache
    assert {(True, 3), (False, 1), (True, 1)} == set(calls)
    assert engine.slots.length == longest + 23


@needs_cxx
@pytest.mark.parametrize("arch, window", [("qwen3", None), ("mistral", 8)])
def test_compiled_decode_follows_other_families(arch, window):
    """Qwen3's query/key norms and Mistral's sliding window through the compiled step:
    greedy tokens equal the eager engine's, log-probs to float rounding, in one graph
    (contexts start shorter than the window and grow past it)."""
    from torch._dynamo.utils import counters

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(arch=arch, hidden_size=64, intermediate_size=128,
                                           num_layers=2, num_heads=4, num_kv_heads=2),
                             tokenizer, seed=5).eval()
    model.config.sliding_window = window
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert min(len(p) for p in prompts) + 1 < 8 < max(len(p) for p in prompts) + 24
    eager = PlaitEngine(model, tokenizer, max_batch=3).generate(prompts, params)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compiled = PlaitEngine(model, tokenizer, max_batch=3, compile=True).generate(prompts,
                                                                                 params)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert [g[0].token_ids for g in compiled] == [g[0].token_ids for g in eager]
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(torch.tensor(b[0].logprobs), torch.tensor(a[0].logprobs),
                                   atol=1e-4, rtol=1e-4)


@needs_cxx
def test_compiled_prefill_equals_eager_prefill_in_one_graph():
    """rollout.compile_prefill: admissions of different row counts and widths (contexts
    shorter and longer than a sliding window, into scattered slots, some written into
    several slots) give the eager prefill's last-token logits and cache rows, and those
    of each slot's context prefilled on its own, from one compilation."""
    from torch._dynamo.utils import counters

    from plait.rollout.slots import SlotModel

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(arch="mistral", hidden_size=64,
                                           intermediate_size=128, num_layers=2, num_heads=4,
                                           num_kv_heads=2), tokenizer, seed=5).eval()
    model.config.sliding_window = 8
    contexts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    contexts += [c + c for c in contexts]  # past the window
    # (contexts, slots, the context of each slot)
    admissions = [(contexts[:3], [4, 0, 2], None), (contexts[3:5], [1, 3, 5], [1, 0, 1]),
                  (contexts[1:6], [5, 6, 7, 0, 1], None), (contexts[5:7], [2, 4], None),
                  (contexts[8:12], [3, 0, 6, 5, 7, 1], [0, 1, 2, 3, 3, 0])]
    assert min(len(c) for c in contexts) < 8 < max(len(c) for c in contexts)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    eager = SlotModel(model, max_batch=8, max_len=None, compile=False, pad_id=0)
    compiled = SlotModel(model, max_batch=8, max_len=None, compile=True, pad_id=0,
                         compile_prefill=True)
    alone = SlotModel(model, max_batch=8, max_len=None, compile=False, pad_id=0)
    for batch, slots, source in admissions:
        source = source or list(range(len(batch)))
        outputs = []
        for slot_model in (eager, compiled, alone):
            slot_model.ensure(max(len(c) for c in batch))
        with torch.no_grad():
            for slot_model in (eager, compiled):
                outputs.append(slot_model.prefill(batch, torch.tensor(slots),
                                                  torch.tensor(source)))
            for slot, row in zip(slots, source, strict=True):
                alone.prefill([batch[row]], torch.tensor([slot]))
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
        for slot, row in zip(slots, source, strict=True):
            width = len(batch[row])
            for a, b, c in zip(eager.keys + eager.values, compiled.keys + compiled.values,
                               alone.keys + alone.values, strict=True):
                torch.testing.assert_close(b[slot, :, :width], a[slot, :, :width],
                                           atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a[slot, :, :width], c[slot, :, :width],
                                           atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_a_decode_step_that_cannot_compile_names_the_setting(setup):
    tokenizer, model, prompts = setup

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    engine = PlaitEngine(model, tokenizer, max_batch=4)
    engine.slots.compiled = torch.compile(engine.slots.decode_draw, backend=no_compiler,
                                          dynamic=True)
    with pytest.raises(RuntimeError, match=r"rollout.compile.*no C\+\+ compiler found.*"
                                           r"set rollout.compile=false"):
        engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    """The compiled CPU decode step's attention: one query per row over that row's
    visible keys equals sdpa with repeat_kv's head grouping (keys hidden per row)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from plait.models.decoder import decode_attention

    torch.manual_seed(0)
    rows, length, dim = 5, 11, 8
    query = torch.randn(rows, heads, 1, dim, dtype=torch.float64)
    key = torch.randn(rows, kv_heads, length, dim, dtype=torch.float64)
    value = torch.randn(rows, kv_heads, length, dim, dtype=torch.float64)
    visible = torch.rand(rows, 1, 1, length) < 0.6
    visible[:, :, :, 0] = True  # every row sees at least one key

    class Module:  # what HF's sdpa function reads from the attention layer
        num_key_value_groups = heads // kv_heads
        is_causal = False
        training = False

    got, _ = decode_attention(Module(), query, key, value, visible, scaling=0.3)
    want, _ = sdpa_attention_forward(Module(), query, key, value, visible, scaling=0.3)
    assert got.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # by hand for one row and head: softmax over the visible keys of its kv head
    row, head = 3, heads - 1
    kv = head // (heads // kv_heads)
    keys = visible[row, 0, 0].nonzero().squeeze(-1)
    scores = 0.3 * key[row, kv, keys] @ query[row, head, 0]
    torch.testing.assert_close(got[row, 0, head], torch.softmax(scores, 0) @ value[row, kv, keys])
    # more than one query per row goes to sdpa
    wide = torch.randn(rows, heads, 3, dim, dtype=torch.float64)
    mask = visible.expand(rows, 1, 3, length)
    torch.testing.assert_close(decode_attention(Module(), wide, key, value, mask)[0],
                               sdpa_attention_forward(Module(), wide, key, value, mask)[0])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.05])
def test_compiled_draw_equals_the_eager_sampler(setup, temperature):
    """The draw inside the compiled step (greedy and seeded rows) gives the eager
    sampler's tokens and log-probs for the same logits, rows and token offsets; plans
    with unseeded or top-k/top-p rows are left to the eager sampler."""
    from plait.rollout.sampling import draw, sample

    tokenizer, model, prompts = setup
    engine = PlaitEngine(model, tokenizer, max_batch=12, compile=True)  # compiles lazily
    engine.submit(prompts[:2], SamplingParams(max_new_tokens=8, temperature=0.0))
    engine.submit(prompts[2:5], SamplingParams(max_new_tokens=8, temperature=temperature),
                  n=3, seeds=[11, 12, 13])
    with torch.no_grad():
        engine._admit()
    plan = engine._sampling_plan()
    assert plan.drawable and plan.sample and plan.settings.shape == (11, 4)
    torch.manual_seed(0)
    tokens_seen = set()
    for offset in range(40):
        logits = engine._pending_logits + 3 * torch.randn_like(engine._pending_logits)
        want_tokens, want_logprobs = sample(logits, plan, offset=offset)
        tokens, drawn = draw(logits, plan.settings, plan.counters + offset)
        assert torch.equal(tokens, want_tokens) and torch.equal(drawn[0].long(), want_tokens)
        torch.testing.assert_close(drawn[1], want_logprobs.double(), atol=1e-6, rtol=0)
        tokens_seen.update(want_tokens[2:].tolist())
        # without sampling (the graph for greedy plans) every row is greedy
        greedy_tokens, greedy_draw = draw(logits, plan.settings, plan.counters, sample=False)
        assert torch.equal(greedy_tokens, logits.argmax(-1))
        assert torch.equal(greedy_draw[:, :2], drawn[:, :2])  # the two greedy rows
    assert len(tokens_seen) > 5  # the seeded rows really sample
    for params, seeds, drawable in (
            (SamplingParams(max_new_tokens=8, temperature=0.0), None, True),
            (SamplingParams(max_new_tokens=8, temperature=1.0), None, False),
            (SamplingParams(max_new_tokens=8, top_k=5), [3], False)):
        other = PlaitEngine(model, tokenizer, max_batch=4, compile=True)
        other.submit(prompts[:1], params, seeds=seeds)
        with torch.no_grad():
            other._admit()
        other_plan = other._sampling_plan()
        assert (other_plan.drawable, other_plan.sample) == (drawable, False)


def test_compiled_step_restores_attention_and_deterministic_settings(setup):
    """Around the compiled step the model's attention goes through decode_attention (on
    the CPU) and deterministic algorithms are off; both come back as they were, also when
    the step raises."""
    from plait.models.decoder import DECODE_ATTENTION

    tokenizer, model, prompts = setup
    engine = PlaitEngine(model, tokenizer, max_batch=4, compile=True)
    seen = []

    def failing_step(*args, **kwargs):
        seen.append((model.config._attn_implementation,
                     torch.are_deterministic_algorithms_enabled()))
        raise ValueError("inside the step")

    engine.slots.compiled = failing_step
    before = model.config._attn_implementation
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(ValueError, match="inside the step"):
            engine.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0.0))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    assert seen == [(DECODE_ATTENTION, False)]
    assert model.config._attn_implementation == before != DECODE_ATTENTION


@needs_cxx
def test_compiled_decode_keeps_tensor_guards(setup):
    """The compiled step skips guards on module structure but not on tensors: after the
    model moves to float64 (caches released), it traces a second graph (float32 kernels
    on float64 weights would give garbage) and matches the eager float64 engine."""
    from torch._dynamo.utils import counters

    tokenizer, _, prompts = setup
    spec = TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    model = build_tiny_model(spec, tokenizer, seed=3).eval()
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    engine = PlaitEngine(model, tokenizer, max_batch=4, sync_every=1, compile=True)
    engine.submit(prompts[:2], params, n=2, seeds=[1, 2])
    # the step runs with deterministic algorithms off (its cache writes have no duplicate
    # index) and leaves the flag as it found it
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        list(engine.stream())
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    assert counters["stats"]["unique_graphs"] - graphs == 1
    engine.release()
    model.double()
    eager = PlaitEngine(model, tokenizer, max_batch=4)
    results = []
    for e in (engine, eager):
        e.submit(prompts[:2], params, n=2, seeds=[1, 2])
        results.append(sorted((c.prompt_index, c.token_ids, c.logprobs)
                              for _, group in e.stream() for c in group))
    compiled, reference = results
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert [c[:2] for c in compiled] == [c[:2] for c in reference]
    for a, b in zip(compiled, reference, strict=True):  # log-probs come out in float32
        torch.testing.assert_close(torch.tensor(a[2]), torch.tensor(b[2]), atol=1e-5, rtol=0)
