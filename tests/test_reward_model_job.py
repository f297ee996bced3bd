"""plait rm end to end: it learns the hidden preference, its output loads as a
transformers reward model, a stopped run resumes exactly, bad pairs are named."""

import json

import pytest
import torch
from helpers_jobs import kill_in_step
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from plait.cli import main
from plait.config import ConfigError, load_config
from plait.data.datasets import DataError
from plait.models.reward_model import padded_batch, sequence_scores
from plait.recipes.pairs import PairEncoder
from plait.recipes.reward_model import train_reward_model
from plait.telemetry.metrics import read_metrics

RM_JOB = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.task=reverse",
    "train.threads=2", "run.tensorboard=false", "run.progress=false",
    "pairs.num_pairs=2048", "pairs.num_eval_pairs=256", "rm.batch_size=32", "rm.lr=3e-3",
]


def rm_job(run_dir, *extra):
    return load_config(None, [*RM_JOB, f"run.dir={run_dir}", *extra])


def test_the_reward_model_learns_from_pairs_and_saves_a_transformers_model(tmp_path):
    run_dir = tmp_path / "rm"
    config = rm_job(run_dir, "rm.steps=300", "rm.eval_every=100", "rm.lr=3e-3")
    summary = train_reward_model(config)
    assert summary["steps"] == 300
    # the pairs differ in true quality by construction; the small model, not fine-tuned on
    # the task first, learns part of it (the fine-tuned start is the slow test below)
    assert summary["accuracy_vs_truth_after"] > summary["accuracy_vs_truth_before"] + 0.05, \
        summary
    assert summary["accuracy_after"] == summary["accuracy_vs_truth_after"]  # no label noise
    assert 0 <= summary["ece_after"] < 0.2
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 100, 200, 300]
    for plot in ("reliability.png", "scores.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the output is a transformers reward model giving plait's scores
    trained = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "reward_model")
    encode = PairEncoder(tokenizer, config.model.chat_template, 256)
    ids, mask = padded_batch(list(encode({"prompt": "abc=", "chosen": "cba",
                                           "rejected": "cbx"})), tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = trained(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = sequence_scores(trained, ids, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_reward_model_from_the_fine_tuned_policy_judges_most_pairs_right(tmp_path):
    """The pipeline's order: SFT on the task, then the reward model from that model."""
    assert main(["train", "data.task=reverse", "sft.steps=600", "train.steps=0",
                 "train.threads=2", "run.tensorboard=false", "run.progress=false",
                 f"run.dir={tmp_path / 'sft'}"]) == 0
    summary = train_reward_model(load_config(None, [
        "data.task=reverse", "train.threads=2", "run.tensorboard=false", "run.progress=false",
        f"model.path={tmp_path / 'sft' / 'sft_model'}", f"run.dir={tmp_path / 'rm'}",
        "rm.eval_every=0"]))
    assert summary["accuracy_vs_truth_after"] > 0.72, summary


def test_a_killed_run_resumes_exactly(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["rm.steps=6", "rm.eval_every=0", "train.save_every=3", "train.keep_last=0",
              "pairs.num_pairs=256", "pairs.num_eval_pairs=64"]
    train_reward_model(rm_job(straight, *common))
    overrides = [*RM_JOB, f"run.dir={resumed}", *common]
    proc = kill_in_step("reward_model", "RewardModelTrainer", "train_reward_model", overrides, step=4)  # after step 3's checkpoint
    assert proc.returncode == -9, proc.stderr[-2000:]
    capsys.readouterr()
    train_reward_model(load_config(None, overrides))
    assert f"resumed from {resumed / 'checkpoints' / 'step_000003'} at step 3" in \
        capsys.readouterr().out  # not a seeded restart from scratch, which would end the same
    one = AutoModelForSequenceClassification.from_pretrained(straight / "reward_model")
    two = AutoModelForSequenceClassification.from_pretrained(resumed / "reward_model")
    midway = AutoModelForSequenceClassification.from_pretrained(
        straight / "checkpoints" / "step_000003" / "reward_model")
    assert not torch.equal(midway.score.weight, one.score.weight)  # it trained after step 3
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "loss/pairwise" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 4 is not logged twice


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_pairs_from_a_file_with_a_held_out_share(tmp_path, capsys):
    rows = [{"prompt": f"{w}=", "chosen": w[::-1], "rejected": w, "source": "a" if i % 2 else "b"}
            for i, w in enumerate(["abc", "xyz", "qrs", "hello", "lmn", "opq", "tuv", "wxy",
                                   "bcd", "fgh"])]
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    code = main(["rm", *RM_JOB, f"run.dir={tmp_path / 'run'}", f"pairs.train_path={pairs}",
                 "pairs.eval_fraction=0.3", "rm.steps=2", "rm.batch_size=4"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 7 and summary["eval_pairs"] == 3
    assert "accuracy_vs_truth_after" not in summary
    assert "plait: reward model saved to" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, error, message", [
    (["data.task=addition"], ConfigError, "data.task='addition' makes no preference pairs"),
    (["pairs.max_length=4"], DataError, r"training pair 1 is longer than pairs.max_length=4"),
])
def test_unusable_pairs_are_named(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train_reward_model(rm_job(tmp_path / "run", "rm.steps=1", *overrides))


def test_bad_rows_in_a_pairs_file_stop_the_command_in_one_line(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", [
        {"prompt": "ab=", "chosen": "ba", "rejected": "ab"},
        {"prompt": "cd=", "chosen": "dc", "rejected": "dc"}])
    code = main(["rm", *RM_JOB, f"run.dir={tmp_path / 'run'}", f"pairs.train_path={pairs}",
                 "rm.steps=1"])
    err = capsys.readouterr().err
    assert code == 1 and "line 2: chosen and rejected are the same response" in err
    assert "Traceback" not in err


def test_rollout_workers_apart_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="plait rm trains one model on every rank"):
        train_reward_model(rm_job(tmp_path / "run", "rm.steps=1", "runtime.num_ranks=2",
                                  "runtime.placement=partial"))


def test_chat_pairs_go_through_the_chat_template():
    from plait.models.tiny import CHAR_CHAT_TEMPLATE, build_char_tokenizer

    tokenizer = build_char_tokenizer(chat_template=CHAR_CHAT_TEMPLATE)
    prompt = [{"role": "user", "content": "abc="}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "cba"}],
           "rejected": [{"role": "assistant", "content": "abc"}], "conversational": True}
    chosen, rejected = PairEncoder(tokenizer, "auto", 256)(row)
    expected = tokenizer.apply_chat_template(prompt + row["chosen"], tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert chosen == list(expected)
    assert chosen != rejected
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        PairEncoder(build_char_tokenizer(), "auto", 256)(row)


def test_pairs_of_the_policys_own_samples_are_ranked_by_the_truth(tmp_path):
    """pairs.source=policy: two of a prompt's samples of different true score, the
    better one chosen (no label noise), the same pairs for the same seed."""
    from plait.data.tasks import make_task
    from plait.recipes.pairs import PolicySampler

    config = rm_job(tmp_path / "rm", "pairs.source=policy", "pairs.samples_per_prompt=4",
                    "rollout.max_new_tokens=8")
    task = make_task("reverse")
    pairs = PolicySampler(config)(task, 40, "train")
    assert len(pairs) == 40
    answers = {row["prompt"]: row["answer"] for row in task.make_rows(160, seed=0)}
    for pair in pairs:
        assert pair["prompt"] in answers  # the training split's prompts
        chosen = task.verify(pair["chosen"], pair["answer"])
        rejected = task.verify(pair["rejected"], pair["answer"])
        assert chosen == pair["chosen_score"] > rejected == pair["rejected_score"]
        assert not pair["flipped"]
    assert PolicySampler(config)(task, 40, "train") == pairs
    held_out = PolicySampler(config)(task, 10, "test")
    assert not {p["prompt"] for p in held_out} & set(answers)
    # pairs.policy_path: another policy's samples (here another tiny model's: other pairs)
    from plait.models.tiny import TinyModelSpec, save_tiny_model

    other = save_tiny_model(tmp_path / "other", TinyModelSpec(hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1),
                            seed=7)
    config = rm_job(tmp_path / "rm", "pairs.source=policy", "pairs.samples_per_prompt=4",
                    "rollout.max_new_tokens=8", f"pairs.policy_path={other}")
    assert PolicySampler(config)(task, 40, "train") != pairs


def test_packed_shared_prompt_scores_equal_each_row_on_its_own(tmp_path):
    """A pair's shared start once (its prompt and the tokens both responses begin
    with), the rest of both sequences packed after it == the classifier's forward of
    each padded row, values and gradients."""
    from plait.recipes.reward_model import RewardModelTrainer

    with RewardModelTrainer(rm_job(tmp_path / "run", "rm.steps=1")) as trainer:
        odd = {key: trainer.train_rows[0][key] for key in ("prompt", "rejected")}
        prefix = {"prompt": "abcd=", "chosen": "dcba", "rejected": "dcb"}  # one is cut short
        rows = trainer.train_rows[:12] + [{**odd, "chosen": "x"}, prefix]
        prompt = [len(trainer.encode.encode.prompt(row["prompt"])) for row in rows]
        shared = [trainer.encode.prompt_length(row) for row in rows]
        assert shared[-1] == prompt[-1] + 3  # "dcb" shared, "a" + end against the end token
        assert sum(s > p for s, p in zip(shared, prompt, strict=True)) >= 4
        model = trainer.model.train()
        chosen, rejected = trainer.scores(rows)
        packed = torch.autograd.grad((chosen - 2 * rejected).sum(), list(model.parameters()))
        encoded = [trainer.encode(row) for row in rows]
        ids, mask = padded_batch([c for c, _ in encoded] + [r for _, r in encoded],
                                 trainer.tokenizer.pad_token_id)
        expected = sequence_scores(model, ids, mask)
        n = len(rows)
        torch.testing.assert_close(chosen, expected[:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rejected, expected[n:], atol=1e-5, rtol=1e-5)
        padded = torch.autograd.grad((expected[:n] - 2 * expected[n:]).sum(),
                                     list(model.parameters()))
        for a, b in zip(packed, padded, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_finished_run_can_be_overwritten(tmp_path):
    """Every file plait rm writes (plots included) is one run.overwrite may delete."""
    job = ["rm.steps=2", "rm.eval_every=0", "pairs.num_pairs=64", "pairs.num_eval_pairs=16"]
    train_reward_model(rm_job(tmp_path / "rm", *job))
    assert (tmp_path / "rm" / "scores.png").is_file()
    summary = train_reward_model(rm_job(tmp_path / "rm", *job, "run.overwrite=true"))
    assert summary["steps"] == 2


def test_a_job_freezes_its_set_up_heap_while_it_runs_and_gives_it_back(tmp_path, monkeypatch):
    """After its first step a job's objects are out of the cyclic collector's walks
    (gc.freeze); once it closes they are collectable again, so jobs run one after another
    in one process leak nothing."""
    import gc

    from plait.recipes.reward_model import RewardModelTrainer

    frozen = []
    step = RewardModelTrainer.step

    def counted(self):
        frozen.append(gc.get_freeze_count())
        return step(self)

    monkeypatch.setattr(RewardModelTrainer, "step", counted)
    train_reward_model(rm_job(tmp_path / "rm", "rm.steps=3", "rm.eval_every=0"))
    assert frozen[0] == 0 and frozen[1] > 1000 and frozen[2] > 1000
    assert gc.get_freeze_count() == 0
