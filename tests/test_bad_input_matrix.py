"""Bad input and faults as a user meets them, one case per row.

Every case prepares a directory, runs the ``plait`` command in-process on it and asserts
the exit code, that the output carries exactly one ``plait: error:`` line naming the
cause and no traceback, and that no file that existed before changed (the user's own
files, earlier checkpoints, the config.yaml of a run that did not start). New files may
appear only inside the run directory. Signals and a killed rank run as real ``plait
train`` processes at the end. Deeper trials live beside the code they test
(test_checkpoint_corruption, test_reward_faults, test_rank_faults, test_run_dir).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_JOB

from plait.cli import main

RUN = "run"


@dataclass(frozen=True)
class Case:
    """``prepare(tmp)`` writes what the case needs and returns the command's arguments."""

    name: str
    prepare: Callable[[Path], list[str]]
    says: tuple[str, ...]
    code: int = 1


def _job(tmp: Path, *extra: str) -> list[str]:
    return ["train", *TINY_JOB, f"run.dir={tmp / RUN}", "train.steps=1", *extra]


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _yaml(tmp: Path, text: str, *extra: str) -> list[str]:
    return ["train", str(_write(tmp, "job.yaml", text)), *TINY_JOB, f"run.dir={tmp / RUN}",
            "train.steps=1", *extra]


def _data(tmp: Path, text: str, *extra: str) -> list[str]:
    path = _write(tmp, "data.jsonl", text)
    job = _job(tmp, "data.task=null", f"data.train_path={path}", *extra)
    return [a for a in job if not a.startswith("data.num_train=")]  # no rows are generated


def _reward(tmp: Path, body: str, *extra: str) -> list[str]:
    path = _write(tmp, "my_rewards.py", body)
    return _job(tmp, f"reward.functions=[{{fn: '{path}:score'}}]", "algo.reward_range=[0, 1]",
                *extra)


_TINY_MODEL: dict[str, Path] = {}


def _model_copy(tmp: Path, tiny_source: Path) -> Path:
    target = tmp / "model"
    shutil.copytree(tiny_source, target)
    return target


def _model(tmp: Path, fault: Callable[[Path], None], key: str = "model.path") -> list[str]:
    directory = _model_copy(tmp, _TINY_MODEL["dir"])
    fault(directory)
    uses = {"model.path": [], "model.ref_path": ["algo.kl_coef=0.05"]}[key]  # the key acts
    job = _job(tmp, f"{key}={directory}", "data.num_eval=4", *uses)
    return [a for a in job if key != "model.path" or not a.startswith("model.tiny.")]


def _remove(*names: str) -> Callable[[Path], None]:
    def fault(directory: Path) -> None:
        for name in names:
            (directory / name).unlink(missing_ok=True)
    return fault


def _unsafe_pickle(directory: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save({"state": weights, "extra": Path("not a tensor")}, directory / "pytorch_model.bin")


def _truncate(name: str) -> Callable[[Path], None]:
    def fault(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 3])
    return fault


def _existing_run(tmp: Path, *extra: str) -> list[str]:
    """A finished 1-step run in tmp/run; the case then starts it again with ``extra``."""
    assert main(_job(tmp, "train.save_every=1")) == 0
    return _job(tmp, *extra)


def _user_dir(tmp: Path) -> Path:
    own = tmp / "my_project"
    _write(tmp, "my_project/notes.txt", "my own notes\n")
    _write(tmp, "my_project/src/code.py", "print('hello')\n")
    return own


def _incomplete_checkpoint(tmp: Path) -> list[str]:
    assert main(_job(tmp, "train.save_every=1")) == 0
    ckpt = tmp / RUN / "checkpoints" / "step_000001"
    (ckpt / "COMPLETE").unlink()
    return ["eval", *TINY_JOB, f"run.dir={tmp / RUN}", "data.num_eval=4", "--checkpoint",
            str(ckpt)]


def _truncated_checkpoint(tmp: Path) -> list[str]:
    assert main(_job(tmp, "train.save_every=1")) == 0
    ckpt = tmp / RUN / "checkpoints" / "step_000001"
    _truncate("model.safetensors")(ckpt / "policy")
    return ["eval", *TINY_JOB, f"run.dir={tmp / RUN}", "data.num_eval=4", "--checkpoint",
            str(ckpt)]


