"""Corrupting the latest checkpoint of a real run: resuming and evaluating never load bad
weights. Each trial trains 2 checkpoints (once, copied per trial), damages the latest one,
runs the command line in-process, and checks what was loaded, the exit code and the line
printed."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_JOB
from safetensors.torch import load_file

import plait.recipes.checkpointing as checkpointing_module
import plait.recipes.session as session_module
import plait.train.checkpoint as checkpoint_module
from plait.cli import main
from plait.config import load_config
from plait.train.checkpoint import list_checkpoints, save_checkpoint

WEIGHTS = "policy/model.safetensors"
OPTIMIZER = "optimizers/policy.pt"


def job(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_JOB, f"run.dir={run_dir}", "train.steps=2", "train.save_every=1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run with the checkpoints step_000001 and step_000002."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *job(run_dir)]) == 0
    names = [path.name for path in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_000001", "step_000002"]
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, dict]]:
    """What every load_checkpoint call of a resume read: (checkpoint name, tensors loaded
    into its models and optimizers)."""
    real = checkpointing_module.load_checkpoint
    calls: list[tuple[str, dict]] = []

    def spy(path, *, models, optimizers=None, **kwargs):
        state = real(path, models=models, optimizers=optimizers, **kwargs)
        tensors = {f"{name}.{key}": value.detach().clone()
                   for name, model in models.items() for key, value in model.state_dict().items()}
        for name, optimizer in (optimizers or {}).items():
            inner = getattr(optimizer, "optimizer", optimizer)
            for index, slots in inner.state_dict()["state"].items():
                tensors.update({f"optimizer.{name}.{index}.{slot}": value
                                for slot, value in slots.items() if torch.is_tensor(value)})
        calls.append((Path(path).name, tensors))
        return state

    monkeypatch.setattr(checkpointing_module, "load_checkpoint", spy)
    return calls


# --------------------------------------------------------------------------- corruptions


def overwrite_tensor_bytes(file: Path) -> None:
    """Same size, every tensor byte 0xFF (a NaN in float32 and bfloat16)."""
    data = bytearray(file.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    data[header:] = b"\xff" * (len(data) - header)
    file.write_bytes(bytes(data))


def overwrite_largest_record(file: Path) -> None:
    """Same size: the largest tensor of a torch.save archive becomes 0xFF bytes (NaN)."""
    data = bytearray(file.read_bytes())
    with zipfile.ZipFile(file) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    offset = record.header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26:offset + 30])
    start = offset + 30 + name_length + extra_length
    data[start:start + record.file_size] = b"\xff" * record.file_size
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def bump_global_step(file: Path) -> None:
    """Same size, still valid JSON: the trainer state claims step 9 instead of 2."""
    text = file.read_text()
    assert '"global_step": 2,' in text
    file.write_text(text.replace('"global_step": 2,', '"global_step": 9,'))


def drop_file_list(file: Path) -> None:
    manifest = json.loads(file.read_text())
    del manifest["files"]
    manifest.pop("sha256", None)
    file.write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated weights": (WEIGHTS, truncate, "policy/model.safetensors has"),
    "same-size weights": (WEIGHTS, overwrite_tensor_bytes,
                          "policy/model.safetensors checksum mismatch"),
    "missing COMPLETE": ("COMPLETE", Path.unlink, "no COMPLETE manifest"),
    "empty manifest": ("COMPLETE", lambda file: file.write_bytes(b""),
                       "COMPLETE is not valid JSON"),
    "manifest without file list": ("COMPLETE", drop_file_list, "has no valid 'files'"),
    "same-size optimizer": (OPTIMIZER, overwrite_largest_record,
                            "optimizers/policy.pt checksum mismatch"),
    "same-size trainer state": ("trainer_state.json", bump_global_step,
                                "trainer_state.json checksum mismatch"),
}


def corrupt(run_dir: Path, step: int, kind: str) -> Path:
    relative, damage, _ = CORRUPTIONS[kind]
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    damage(path / relative)
    return path


def assert_finite(tensors: dict) -> None:
    for key, value in tensors.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"non-finite values loaded into {key}"


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_skips_a_corrupt_latest_checkpoint(run_dir, trained, loads, capsys, kind):
    """run.resume=auto: the previous checkpoint is loaded, the corrupt one is named in one
    line and renamed aside (kept), and the run saves a good checkpoint of that step again."""
    bad = corrupt(run_dir, 2, kind)
    good = run_dir / "checkpoints" / "step_000001"

    assert main(["train", *job(run_dir)]) == 0
    for _, tensors in loads:
        assert_finite(tensors)
    assert loads and {name for name, _ in loads} == {"step_000001"}
    saved = load_file(str(trained / "checkpoints" / "step_000001" / WEIGHTS))
    loaded = next(tensors for _, tensors in loads if any(k.startswith("policy.") for k in tensors))
    for key, value in saved.items():
        assert torch.equal(loaded[f"policy.{key}"], value), key

    err = capsys.readouterr().err
    reason = CORRUPTIONS[kind][2]
    lines = [line for line in err.splitlines() if line.startswith(f"plait: checkpoint {bad} ")]
    assert len(lines) == 1, err[-3000:]
    assert reason in lines[0]
    assert lines[0].endswith(f"renamed corrupt-step_000002 (kept for inspection); "
                             f"resuming from {good}")

    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == \
        ["corrupt-step_000002", "step_000001", "step_000002"]
    checkpoint_module.verify_checkpoint(checkpoints / "step_000002")  # saved again, intact
    assert json.loads((run_dir / "summary.json").read_text())["nan_skips"] == 0


def test_the_corrupt_checkpoint_set_aside_is_never_chosen_again(run_dir, loads, capsys):
    corrupt(run_dir, 2, "same-size weights")
    assert main(["train", *job(run_dir)]) == 0
    capsys.readouterr()
    loads.clear()

    assert main(["train", *job(run_dir, "train.steps=3", "train.keep_last=1")]) == 0
    captured = capsys.readouterr()
    assert "is corrupt" not in captured.err
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000002'} at step 2" in captured.out
    assert {name for name, _ in loads} == {"step_000002"}
    checkpoints = run_dir / "checkpoints"
    # rotation keeps the newest intact checkpoint and never touches the one set aside
    assert sorted(path.name for path in checkpoints.iterdir()) == \
        ["corrupt-step_000002", "step_000003"]


def test_resume_must_refuses_a_corrupt_latest_checkpoint(run_dir, loads, capsys):
    bad = corrupt(run_dir, 2, "same-size weights")
    good = run_dir / "checkpoints" / "step_000001"

    assert main(["train", *job(run_dir, "run.resume=must")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("plait: error:")]
    assert len(message) == 1, err[-3000:]
    assert f"latest checkpoint {bad} is corrupt" in message[0]
    assert "checksum mismatch" in message[0]
    assert f"the newest intact one is {good}" in message[0]
    assert "run.resume=auto" in message[0]
    assert loads == []
    assert bad.is_dir()  # nothing moved: the user decides


def test_resume_with_no_intact_checkpoint_says_so(run_dir, loads, capsys):
    corrupt(run_dir, 2, "same-size weights")
    corrupt(run_dir, 1, "same-size optimizer")

    assert main(["train", *job(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("plait: error:")]
    assert len(message) == 1, err[-3000:]
    assert "no intact checkpoint" in message[0]
    assert "step_000002 (policy/model.safetensors checksum mismatch)" in message[0]
    assert "step_000001 (optimizers/policy.pt checksum mismatch)" in message[0]
    assert loads == []
    names = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert names == ["step_000001", "step_000002"]


def test_two_ranks_resume_from_the_same_intact_checkpoint(run_dir, capfd):
    """Rank 0 verifies, renames the corrupt checkpoint aside and sends its choice; the
    other rank loads that one."""
    bad = corrupt(run_dir, 2, "same-size weights")
    good = run_dir / "checkpoints" / "step_000001"

    assert main(["train", *job(run_dir, "runtime.num_ranks=2")]) == 0
    captured = capfd.readouterr()
    assert f"plait: checkpoint {bad} is corrupt (policy/model.safetensors checksum mismatch)" \
        in captured.err, captured.err[-3000:]
    assert f"resumed from {good} at step 1 on 2 ranks" in captured.out
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == \
        ["corrupt-step_000002", "step_000001", "step_000002"]
    assert json.loads((run_dir / "summary.json").read_text())["nan_skips"] == 0


class FakeRank:
    """A rank of a 2-rank job: ``all_gather_objects`` returns rank 0's object first
    (``from_rank0`` on rank 1); what this rank sent is kept in ``sent``."""

    def __init__(self, rank: int, from_rank0: object = None) -> None:
        self.rank = self.global_rank = rank
        self.world_size, self.active, self.is_main = 2, True, rank == 0
        self.from_rank0 = from_rank0
        self.sent: list = []

    def all_gather_objects(self, obj, *, kind: str = "gather") -> list:
        self.sent.append(obj)
        return [obj, None] if self.rank == 0 else [self.from_rank0, obj]


def intact_checkpoints(root: Path, steps) -> list[Path]:
    model = torch.nn.Linear(2, 2)
    return [save_checkpoint(root, step, models={"policy": model}, keep_last=None,
                            trainer_state={"global_step": step}) for step in steps]


def resumed_from(run_dir: Path, dist: FakeRank) -> Path:
    """The checkpoint Session.try_resume on ``dist``'s rank goes on to load."""
    from plait.recipes import checkpointing

    class Chosen(Exception):
        pass

    def chosen(session, path, state):
        raise Chosen(path)

    session = object.__new__(session_module.Session)
    session.config = load_config(None, [f"run.dir={run_dir}"])
    session.run_dir, session.dist = run_dir, dist
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Chosen) as caught:
        patch.setattr(checkpointing, "check_resumable", chosen)
        session.try_resume()
    return Path(caught.value.args[0])


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path, capsys):
    """Ranks that each verified on their own could differ (a file damaged or repaired
    between their checks): the other ranks take rank 0's choice and verify nothing."""
    first, second = intact_checkpoints(tmp_path / "checkpoints", (1, 2))
    # rank 0 found step 2 corrupt; on its own, rank 1 would now take it
    assert resumed_from(tmp_path, FakeRank(1, from_rank0=str(first))) == first
    assert capsys.readouterr().err == ""

    overwrite_tensor_bytes(second / WEIGHTS)
    rank0 = FakeRank(0)
    assert resumed_from(tmp_path, rank0) == first
    assert rank0.sent == [str(first)]
    assert "renamed corrupt-step_000002" in capsys.readouterr().err


