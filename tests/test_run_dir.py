"""The run directory is plait's alone and its record is honest: run.overwrite deletes only
plait's own runs (never the working directory, an ancestor of it or the home directory),
a start is refused in a directory holding the user's files, a failed start leaves every
file as it was, and a resume whose config changes the model or the algorithm is refused
with the keys named, while harmless changes go on and are listed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_JOB

from plait.config import ConfigError, load_config
from plait.recipes.rl import train


def job(run_dir: Path, *extra: str):
    return load_config(None, [*TINY_JOB, f"run.dir={run_dir}", "train.steps=1",
                              "data.num_eval=4", *extra])


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 1-step run with a checkpoint; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(job(run_dir, "train.save_every=1"))
    return run_dir


@pytest.fixture
def existing_run(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def user_dir(tmp_path: Path) -> Path:
    own = tmp_path / "my_project"
    (own / "src").mkdir(parents=True)
    (own / "notes.txt").write_text("my own notes\n")
    (own / "src" / "code.py").write_text("print('hello')\n")
    return own


# ------------------------------------------------------------------ run.overwrite


def test_overwrite_refuses_a_directory_that_is_not_a_plait_run(tmp_path):
    own = user_dir(tmp_path)
    before = snapshot(own)
    with pytest.raises(ConfigError, match="my_project.*not one"):
        train(job(own, "run.overwrite=true"))
    assert snapshot(own) == before


def test_launched_job_refuses_before_the_launcher_deletes(tmp_path, capsys):
    """Several ranks: the launcher settles run.overwrite, after the same check."""
    from plait.cli import main

    own = user_dir(tmp_path)
    before = snapshot(own)
    argv = ["train", *TINY_JOB, f"run.dir={own}", "train.steps=1", "data.num_eval=4",
            "runtime.num_ranks=2", "run.overwrite=true"]
    assert main(argv) == 2
    assert "my_project" in capsys.readouterr().err
    assert snapshot(own) == before


@pytest.mark.parametrize("run_dir", [".", ".."], ids=["working-dir", "its-parent"])
def test_overwrite_never_deletes_the_working_directory_or_its_ancestors(
        tmp_path, monkeypatch, run_dir):
    work = tmp_path / "work"
    work.mkdir()
    for directory in (tmp_path, work):  # even marked as plait runs
        (directory / ".plait-run").write_text(json.dumps({"plait_run": 1}))
    (work / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="run.dir.*working directory"):
        train(job(Path(run_dir), "run.overwrite=true"))
    assert snapshot(tmp_path) == before


def test_overwrite_never_deletes_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".plait-run").write_text(json.dumps({"plait_run": 1}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="home directory"):
        train(job(home, "run.overwrite=true"))
    assert (home / ".plait-run").is_file()


def test_overwrite_replaces_a_plait_run_marked_or_from_before_the_marker(existing_run):
    from plait.runtime.run_dir import RUN_MARKER, check_run_dir, is_plait_run

    assert is_plait_run(existing_run) and (existing_run / RUN_MARKER).is_file()
    (existing_run / RUN_MARKER).unlink()  # a run made before plait wrote the marker
    assert is_plait_run(existing_run)
    (existing_run / "config.yaml").write_text("not: [a plait config\n")
    assert not is_plait_run(existing_run)
    with pytest.raises(ConfigError, match="not one"):
        check_run_dir(job(existing_run, "run.overwrite=true"))


def test_overwrite_of_an_existing_run_starts_it_afresh(existing_run):
    (existing_run / "metrics.jsonl").write_text("")  # plait's own files go
    summary = train(job(existing_run, "run.overwrite=true", "run.resume=never"))
    assert summary["steps"] == 1
    assert (existing_run / "metrics.jsonl").read_text()
    assert (existing_run / ".plait-run").is_file()


@pytest.mark.parametrize("entry", ["notes.txt", "other_run/.plait-run"],
                         ids=["users-file", "nested-run"])
def test_overwrite_refuses_a_run_holding_what_plait_did_not_write(existing_run, entry):
    (existing_run / entry).parent.mkdir(parents=True, exist_ok=True)
    (existing_run / entry).write_text("{}\n")
    before = snapshot(existing_run)
    name = entry.split("/")[0]
    with pytest.raises(ConfigError, match=rf"holds files plait did not write \({name}\)"):
        train(job(existing_run, "run.overwrite=true", "run.resume=never"))
    assert snapshot(existing_run) == before


def test_overwrite_refuses_a_run_holding_inputs_of_the_job(existing_run):
    """A model, data or reward file the job reads, kept inside the run it would delete
    (here under plait's own entries, so that only the inputs are in question)."""
    from plait.runtime.run_dir import check_run_dir

    prompts = existing_run / "logs" / "prompts.jsonl"
    prompts.parent.mkdir(exist_ok=True)
    prompts.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    reward = existing_run / "logs" / "my_reward.py"
    reward.write_text("def score(prompts, completions, **kwargs):\n    return [0.0]\n")
    inputs = {"model.path": f"model.path={existing_run / 'tiny_model'}",
              "data.train_path": f"data.train_path={prompts}",
              "reward.functions[0].fn": f"reward.functions=[{{fn: '{reward}:score'}}]"}
    for key, override in inputs.items():
        with pytest.raises(ConfigError, match=rf"inputs of this job \({re.escape(key)} "):
            check_run_dir(job(existing_run, "run.overwrite=true", override))
    with pytest.raises(ConfigError) as caught:
        check_run_dir(job(existing_run, "run.overwrite=true", *inputs.values()))
    assert "\n" not in str(caught.value)
    assert all(key in str(caught.value) for key in inputs)
    check_run_dir(job(existing_run, *inputs.values()))  # without overwrite: nothing is deleted


def test_a_launched_job_that_died_before_its_first_step_can_be_overwritten(tmp_path):
    """The launcher marks the run directory before any rank starts: a job whose ranks
    died before rank 0 settled the directory leaves logs/ in a plait run."""
    from plait.runtime.launch import prepare_job
    from plait.runtime.run_dir import RUN_MARKER, check_run_dir

    run_dir = tmp_path / "run"
    prepare_job(job(run_dir, "runtime.num_ranks=2"))
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "logs" / "rank1.log").write_text("Traceback (most recent call last):\n")
    check_run_dir(job(run_dir, "run.overwrite=true"))

    from plait.runtime.run_dir import mark_run_dir

    marker = (run_dir / RUN_MARKER).read_text()
    mark_run_dir(run_dir)  # written once: a marked directory is left as it is
    assert (run_dir / RUN_MARKER).read_text() == marker
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")] == []