CONFIG_CASES = [
    Case("unknown-key", lambda t: _job(t, "train.stepz=3"), ("did you mean 'train.steps'",), 2),
    Case("unknown-section", lambda t: _job(t, "trian.steps=3"), ("'trian'", "did you mean"), 2),
    Case("unknown-key-in-yaml", lambda t: _yaml(t, "algo:\n  group_sise: 4\n"),
         ("job.yaml", "algo.group_size"), 2),
    Case("wrong-type-int", lambda t: _job(t, "train.steps=many"), ("train.steps", "integer"), 2),
    Case("wrong-type-bool", lambda t: _job(t, "run.progress=maybe"), ("run.progress",), 2),
    Case("below-minimum", lambda t: _job(t, "algo.group_size=0"), ("algo.group_size", "minimum"),
         2),
    Case("choice-typo", lambda t: _job(t, "algo.name=gpro"), ("algo.name", "'grpo'"), 2),
    Case("not-yaml", lambda t: _yaml(t, "algo: [1, 2\n"), ("job.yaml", "not valid YAML"), 2),
    Case("yaml-top-level-list", lambda t: _yaml(t, "- 1\n- 2\n"), ("job.yaml", "mapping"), 2),
    Case("duplicate-yaml-key", lambda t: _yaml(t, "train:\n  steps: 3\n  steps: 4\n"),
         ("job.yaml", "steps", "line 3"), 2),
    Case("missing-config-file", lambda t: ["train", str(t / "nope.yaml")], ("nope.yaml",), 2),
    Case("override-without-value", lambda t: _job(t, "train.steps"), ("key=value",), 2),
    Case("ppo-without-critic", lambda t: _job(t, "algo.name=ppo", "algo.advantage=grpo"),
         ("algo.advantage", "critic"), 2),
    Case("grpo-group-of-one", lambda t: _job(t, "algo.group_size=1"), ("group_size",), 2),
    Case("reversed-reward-range", lambda t: _job(t, "algo.reward_range=[1, 0]"),
         ("algo.reward_range",), 2),
    Case("ranks-do-not-divide-prompts", lambda t: _job(t, "runtime.num_ranks=3"),
         ("multiple of runtime.num_ranks",), 2),
    Case("cuda-without-gpu", lambda t: _job(t, "train.device=cuda"), ("cuda",), 2),
    Case("nccl-on-the-cpu", lambda t: _job(t, "runtime.num_ranks=2", "runtime.backend=nccl",
                                           "train.device=cpu"),
         ("runtime.backend=nccl", "gloo"), 2),
]

DATA_CASES = [
    Case("missing-data-file", lambda t: _job(t, "data.task=null",
                                             f"data.train_path={t / 'none.jsonl'}"),
         ("none.jsonl", "does not exist"), 2),
    Case("bad-json-line", lambda t: _data(t, '{"prompt": "1+1="}\nnot json\n'),
         ("data.jsonl", "line 2")),
    Case("row-without-prompt", lambda t: _data(t, '{"prompt": "1+1="}\n{"q": "2+2="}\n'),
         ("data.jsonl", "2", "prompt")),
    Case("prompt-not-text", lambda t: _data(t, '{"prompt": "1+1="}\n{"prompt": 5}\n'),
         ("data.jsonl", "2")),
    Case("empty-data-file", lambda t: _data(t, ""), ("data.jsonl",)),
    Case("too-few-rows-for-eval", lambda t: _data(t, '{"prompt": "1+1="}\n' * 3,
                                                  "data.num_eval=16"),
         ("data.num_eval",), 2),
    Case("prompt-too-long", lambda t: _data(t, '{"prompt": "%s"}\n' % ("1+" * 200) * 40,
                                            "data.max_prompt_tokens=64", "data.num_eval=4"),
         ("max_prompt_tokens", "row 1"), 2),
    Case("field-mapping-to-absent-column",
         lambda t: _data(t, '{"question": "1+1="}\n' * 40, "data.fields={prompt: query}"),
         ("query",)),
    Case("unknown-task", lambda t: _job(t, "data.task=additon"), ("addition",), 2),
]

