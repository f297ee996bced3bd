"""The ``plait`` command line.

    plait train CONFIG.yaml [key=value ...]    train (GRPO / PPO, with optional SFT warm start)
    plait sft CONFIG.yaml [key=value ...]      supervised fine-tuning on examples
    plait rm CONFIG.yaml [key=value ...]       train a reward model on preference pairs
    plait dpo CONFIG.yaml [key=value ...]      optimise a policy on preference pairs
    plait eval CONFIG.yaml [key=value ...]     eval sets (pass@k, maj@k) and bias probes of models
    plait config CONFIG.yaml [key=value ...]   print the resolved config
    plait options                              every config key, its type, default and meaning
    plait tiny-model OUT_DIR                   save the tiny character-level model and tokenizer
    plait report RUN_DIR [...] [--out FILE]    one self-contained HTML page of runs (compared)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading
from pathlib import Path

from plait.config import ConfigError, describe, dump_yaml, inert_settings_note, load_config

EXIT_USAGE, EXIT_FAILURE = 2, 1


def _is_known(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix. A ConfigError is checked first: the other
    types load torch, and a config mistake fails before anything heavy is imported."""
    from plait.errors import known_errors

    return isinstance(err, ConfigError) or isinstance(err, known_errors())


def _load(args):
    """The resolved config, with a note on stderr naming settings that have no effect."""
    config = load_config(args.config, args.overrides)
    note = inert_settings_note(config)
    if note:
        print(f"plait: note: {note}", file=sys.stderr)
    return config


def cmd_train(args) -> int:
    config = _load(args)
    args.run = config.run  # for the message on Ctrl-C
    runtime = config.runtime
    if runtime.num_ranks > 1 or runtime.launcher == "ray" or runtime.placement != "colocated":
        from plait.recipes.rl import run_job
        from plait.runtime.launchers import launch

        summary = launch(config, run_job)
    else:
        from plait.recipes.rl import train

        summary = train(config)
    print(json.dumps(summary, indent=2))
    print(f"plait: run directory {config.run.dir} (summary.json, metrics.jsonl, metrics.png, "
          "tensorboard/, checkpoints/)" + (f"; {summary['reward_failures']} reward failures got "
          "reward.fallback_reward" if summary.get("reward_failures") else ""))
    return 0


def _step_command(args, train, what: str, out_key: str, files: str) -> int:
    """Run a supervised training command (sft, rm, dpo) and say where its outputs are."""
    config = _load(args)
    args.run = config.run  # for the message on Ctrl-C
    summary = train(config)
    print(json.dumps(summary, indent=2))
    print(f"plait: {what} saved to {summary[out_key]}; run directory {config.run.dir} "
          f"(summary.json, metrics.jsonl, {files}checkpoints/)")
    return 0


def cmd_sft(args) -> int:
    from plait.recipes.sft import train_sft

    return _step_command(args, train_sft, "model", "sft_model_dir", "metrics.png, ")


def cmd_rm(args) -> int:
    from plait.recipes.reward_model import train_reward_model

    return _step_command(args, train_reward_model, "reward model", "reward_model_dir",
                         "metrics.png, reliability.png, scores.png, ")


def cmd_dpo(args) -> int:
    from plait.recipes.dpo import train_dpo

    return _step_command(args, train_dpo, "policy", "dpo_model_dir", "metrics.png, ")


def cmd_eval(args) -> int:
    config = _load(args)
    from plait.recipes.evaluate import evaluate_job

    result = evaluate_job(config, checkpoint=args.checkpoint or None)
    print(json.dumps(result, indent=2))
    records = result.get("results", [result])
    from plait.evals.bias import format_bias_table
    from plait.evals.suites import format_table

    for record in records:
        if record.get("suites"):
            print(f"\n{record['model']}:\n{format_table(record['suites'])}")
    probes = [r["bias"] for r in records if "bias" in r]
    if probes:
        print("\n" + format_bias_table(probes))
    written = [name for name, used in (("eval_results.json", any("suites" in r for r in records)),
                                       ("bias_results.json, bias.png", bool(probes))) if used]
    if written:
        print(f"plait: results added to {', '.join(written)} in {config.run.dir}")
    return 0


def cmd_config(args) -> int:
    print(dump_yaml(_load(args)), end="")
    return 0


def cmd_options(args) -> int:
    for key, type_name, default, doc in describe():
        print(f"{key}  ({type_name}, default {default!r})")
        print(textwrap.indent(textwrap.fill(doc, 88), "    "))
    return 0


def cmd_tiny_model(args) -> int:
    from plait.models.loading import quiet_transformers
    from plait.models.tiny import save_tiny_model

    quiet_transformers()
    out = save_tiny_model(Path(args.out_dir))
    print(f"plait: tiny model and tokenizer saved to {out}")
    return 0


def cmd_report(args) -> int:
    from plait.telemetry.report import write_report

    out = write_report(args.run_dirs, args.out)
    print(f"plait: report written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (
        ("train", cmd_train, "train a model"),
        ("sft", cmd_sft, "supervised fine-tuning (prompt/answer, text or chat examples)"),
        ("rm", cmd_rm, "train a reward model on preference pairs"),
        ("dpo", cmd_dpo, "optimise a policy on preference pairs (DPO, IPO, SimPO)"),
        ("eval", cmd_eval, "evaluate a model or checkpoint on held-out prompts"),
        ("config", cmd_config, "print the resolved config"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?", help="YAML config (optional: defaults otherwise)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
        if name == "eval":
            p.add_argument("--checkpoint", action="append", help="checkpoint or model "
                           "directory; repeat to compare several (default: the run "
                           "directory's latest checkpoint, else the configured model)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("options", help="list every config key with its documentation")
    p.set_defaults(fn=cmd_options)
    p = sub.add_parser("tiny-model", help="save the tiny model + tokenizer in HF format")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_tiny_model)
    p = sub.add_parser("report", help="one self-contained HTML page of one run or several "
                       "(summary, config, curves, timeline, eval sets, bias probes, plots)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html for one run, "
                   "./plait_report.html for several)")
    p.set_defaults(fn=cmd_report)
    return parser


def _split_config_arg(args) -> None:
    """Allow ``plait train key=value`` with no config file."""
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "config"):
        _split_config_arg(args)
    previous = _stop_on_sigterm()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"plait: interrupted{_checkpoint_note(args)}", file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_known(err):
            raise
        print(f"plait: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """SIGTERM (a scheduler's preemption, ``kill``) stops a job as Ctrl-C does: rewards and
    ranks stopped, the checkpoint to resume from named. Returns the handler it replaced
    (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _checkpoint_note(args) -> str:
    """What an interrupted training job (train, sft, rm, dpo) leaves to resume from (nothing to say
    for the other commands)."""
    run = getattr(args, "run", None)
    if args.command not in ("train", "sft", "rm", "dpo") or run is None:
        return ""
    from plait.train.checkpoint import resume_note

    note = resume_note(Path(run.dir) / "checkpoints", resume=run.resume,
                       overwrite=run.overwrite)
    return f"; {note}"


if __name__ == "__main__":
    sys.exit(main())
