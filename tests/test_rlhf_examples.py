"""The RLHF examples run end to end (shortened): SFT -> reward model -> GRPO against it,
and DPO from the same SFT model; each stage's output feeds the next."""

import json
from pathlib import Path

import pytest

from plait.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUIET = ["run.progress=false", "run.tensorboard=false", "train.threads=2"]


@pytest.mark.slow
def test_the_rlhf_examples_run_in_order(tmp_path):
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert main(["sft", str(EXAMPLES / "rlhf_sft.yaml"), *QUIET, "sft.steps=60",
                 f"run.dir={sft}"]) == 0
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert main(["rm", str(EXAMPLES / "rlhf_rm.yaml"), *QUIET, "rm.steps=30",
                 "pairs.num_pairs=400", "pairs.num_eval_pairs=64",
                 f"model.path={sft / 'sft_model'}", f"run.dir={rm}"]) == 0
    assert (rm / "reward_model" / "config.json").is_file()
    grpo = tmp_path / "grpo"
    assert main(["train", str(EXAMPLES / "rlhf_grpo.yaml"), *QUIET, "train.steps=3",
                 "train.eval_every=3", "train.save_every=0", "data.num_eval=16",
                 f"model.path={sft / 'sft_model'}",
                 f"reward.functions=[{{model: '{rm / 'reward_model'}'}}, "
                 "{fn: task, weight: 0}]", f"run.dir={grpo}"]) == 0
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/reward_fn/reward_model" in r and "eval/reward_fn/task" in r
               for r in rows)
    assert main(["dpo", str(EXAMPLES / "rlhf_dpo.yaml"), *QUIET, "dpo.steps=10",
                 "dpo.eval_every=0", "pairs.num_pairs=256", "pairs.num_eval_pairs=64",
                 f"model.path={sft / 'sft_model'}", f"run.dir={tmp_path / 'dpo'}"]) == 0
    assert (tmp_path / "dpo" / "dpo_model" / "config.json").is_file()