MODEL_CASES = [
    Case("hub-id", lambda t: _job(t, "model.path=org/some-model"),
         ("local paths",), 2),
    Case("missing-model-dir", lambda t: _job(t, f"model.path={t / 'nowhere'}"),
         ("does not exist",), 2),
    Case("model-without-config", lambda t: _model(t, _remove("config.json")),
         ("config.json",), 2),
    Case("model-without-tokenizer",
         lambda t: _model(t, _remove("tokenizer.json", "tokenizer_config.json",
                                     "special_tokens_map.json")),
         ("model.path", "tokenizer.json"), 2),
    Case("model-without-weights", lambda t: _model(t, _remove("model.safetensors")),
         ("model.path", "model.safetensors"), 2),
    Case("unsafe-pickle-weights", lambda t: _model(t, _unsafe_pickle),
         ("safetensors", "pytorch_model.bin"), 2),
    Case("truncated-weights", lambda t: _model(t, _truncate("model.safetensors")),
         ("model.safetensors",), 2),
    Case("broken-config-json", lambda t: _model(t, lambda d: (d / "config.json").write_text("{")),
         ("config.json",), 2),
    Case("reference-without-weights",
         lambda t: _model(t, _remove("model.safetensors"), key="model.ref_path"),
         ("model.ref_path", "model.safetensors"), 2),
]

REWARD_CASES = [
    Case("reward-file-missing", lambda t: _job(t, f"reward.functions=[{{fn: '{t}/no.py:f'}}]"),
         ("no.py",)),
    Case("reward-function-missing", lambda t: _reward(t, "def other(p, c, **k):\n    return []\n"),
         ("score",)),
    Case("reward-module-raises-on-import",
         lambda t: _reward(t, "raise RuntimeError('cannot import me')\n"),
         ("my_rewards.py", "cannot import me")),
    Case("reward-raises", lambda t: _reward(
        t, "def score(prompts, completions, **k):\n    raise ValueError('bad sample')\n"),
         ("score", "bad sample")),
    Case("reward-wrong-length", lambda t: _reward(t, "def score(prompts, completions, **k):\n    return [0.0]\n"),
         ("score",)),
    Case("reward-not-numbers", lambda t: _reward(
        t, "def score(prompts, completions, **k):\n    return ['x' for _ in completions]\n"), ("score",)),
    Case("reward-nan", lambda t: _reward(
        t, "def score(prompts, completions, **k):\n    return [float('nan') for _ in completions]\n"), ("score", "NaN")),
    Case("reward-hangs", lambda t: _reward(
        t, "import time\ndef score(prompts, completions, **k):\n    time.sleep(600)\n", "reward.timeout_s=1"),
         ("score", "time limit")),
    Case("reward-import-hangs", lambda t: _reward(
        t, "import time\ntime.sleep(600)\ndef score(prompts, completions, **k):\n    return [0.0 for _ in completions]\n",
        "reward.timeout_s=1"), ("my_rewards.py",)),
]

RUN_CASES = [
    Case("overwrite-user-directory",
         lambda t: _job(t, f"run.dir={_user_dir(t)}", "run.overwrite=true"),
         ("my_project",), 2),
    Case("overwrite-working-directory", lambda t: _job(t, "run.dir=.", "run.overwrite=true"),
         ("run.dir",), 2),
    Case("run-dir-is-a-file", lambda t: _job(t, f"run.dir={_write(t, 'afile', 'x')}"),
         ("afile",), 2),
    Case("resume-must-without-checkpoint", lambda t: _job(t, "run.resume=must"),
         ("run.resume",), 2),
    Case("resume-never-with-checkpoints", lambda t: _existing_run(t, "run.resume=never"),
         ("run.resume",), 2),
    Case("resume-with-other-algorithm", lambda t: _existing_run(t, "algo.name=ppo",
                                                                "algo.advantage=gae"),
         ("algo.name",), 2),
    Case("resume-with-other-model-shape",
         lambda t: _existing_run(t, "model.tiny.num_layers=3", "train.steps=2"),
         ("model.tiny.num_layers",), 2),
    Case("eval-incomplete-checkpoint", _incomplete_checkpoint, ("COMPLETE",)),
    Case("eval-truncated-checkpoint", _truncated_checkpoint, ("step_000001",)),
]

CASES = CONFIG_CASES + DATA_CASES + MODEL_CASES + REWARD_CASES + RUN_CASES


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (Python's bytecode caches left out)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module", autouse=True)
def tiny_model_dir(tmp_path_factory):
    from plait.models.tiny import TinyModelSpec, save_tiny_model

    directory = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_model(directory, TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2,
                                             num_heads=2, num_kv_heads=1))
    _TINY_MODEL["dir"] = directory
    yield directory


