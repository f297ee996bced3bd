"""plait sft: the loss falls on answer tokens only, packed rows give the padded rows'
loss and gradients, the job learns the task and saves a transformers model, a killed run
resumes exactly, bad rows are named."""

import json

import pytest
import torch
from helpers_jobs import kill_in_step
from transformers import AutoModelForCausalLM

from plait.cli import main
from plait.config import load_config
from plait.data.datasets import DataError, load_text_rows
from plait.data.tasks import CHAR_VOCAB
from plait.models.tiny import (
    CHAR_CHAT_TEMPLATE,
    TinyModelSpec,
    build_char_tokenizer,
    build_tiny_model,
    save_tiny_model,
)
from plait.recipes.sft import train_sft
from plait.telemetry.metrics import read_metrics
from plait.train.forward import position_ids_from_mask, segment_logits
from plait.train.supervised import (
    IGNORE,
    SupervisedEncoder,
    next_token_stats,
    packed_examples,
    padded_examples,
)

SFT_JOB = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.task=reverse",
    "train.threads=2", "run.tensorboard=false", "run.progress=false", "data.num_eval=64",
    "sft.batch_size=32", "sft.lr=3e-3", "data.num_train=4000",
]


def sft_job(run_dir, *extra):
    return load_config(None, [*SFT_JOB, f"run.dir={run_dir}", *extra])


def _tokenizer():
    return build_char_tokenizer(CHAR_VOCAB + ":", chat_template=CHAR_CHAT_TEMPLATE)


def test_only_the_answer_and_its_end_token_are_learned():
    tokenizer = _tokenizer()
    encode = SupervisedEncoder(tokenizer, lambda text: tokenizer(text)["input_ids"])
    ids, learn = encode({"prompt": "ab=", "answer": "ba"})
    assert tokenizer.decode(ids) == "ab=ba" + tokenizer.eos_token
    assert learn == [False, False, False, True, True, True]
    # plain text (an empty prompt) is learned whole
    ids, learn = encode({"prompt": "", "answer": "xy"})
    assert len(ids) == 3 and all(learn)
    _, _, labels = padded_examples([encode({"prompt": "ab=", "answer": "ba"})],
                                   tokenizer.pad_token_id)
    assert labels[0, :3].tolist() == [IGNORE] * 3
    assert tokenizer.decode(labels[0, 3:]) == "ba" + tokenizer.eos_token


def test_a_conversation_learns_every_assistant_turn_and_nothing_else():
    tokenizer = _tokenizer()
    encode = SupervisedEncoder(tokenizer, None)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "ba"}, {"role": "user", "content": "cd"},
                {"role": "assistant", "content": "dc"}]
    ids, learn = encode({"messages": messages})
    assert tokenizer.decode(ids) == "s:be brief\nu:ab\na:ba\nu:cd\na:dc\n"
    learned = "".join(tokenizer.decode([t]) if on else "|" for t, on in zip(ids, learn,
                                                                           strict=True))
    # the template's "a:" header is context; each reply and its newline are learned
    assert learned == "|" * len("s:be brief\nu:ab\na:") + "ba\n" + "|" * len("u:cd\na:") + \
        "dc\n"


