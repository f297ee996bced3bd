"""Does the bias probe detect bias? Controls of known bias, and the default job's models.

Two control models are fitted from one tiny character-level model (its vocabulary holds
upper case and punctuation, so the probe's text is read as written) with ``plait sft`` on
the probe's *train* items (same groups and occupations, other sentences): the **biased**
control always answers the stereotyped option and the stereotyped pronoun; the
**unbiased** control answers the correct option (the unknown one when the context does
not settle the question) and the neutral pronoun. Each is fitted under all three
conditions' prompts. ``plait eval`` then runs the built-in probe (the test items) on the
untrained start, both controls and, with ``--default-job RUN_DIR``, that job's SFT start
and final checkpoint.

    python benchmarks/bias_probes.py --seeds 0 1 --default-job runs/grpo_addition \
        --out benchmarks/results/bias_probes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import save  # noqa: E402

THOUGHT = "I will answer from what the text says."


def base_model(work: Path, seed: int, hidden: int = 128, layers: int = 4) -> Path:
    """A tiny model whose character vocabulary covers the probe's text."""
    from plait.data.tasks import CHAR_VOCAB
    from plait.models.loading import save_model_dir
    from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model

    out = work / f"start_{seed}"
    if not (out / "config.json").is_file():
        tokenizer = build_char_tokenizer(CHAR_VOCAB + string.ascii_uppercase + ".,?:;'()_-!")
        spec = TinyModelSpec(hidden_size=hidden, intermediate_size=3 * hidden,
                             num_layers=layers, max_position_embeddings=1024)
        model = build_tiny_model(spec, tokenizer, seed=seed)
        save_model_dir(model, tokenizer, out)
    return out


def control_rows(kind: str, split: str = "train") -> list[dict]:
    """SFT rows of a control: every item of ``split`` under every condition's prompt."""
    from plait.config import BiasConfig
    from plait.evals.bias import CONDITIONS, ambiguity_question, pronoun_question, user_text
    from plait.evals.probes import builtin_ambiguity_items, builtin_pronoun_items

    bias = BiasConfig()
    rows = []
    for item in builtin_ambiguity_items(split):
        option = item.options[item.biased if kind == "biased" else item.answer]
        rows += [_row(user_text(ambiguity_question(item), c, bias), option, c, bias)
                 for c in CONDITIONS]
    for item in builtin_pronoun_items(split):
        stereotyped = item.female if item.female_share > 0.5 else item.male
        option = stereotyped if kind == "biased" else item.neutral
        rows += [_row(user_text(pronoun_question(item), c, bias), option, c, bias)
                 for c in CONDITIONS]
    return rows


def _row(text: str, option: str, condition: str, bias) -> dict:
    if condition == "Q+IF+CoT":
        return {"prompt": f"{text}{bias.cot_prompt} ",
                "answer": f"{THOUGHT}\n{bias.answer_prompt} {option}"}
    return {"prompt": f"{text}{bias.answer_prompt}", "answer": f" {option}"}


def fit_control(work: Path, kind: str, seed: int, steps: int, lr: float = 2e-3,
                split: str = "train", start: Path | None = None, batch: int = 8) -> Path:
    from plait.config import load_config
    from plait.recipes.sft import train_sft

    run = work / f"{kind}_{seed}"
    if (run / "sft_model" / "config.json").is_file():
        return run / "sft_model"
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in control_rows(kind, split)))
    config = load_config(None, [
        f"model.path={start or base_model(work, seed)}", "data.task=null",
        f"data.train_path={data}",
        "data.num_eval=16", "data.max_prompt_tokens=1024", f"sft.steps={steps}",
        f"sft.batch_size={batch}", f"sft.lr={lr}", "sft.packing=true", "sft.max_length=1024",
        f"train.seed={seed}", f"run.dir={run}", "run.overwrite=true", "run.progress=false",
        "run.tensorboard=false"])
    train_sft(config)
    return run / "sft_model"


def probe(models: list[Path], run_dir: Path, max_items: int | None) -> list[dict]:
    from plait.config import load_config
    from plait.recipes.evaluate import evaluate_job

    overrides = [f"model.path={models[0]}", f"run.dir={run_dir}", "data.num_eval=8",
                 "data.max_prompt_tokens=1024", "eval.bias.bbq=builtin",
                 "eval.bias.winogender=builtin", "run.progress=false",
                 "run.tensorboard=false", "rollout.max_new_tokens=8"]
    if max_items:
        overrides.append(f"eval.bias.max_items={max_items}")
    result = evaluate_job(load_config(None, overrides), checkpoint=[str(m) for m in models])
    records = result.get("results", [result])
    return [r["bias"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1200, help="SFT steps of each control")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="SFT learning rate of each control")
    parser.add_argument("--fit-on", choices=("train", "test"), default="train",
                        help="items the controls are fitted on: the probe's train items "
                             "(other sentences), or its own test items (known bias on "
                             "exactly what is probed)")
    parser.add_argument("--default-job", type=Path, default=None,
                        help="a finished default job's run dir: probe its SFT start "
                             "(sft_model/) and its last checkpoint too")
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8, help="SFT batch of each control")
    parser.add_argument("--hidden", type=int, default=128,
                        help="hidden width of the controls' start model (MLP 3x)")
    parser.add_argument("--layers", type=int, default=4,
                        help="decoder layers of the controls' start model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/plait-bench-bias"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from plait.evals.bias import format_bias_table, plot_bias

    records = []
    for seed in args.seeds:
        start = base_model(args.work, seed, args.hidden, args.layers)
        models = [start] + [fit_control(args.work, kind, seed, args.steps, args.lr,
                                        args.fit_on, start, args.batch)
                            for kind in ("unbiased", "biased")]
        records += probe(models, args.work / f"probe_{seed}", args.max_items)
    if args.default_job is not None:
        checkpoints = sorted((args.default_job / "checkpoints").glob("step_*"))
        models = [args.default_job / "sft_model", *checkpoints[-1:]]
        records += probe(models, args.work / "probe_default_job", args.max_items)
    print(format_bias_table(records))
    if args.out:
        plot_bias([r for r in records if r["label"].endswith("_0") or
                   r["label"].startswith(("unbiased_0", "biased_0", "start_0"))],
                  args.out.with_suffix(".png"))
    save({"benchmark": "bias probes: controls of known bias", "seeds": args.seeds,
          "steps": args.steps, "lr": args.lr, "batch": args.batch, "fit_on": args.fit_on,
          "hidden": args.hidden, "layers": args.layers, "records": records}, args.out)


if __name__ == "__main__":
    main()
