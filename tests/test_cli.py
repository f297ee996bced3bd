"""The command line: clear one-line errors for bad input, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from plait.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plait.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PLAIT_PROGRESS": "0"},
                          timeout=300)


def test_config_prints_resolved(capsys):
    assert main(["config", "train.steps=3", "algo.name=ppo"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "name: ppo" in out


def test_options_lists_documented_keys(capsys):
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    assert "algo.clip_high" in out and "clip-higher" in out


@pytest.mark.parametrize("args, message", [
    (["config", "train.stesp=3"], "did you mean 'train.steps'"),
    (["config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["train", "model.path=org/some-model"], "plait loads models only from local paths"),
    (["train", "data.task=additon"], "Did you mean 'addition'"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    proc = run_cli(*args, f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, message", [
    ('{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\nnot json\n', "line 3"),
    ('{"question": "1+1=", "answer": "2"}\n{"question": 5}\n', "2"),
    ('{"question": "1+1="}\n{"q": "2+2="}\n', "2"),
])
def test_malformed_dataset_row_is_named(tmp_path, tiny_job, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    from_file = [a for a in tiny_job if not a.startswith("data.num_train=")]  # no rows made
    proc = run_cli("train", *from_file, "data.task=null", f"data.train_path={data}",
                   "data.fields={prompt: question}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "data.jsonl" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_raising_reward_names_function_and_sample(tmp_path, tiny_job, reward_spec):
    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('raise_on_third')}'}}]",
                   "train.steps=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "raise_on_third" in proc.stderr and "sample" in proc.stderr
    assert "cannot score this one" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reward_fallback_counts_failures(tmp_path, tiny_job, reward_spec):
    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('nan_reward')}'}}]",
                   "reward.on_error=fallback", "algo.reward_range=[0, 1]", "train.steps=2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("reward_failures", 0) for r in records) == 2 * 16


def test_hanging_reward_times_out(tmp_path, tiny_job, reward_spec):
    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('hang')}'}}]",
                   "reward.timeout_s=1", "train.steps=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "hang" in proc.stderr and "time limit" in proc.stderr


def test_nan_loss_stops_with_checkpoint_intact(tmp_path, tiny_job, reward_spec):
    """An absurd learning rate blows the weights up: the run stops with a clear message
    and the last checkpoint written before the blow-up is complete and loadable."""
    from transformers import AutoModelForCausalLM

    from plait.train.checkpoint import latest_checkpoint

    proc = run_cli("train", *tiny_job, f"reward.functions=[{{fn: '{reward_spec('digit_fraction')}'}}]",
                   "algo.reward_range=[0, 1]", "train.save_every=1", "optim.max_grad_norm=null",
                   "train.steps=30", "optim.lr=1e30", "train.nan_policy=stop", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "NaN" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and ckpt.name != "step_000030"
    AutoModelForCausalLM.from_pretrained(ckpt / "policy")


def test_a_config_error_fails_before_torch_is_imported(tmp_path):
    """A typo is reported without loading the training stack (which takes seconds)."""
    code = ("import sys; from plait.cli import main; "
            "rc = main(['train', 'train.stepz=3']); "
            "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert "did you mean 'train.steps'" in proc.stderr


def test_errors_raised_later_are_still_one_line(monkeypatch, tmp_path, capsys):
    """Past the config, the known errors (imported only then) still print one line."""
    import plait.recipes.rl
    from plait.data.datasets import DataError

    def fails(config):
        raise DataError("data.jsonl, line 3: not JSON")

    monkeypatch.setattr(plait.recipes.rl, "train", fails)
    assert main(["train", f"run.dir={tmp_path / 'run'}"]) == 1
    assert capsys.readouterr().err == "plait: error: data.jsonl, line 3: not JSON\n"


def test_duplicate_key_in_the_config_file_is_one_line(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  steps: 3\nalgo:\n  group_size: 4\n  group_size: 8\n")
    proc = run_cli("config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (f"plait: error: {config}, line 5: key 'group_size' appears twice in "
                           "one mapping (first on line 4); YAML would keep only the last: "
                           "keep one\n")


def _interrupted(monkeypatch, module, name):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupt)


def test_ctrl_c_in_train_names_the_last_complete_checkpoint(monkeypatch, tmp_path, capsys):
    import plait.recipes.rl
    from plait.train.checkpoint import COMPLETE_MARKER

    _interrupted(monkeypatch, plait.recipes.rl, "train")
    run_dir = tmp_path / "run"
    assert main(["train", f"run.dir={run_dir}"]) == 130
    assert capsys.readouterr().err.startswith(
        f"plait: interrupted; no checkpoint yet in {run_dir / 'checkpoints'} ")
    for step in (2, 4, 6):
        (run_dir / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    for step in (2, 4):  # step 6 was being written: incomplete
        (run_dir / "checkpoints" / f"step_{step:06d}" / COMPLETE_MARKER).write_text("{}")
    assert main(["train", f"run.dir={run_dir}"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("plait: interrupted; the last complete checkpoint is "
                          f"{run_dir / 'checkpoints' / 'step_000004'} "), err


def test_ctrl_c_in_rm_names_the_last_complete_checkpoint(monkeypatch, tmp_path, capsys):
    import plait.recipes.reward_model
    from plait.train.checkpoint import COMPLETE_MARKER

    _interrupted(monkeypatch, plait.recipes.reward_model, "train_reward_model")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text("{}")
    assert main(["rm", f"run.dir={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"plait: interrupted; the last complete checkpoint is {checkpoint} "
                          "(step 2): rerun the same command to resume from it"), err


@pytest.mark.parametrize("settings, rerun", [
    ([], "rerun the same command to resume from it"),
    (["run.overwrite=true"], "rerun without run.overwrite=true (which deletes it) to resume"),
    (["run.resume=never"], "rerun with run.resume=auto (run.resume=never refuses to resume) "
                           "to resume"),
    (["run.overwrite=true", "run.resume=never"],
     "rerun without run.overwrite=true (which deletes it) and with run.resume=auto"),
], ids=["defaults", "overwrite", "never", "both"])
def test_ctrl_c_says_what_a_rerun_must_change_to_resume(monkeypatch, tmp_path, capsys,
                                                         settings, rerun):
    """The same command would delete the checkpoint (run.overwrite=true) or refuse to
    resume from it (run.resume=never): the note says what to change instead."""
    import plait.recipes.rl
    from plait.train.checkpoint import COMPLETE_MARKER

    _interrupted(monkeypatch, plait.recipes.rl, "train")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text("{}")
    assert main(["train", f"run.dir={tmp_path / 'run'}", *settings]) == 130
    err = capsys.readouterr().err
    assert f"the last complete checkpoint is {checkpoint} (step 2): {rerun}" in err, err
    assert settings == [] or "the same command" not in err


def test_ctrl_c_with_resume_must_and_no_checkpoint_says_how_to_start_over(
        monkeypatch, tmp_path, capsys):
    import plait.recipes.rl

    _interrupted(monkeypatch, plait.recipes.rl, "train")
    assert main(["train", f"run.dir={tmp_path / 'run'}", "run.resume=must"]) == 130
    assert "no checkpoint yet" in (err := capsys.readouterr().err)
    assert err.rstrip().endswith("rerunning with run.resume=auto starts over"), err


def test_ctrl_c_in_eval_says_nothing_of_checkpoints(monkeypatch, tmp_path, capsys):
    import plait.recipes.evaluate

    _interrupted(monkeypatch, plait.recipes.evaluate, "evaluate_job")
    assert main(["eval", f"run.dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == "plait: interrupted\n"


def test_missing_ray_says_how_to_install_it(monkeypatch):
    from plait.config import ConfigError
    from plait.runtime.ray_launcher import _import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r'pip install -c constraints.txt -e "\.\[ray\]"'):
        _import_ray()
