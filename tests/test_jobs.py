"""Jobs from user data and models: JSONL with a field mapping, a chat-templated local
model, rewards that read extra columns, and `plait eval` on the checkpoint."""

import json

from plait.cli import main
from plait.config import load_config
from plait.models.tiny import CHAR_CHAT_TEMPLATE, TinyModelSpec, save_tiny_model
from plait.recipes.rl import train


def test_jsonl_data_local_model_chat_template_and_eval(tmp_path, tiny_job, capsys):
    model_dir = save_tiny_model(tmp_path / "model", TinyModelSpec(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1),
        chat_template=CHAR_CHAT_TEMPLATE)
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"{a}+{b}=", "solution": str(a + b), "level": a % 3}
            for a in range(10) for b in range(10)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "def uses_columns(prompts, completions, answer, level, **kwargs):\n"
        "    assert len(answer) == len(level) == len(completions)\n"
        "    assert all(p.endswith('=') for p in prompts)\n"
        "    return [float(c.strip() == s) for c, s in zip(completions, answer)]\n")
    made_here = ("model.tiny.", "data.num_train=")  # no tiny model built, no rows generated
    overrides = [*(a for a in tiny_job if not a.startswith(made_here)),
                 f"model.path={model_dir}", "data.task=null",
                 f"data.train_path={data}", "data.fields={prompt: question, answer: solution}",
                 "data.num_eval=10", f"reward.functions=[{{fn: '{reward_file}:uses_columns'}}]",
                 "train.steps=2", "model.chat_template=always"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 2
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    assert main(["eval", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"].endswith("step_000002/policy")
    assert result["num_prompts"] == 10
    assert result["eval/accuracy"] == summary["accuracy_after"]


def test_reward_functions_take_a_mapped_column_by_its_own_name_or_plaits(tmp_path, tiny_job):
    """data.fields maps `solution` to plait's `answer`; a reward function written for the
    dataset (as for TRL) takes `solution=`, another takes `answer=`: both get the column."""
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(10) for b in range(5)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    calls = tmp_path / "calls.log"
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "def _check(name, prompts, completions, solution, answer, question):\n"
        "    assert question == prompts and solution == answer, name\n"
        "    assert all(s == str(eval(q[:-1])) for q, s in zip(question, solution)), name\n"
        f"    with open({str(calls)!r}, 'a') as log:\n"
        "        log.write(name + '\\n')\n"
        "    return [float(c.strip() == s) for c, s in zip(completions, solution)]\n"
        "\n"
        "def by_column(prompts, completions, solution, **kwargs):\n"
        "    return _check('by_column', prompts, completions, solution, kwargs['answer'],\n"
        "                  kwargs['question'])\n"
        "\n"
        "def by_plait_name(prompts, completions, answer, **kwargs):\n"
        "    return _check('by_plait_name', prompts, completions, kwargs['solution'], answer,\n"
        "                  kwargs['question'])\n")
    overrides = [*(a for a in tiny_job if not a.startswith("data.num_train=")),
                 "data.task=null", f"data.train_path={data}",
                 "data.fields={prompt: question, answer: solution}", "data.num_eval=8",
                 f"reward.functions=[{{fn: '{reward_file}:by_column'}}, "
                 f"{{fn: '{reward_file}:by_plait_name'}}]", "train.steps=1"]
    assert main(["train", *overrides]) == 0
    assert set(calls.read_text().split()) == {"by_column", "by_plait_name"}