def test_packed_rows_give_the_padded_rows_loss_and_gradients():
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2,
                                           num_heads=2, num_kv_heads=1), tokenizer)
    encode = SupervisedEncoder(tokenizer, lambda text: tokenizer(text)["input_ids"])
    rows = [{"prompt": p, "answer": a} for p, a in
            [("abcdef=", "fedcba"), ("ab=", "ba"), ("xyz=", "zyx"), ("", "hello world"),
             ("q=", "q"), ("mnopqr=", "rqponm")]]
    examples = [encode(row) for row in rows]

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    ids, mask, labels = padded_examples(examples, tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).logits
    padded = next_token_stats(logits, labels)
    padded_grads = grads_of(padded[0])
    ids, positions, segment, labels = packed_examples(examples, 16, tokenizer.pad_token_id)
    assert ids.shape[0] < len(rows) and ids.shape[1] <= 16  # packed: fewer rows
    packed = next_token_stats(segment_logits(model, ids, positions, segment), labels)
    packed_grads = grads_of(packed[0])
    assert packed[1:] == padded[1:]  # the same learned tokens, the same argmax hits
    torch.testing.assert_close(packed[0], padded[0], atol=1e-4, rtol=1e-5)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_plait_sft_learns_the_task_and_saves_a_transformers_model(tmp_path):
    run_dir = tmp_path / "sft"
    summary = train_sft(sft_job(run_dir, "sft.steps=150", "sft.eval_every=50",
                                "sft.packing=true", "sft.max_length=64"))
    assert summary["steps"] == 150
    assert summary["loss_after"] < summary["loss_before"] - 1.0, summary
    assert summary["token_accuracy_after"] > summary["token_accuracy_before"] + 0.3
    assert summary["accuracy_after"] > summary["accuracy_before"], summary
    evals = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval/loss" in r]
    assert evals == [0, 50, 100, 150]
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft_model")
    assert model.config.model_type in ("qwen2", "llama", "qwen3", "mistral")


def test_chat_and_text_files_train(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    rows = [{"conversation": [{"role": "user", "content": w},
                              {"role": "assistant", "content": w[::-1]}]}
            for w in ("abc", "hello", "xyz", "plait", "rl", "sft", "moon", "tree") * 4]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = save_tiny_model(tmp_path / "chat_model", TinyModelSpec(hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1),
                            chat_template=CHAR_CHAT_TEMPLATE)
    code = main(["sft", *SFT_JOB, "data.task=null", f"data.train_path={data}",
                 "data.fields={messages: conversation}", "data.num_eval=4", "sft.steps=3",
                 f"model.path={model}", f"run.dir={tmp_path / 'run'}"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["examples"] == 28


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "ab="}, "line 2: a supervised row needs"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: the conversation has no "
                                                        "'assistant' turn"),
    ({"messages": [{"role": "user"}]}, "line 2: message 1 must be an object with 'role' and "
                                       "'content'"),
])
def test_bad_rows_are_named(tmp_path, row, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a=", "answer": "a"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        load_text_rows(path)


def test_too_long_rows_and_zero_steps_get_one_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a=", "answer": "b" * n}) + "\n"
                            for n in (2, 40, 3, 4, 5)))
    job = [*SFT_JOB, "data.task=null", f"data.train_path={data}", "data.num_eval=1",
           "sft.max_length=16", f"run.dir={tmp_path / 'run'}"]
    assert main(["sft", *job, "sft.steps=2"]) == 1
    err = capsys.readouterr().err
    assert "training row 2 has 43 tokens, more than sft.max_length=16" in err
    assert "Traceback" not in err
    assert main(["sft", *job, "sft.steps=2", "sft.bad_rows=drop", "run.overwrite=true"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropped_rows"] == {"too_long": 1} and summary["examples"] == 3
    assert main(["sft", *job, "run.overwrite=true"]) == 2
    assert "set sft.steps=N" in capsys.readouterr().err


def test_a_killed_run_resumes_exactly(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["sft.steps=6", "train.save_every=3", "train.keep_last=0", "sft.packing=true",
              "sft.max_length=48"]
    train_sft(sft_job(straight, *common))
    overrides = [*SFT_JOB, f"run.dir={resumed}", *common]
    proc = kill_in_step("sft", "SFTTrainer", "train_sft", overrides, step=4)
    assert proc.returncode == -9, proc.stderr[-2000:]
    capsys.readouterr()
    train_sft(load_config(None, overrides))
    assert f"resumed from {resumed / 'checkpoints' / 'step_000003'} at step 3" in \
        capsys.readouterr().out
    one = AutoModelForCausalLM.from_pretrained(straight / "sft_model").state_dict()
    two = AutoModelForCausalLM.from_pretrained(resumed / "sft_model").state_dict()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "loss/sft" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