def test_rotation_counts_only_checkpoints_up_to_the_one_saved(tmp_path):
    """A newer checkpoint left in place (corrupt, its renaming aside failed; or an
    abandoned run's) takes no keep_last place from the intact ones before it."""
    root = tmp_path / "checkpoints"
    *_, newer = intact_checkpoints(root, (1, 2, 5))
    overwrite_tensor_bytes(newer / WEIGHTS)
    with pytest.warns(UserWarning, match="later steps"):
        saved = save_checkpoint(
            root, 3, models={"policy": torch.nn.Linear(2, 2)}, keep_last=2,
            trainer_state={"global_step": 3})
    assert saved.name == "step_000003"
    assert sorted(path.name for path in root.iterdir()) == \
        ["step_000002", "step_000003", "step_000005"]


# --------------------------------------------------------------------------- eval


@pytest.mark.parametrize("kind, message", [
    ("missing COMPLETE", "has no COMPLETE marker"),
    ("truncated weights", "is corrupt: policy/model.safetensors has"),
    ("same-size weights", "is corrupt: policy/model.safetensors checksum mismatch"),
])
def test_eval_refuses_a_corrupt_checkpoint(run_dir, capsys, kind, message):
    bad = corrupt(run_dir, 2, kind)
    assert main(["eval", *job(run_dir), "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"plait: error: checkpoint {bad}" in err and message in err, err[-3000:]


def test_eval_of_the_run_takes_the_latest_intact_checkpoint(run_dir, capsys):
    bad = corrupt(run_dir, 2, "same-size weights")
    good = run_dir / "checkpoints" / "step_000001"
    assert main(["eval", *job(run_dir)]) == 0
    captured = capsys.readouterr()
    assert f"plait: checkpoint {bad} is corrupt (policy/model.safetensors checksum mismatch); " \
           f"evaluating {good}" in captured.err
    result = json.loads(captured.out[captured.out.index("{"):])
    assert result["model"] == str(good / "policy")
    assert bad.is_dir()  # a reader renames nothing


def test_eval_needs_only_the_policy_files_intact(run_dir, capsys):
    path = corrupt(run_dir, 2, "same-size optimizer")
    assert main(["eval", *job(run_dir), "--checkpoint", str(path)]) == 0
    assert "is corrupt" not in capsys.readouterr().err


def test_eval_of_a_directory_holding_only_a_policy_model(run_dir, tmp_path, capsys):
    """Not a plait checkpoint (no manifest, no step_ name): evaluated as before."""
    exported = tmp_path / "exported"
    shutil.copytree(run_dir / "checkpoints" / "step_000002" / "policy", exported / "policy")
    assert main(["eval", *job(run_dir), "--checkpoint", str(exported)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["model"] == str(exported / "policy")