# ------------------------------------------------------------------ what run.dir may be


def test_run_dir_that_is_a_file_is_a_config_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="afile.*is a file"):
        train(job(afile))
    assert afile.read_text() == "x"


def test_start_in_a_directory_holding_the_users_files_is_refused(tmp_path):
    own = user_dir(tmp_path)
    before = snapshot(own)
    with pytest.raises(ConfigError, match="my_project.*notes.txt, src"):
        train(job(own))
    assert snapshot(own) == before


def test_directories_plait_may_start_in(tmp_path):
    """New, empty, or holding only what plait itself writes (the launcher's logs/)."""
    from plait.runtime.run_dir import check_run_dir

    check_run_dir(job(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_run_dir(job(tmp_path / "empty"))
    (tmp_path / "launched" / "logs").mkdir(parents=True)
    check_run_dir(job(tmp_path / "launched"))


# ------------------------------------------------------------------ the record of a run


@pytest.mark.parametrize("change", [
    ("algo.name=ppo", "algo.advantage=gae"),  # refused by the resume's config check
    ("reward.functions=[{fn: 'no_such_file.py:score'}]",),  # fails while the job is built
], ids=["other-algorithm", "missing-reward"])
def test_failed_start_leaves_the_run_byte_identical(existing_run, change):
    from plait.rewards import RewardLoadError
    from plait.train.checkpoint import CheckpointError

    before = snapshot(existing_run)
    with pytest.raises((ConfigError, CheckpointError, RewardLoadError)):
        train(job(existing_run, *change, "train.steps=2"))
    assert snapshot(existing_run) == before


def test_resume_with_another_algorithm_names_the_keys(existing_run):
    with pytest.raises(ConfigError, match=r"algo\.name grpo -> ppo, algo\.advantage auto -> "
                       r"gae.*run\.overwrite=true or a new run\.dir"):
        train(job(existing_run, "algo.name=ppo", "algo.advantage=gae", "train.steps=2"))


def test_config_yaml_is_written_only_when_the_run_starts(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="run.resume is 'must'"):
        train(job(run_dir, "run.resume=must"))
    assert not (run_dir / "config.yaml").exists()
    assert (run_dir / ".plait-run").is_file()  # a new run is marked as plait's at once


def test_resume_with_another_model_shape_is_refused(existing_run):
    with pytest.raises(ConfigError, match=r"model\.tiny\.num_layers 2 -> 3"):
        train(job(existing_run, "model.tiny.num_layers=3", "train.steps=2"))


def test_resume_with_harmless_changes_lists_them(existing_run, capsys):
    summary = train(job(existing_run, "train.steps=2", "train.eval_every=1",
                        "train.keep_last=1", "algo.micro_batch_size=8"))
    out = capsys.readouterr().out
    assert "resumed from" in out
    line = next(line for line in out.splitlines() if "resuming with changed settings" in line)
    for change in ("train.steps 1 -> 2", "train.eval_every 0 -> 1", "train.keep_last 2 -> 1",
                   "algo.micro_batch_size 64 -> 8"):
        assert change in line
    assert summary["steps"] == 2
    state = json.loads((existing_run / "checkpoints" / "step_000002" /
                        "trainer_state.json").read_text())
    assert state["config"]["train"]["steps"] == 2  # the next resume compares with this


def test_checkpoint_without_its_config_is_compared_with_config_yaml(existing_run):
    """Checkpoints made before they held their config: the run's config.yaml decides."""
    from plait.recipes.checkpointing import check_resumable

    def check(*overrides):
        session = SimpleNamespace(run_dir=existing_run, config=job(existing_run, *overrides),
                                  dist=SimpleNamespace(is_main=True))
        check_resumable(session, existing_run / "checkpoints", {"data": {}})

    check("train.steps=5")
    with pytest.raises(ConfigError, match=r"optim\.lr 1e-05 -> 0\.5"):
        check("optim.lr=0.5")


def test_tiny_model_of_a_run_without_checkpoint_is_not_silently_reused(existing_run):
    """A run that died in its warm start: its tiny model was built, no checkpoint yet."""
    shutil.rmtree(existing_run / "checkpoints")
    before = snapshot(existing_run)
    with pytest.raises(ConfigError, match=r"model\.tiny\.hidden_size 32 -> 48"):
        train(job(existing_run, "model.tiny.hidden_size=48"))
    assert snapshot(existing_run) == before


def test_the_launcher_checks_without_importing_torch():
    """plait train's launcher process checks run.dir before it starts the ranks; that
    check must not cost it torch's import time and memory."""
    import subprocess
    import sys

    code = "import sys, plait.runtime.run_dir; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_longer_run_with_a_decaying_schedule_says_the_rate_changes(existing_run, capsys):
    """More train.steps on resume stretch a linear or cosine schedule: the line says so."""
    from plait.config import config_to_dict
    from plait.recipes.checkpointing import check_resumable

    made = config_to_dict(job(existing_run, "optim.schedule=cosine"))
    for steps, said in ((5, True), (1, False)):
        session = SimpleNamespace(
            run_dir=existing_run, dist=SimpleNamespace(is_main=True),
            config=job(existing_run, "optim.schedule=cosine", f"train.steps={steps}",
                       "train.eval_every=1"))
        check_resumable(session, existing_run / "checkpoints", {"config": made})
        line = capsys.readouterr().out
        assert ("learning-rate schedule" in line) is said, line