def test_the_matrix_is_broad():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_gives_one_clear_line(case, tmp_path, monkeypatch, capfd):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = case.prepare(work)
    capfd.readouterr()
    before = _snapshot(work)
    code = main(argv)
    out, err = capfd.readouterr()
    text = out + err
    errors = [line for line in text.splitlines() if line.startswith("plait: error:")]
    assert code == case.code, text[-3000:]
    assert len(errors) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for fragment in case.says:
        assert fragment in errors[0], errors[0]
    after = _snapshot(work)
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    assert not changed, f"files changed or removed: {changed}"
    added = sorted(name for name in after.keys() - before.keys()
                   if not name.startswith(RUN + "/"))
    assert not added, f"files written outside the run directory: {added}"


def test_pickle_fixture_is_refused_by_safe_loading(tmp_path):
    """The unsafe-pickle case really holds something torch's safe loader refuses."""
    import torch

    directory = _model_copy(tmp_path, _TINY_MODEL["dir"])
    _unsafe_pickle(directory)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(directory / "pytorch_model.bin", weights_only=True)
    assert json.loads((directory / "config.json").read_text())["model_type"]


# ----------------------------------------------------------------- signals and ranks
# The same promises for a job stopped from outside, run as a real ``plait train`` process:
# its exit code, one line leading with the cause, no traceback, no user file changed, and
# the checkpoint it names intact.


def _start(work: Path, *extra: str):
    import os
    import subprocess
    import sys

    err = open(work / "stderr.txt", "w")  # noqa: SIM115 (closed by _finish)
    proc = subprocess.Popen([sys.executable, "-m", "plait.cli", "train", *TINY_JOB,
                             f"run.dir={work / RUN}", "train.steps=100000", *extra],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=work,
                            env={**os.environ, "PLAIT_PROGRESS": "0"})
    return proc, err


def _wait_for_checkpoint(proc, work: Path, timeout: float = 120.0) -> None:
    import time

    from plait.train.checkpoint import latest_checkpoint

    deadline = time.time() + timeout
    while latest_checkpoint(work / RUN / "checkpoints") is None:
        assert proc.poll() is None and time.time() < deadline, \
            (work / "stderr.txt").read_text()[-3000:]
        time.sleep(0.1)


def _finish(proc, err, work: Path, code: int, says: tuple[str, ...], prefix: str,
            before: dict[str, str]) -> None:
    import subprocess

    from plait.train.checkpoint import latest_checkpoint, verify_checkpoint

    try:
        returncode = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a job training on after the test
        proc.wait()
        err.close()
        pytest.fail(f"the job still ran 30 s later:\n{(work / 'stderr.txt').read_text()[-2000:]}")
    err.close()
    assert returncode == code
    text = (work / "stderr.txt").read_text()
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    for fragment in says:
        assert fragment in lines[0], lines[0]
    latest = latest_checkpoint(work / RUN / "checkpoints")
    assert latest is not None and latest.name in lines[0] + text
    verify_checkpoint(latest)
    after = _snapshot(work)
    assert all(after.get(name) == digest for name, digest in before.items())


@pytest.mark.parametrize("signum, says", [("SIGINT", ("last complete checkpoint",)),
                                          ("SIGTERM", ("last complete checkpoint",))])
def test_a_signalled_job_stops_at_once_naming_its_checkpoint(signum, says, tmp_path):
    import signal
    import time

    work = tmp_path / "work"
    _write(work, "notes.txt", "my own notes\n")
    before = _snapshot(work)
    proc, err = _start(work, "train.save_every=3")
    _wait_for_checkpoint(proc, work)
    sent = time.time()
    proc.send_signal(getattr(signal, signum))
    _finish(proc, err, work, 130, says, "plait: interrupted", before)
    assert time.time() - sent < 15


@pytest.mark.slow  # a dead rank: test_runtime keeps a fast case
def test_a_killed_rank_ends_the_job_naming_it(tmp_path, reward_spec):
    work = tmp_path / "work"
    _write(work, "notes.txt", "my own notes\n")
    before = _snapshot(work)
    proc, err = _start(work, "runtime.num_ranks=2", "train.save_every=2", "train.threads=1",
                       f"reward.functions=[{{fn: '{reward_spec('kill_rank1')}'}}]",
                       "algo.reward_range=[0, 1]")
    _finish(proc, err, work, 1, ("rank 1",), "plait: error:", before)
