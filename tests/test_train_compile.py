"""train.compile: the training passes run the decoder layers through torch.compile and
take the eager run's optimizer steps up to float rounding; generation and no-grad passes
stay eager; settings where nothing would be compiled are refused by name."""

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from plait.cli import main
from plait.config import ConfigError, load_config
from plait.telemetry.metrics import read_metrics

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
        "train.threads=1", "run.tensorboard=false", "run.progress=false"]


def _weights(directory):
    return load_file(next(directory.glob("*.safetensors")))


def _same_weights(one, two):
    """Every weight equal up to float rounding. The key projections' biases get a wider
    margin: one bias added to every key moves a query's logits only through the rotary
    terms (the rest is a constant the softmax ignores), so their gradients are small and
    AdamW's normalised step magnifies rounding in them (seen: 3e-5 after 4 steps that
    moved them 1e-2)."""
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for name in a:
        atol = 1e-4 if name.endswith("k_proj.bias") else 2e-5
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_reward_model_training_equals_eager(tmp_path):
    job = [*TINY, "data.task=reverse", "pairs.num_pairs=64", "pairs.num_eval_pairs=16",
           "rm.steps=4", "rm.batch_size=8", "rm.lr=3e-3", "rm.eval_every=0",
           "train.save_every=0"]
    assert main(["rm", *job, f"run.dir={tmp_path / 'eager'}"]) == 0
    assert _graphs() == 0
    assert main(["rm", *job, f"run.dir={tmp_path / 'compiled'}", "train.compile=true"]) == 0
    assert _graphs() >= 1  # the layers were compiled, not run eagerly
    _same_weights(tmp_path / "eager" / "reward_model", tmp_path / "compiled" / "reward_model")
    losses = [[r["loss/pairwise"] for r in read_metrics(tmp_path / d / "metrics.jsonl")
               if "loss/pairwise" in r] for d in ("eager", "compiled")]
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_compiled_rl_update_equals_eager(tmp_path):
    """One GRPO step: the same rollout (generation is eager in both), the update's
    packed passes compiled in one run."""
    job = [*TINY, "data.task=reverse", "train.steps=1", "algo.prompts_per_step=4",
           "algo.group_size=4", "optim.lr=1e-3", "rollout.max_new_tokens=6", "data.num_eval=8",
           "train.eval_every=0"]
    assert main(["train", *job, f"run.dir={tmp_path / 'eager'}"]) == 0
    assert main(["train", *job, f"run.dir={tmp_path / 'compiled'}", "train.compile=true"]) == 0
    assert _graphs() >= 1
    policy = "checkpoints/step_000001/policy"
    _same_weights(tmp_path / "eager" / policy, tmp_path / "compiled" / policy)
    first = [next(r for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["step"] == 1)
             for d in ("eager", "compiled")]
    assert first[0]["reward/mean"] == first[1]["reward/mean"]  # the same samples
    assert first[0]["loss/policy"] == pytest.approx(first[1]["loss/policy"], rel=1e-4,
                                                    abs=1e-6)


@pytest.mark.parametrize("overrides, words", [
    (["runtime.num_ranks=2", "runtime.data_parallel=fsdp"], "runtime.data_parallel=ddp"),
    (["algo.pack_group_tokens=0"], "algo.pack_group_tokens"),
    (["algo.share_prompt_forward=false"], "algo.share_prompt_forward"),
])
def test_compile_refused_where_nothing_would_compile(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["train.compile=true", *overrides])


def test_compiled_sft_needs_packing(tmp_path, capsys):
    job = [*TINY, "data.task=reverse", "sft.steps=2", "train.compile=true",
           f"run.dir={tmp_path / 'sft'}"]
    assert main(["sft", *job]) != 0
    assert "sft.packing=true" in capsys.readouterr().err


def test_a_compile_failure_names_the_setting(monkeypatch):
    from plait.config import TinyModelConfig
    from plait.models.tiny import build_char_tokenizer, build_tiny_model
    from plait.train import forward

    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64,
                                             num_layers=2, num_heads=2, num_kv_heads=1),
                             build_char_tokenizer())

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(
            lambda: None, RuntimeError("no C++ compiler found\nmore"), None)

    monkeypatch.setitem(forward._COMPILED, model.model, [broken, broken])
    ids = torch.tensor([[5, 6, 7]])
    args = (ids, torch.arange(3)[None], torch.zeros_like(ids))
    with pytest.raises(RuntimeError, match=r"train.compile: torch.compile could not compile "
                       r"the decoder layers \(RuntimeError: no C\+\+ compiler found\); set "
                       r"train.compile=false"):
        forward.segment_logits(model, *args)
    with torch.no_grad():  # no-grad passes run the layers eagerly
        assert forward.segment_logits(model, *args).shape == (1, 3, model.config.vocab_size)
