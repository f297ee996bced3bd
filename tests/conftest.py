import os
import signal

import pytest

os.environ.setdefault("PLAIT_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A suite started in the background without job control (`cmd &` in a script) inherits
# SIGINT ignored, and so would every plait process it starts; the Ctrl-C tests need the
# signal delivered as a terminal delivers it, so the suite's children start with it on.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TESTS_DIR = os.path.dirname(__file__)

# A job small enough to run in seconds: a 2-layer, 32-wide model, no SFT.
TINY_JOB = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "data.num_train=512",
    "data.num_eval=16",
    "rollout.max_new_tokens=6",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "train.threads=2",
    "run.tensorboard=false",
    "run.progress=false",
]


@pytest.fixture
def float64_default():
    """Exact comparisons need float64; restore the default afterwards for other tests."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def tiny_job(tmp_path):
    """Overrides for a seconds-long job writing into a fresh run directory."""
    return [*TINY_JOB, f"run.dir={tmp_path / 'run'}"]


@pytest.fixture
def reward_spec():
    def spec(name):
        return f"{os.path.join(TESTS_DIR, 'helpers_rewards.py')}:{name}"

    return spec
