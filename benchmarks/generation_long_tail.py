"""Long-tailed generation: plait's engine vs Hugging Face ``generate``, same model,
same prompts, same sampling, one run, reported as a ratio of generated tokens/s.

The model is the tiny default architecture warm-started (SFT) on the ``repeat`` task,
whose answers range from a few characters to a few hundred, so the model's own
completions are long-tailed. Both engines sample at temperature 1.0 with the same
``max_new_tokens``; HF generates the whole batch at once (it must run until the longest
row ends), plait's engine runs ``--slots`` rows at a time with continuous batching.

    python benchmarks/generation_long_tail.py --samples 64 --out benchmarks/results/gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def warm_model(work: Path, steps: int, max_count: int, seed: int):
    """The tiny model after an SFT warm start on the repeat task (cached in ``work``)."""
    from plait.config import SFTConfig
    from plait.data.tasks import make_task
    from plait.models.loading import load_causal_lm, load_tokenizer, quiet_transformers
    from plait.models.tiny import TinyModelSpec, save_tiny_model
    from plait.recipes.sft import supervised_warm_start

    quiet_transformers()
    task = make_task("repeat", min_count=1, max_count=max_count)
    model_dir = work / f"repeat_sft_{steps}_{max_count}_{seed}"
    if not (model_dir / "model.safetensors").is_file():
        save_tiny_model(model_dir, TinyModelSpec(max_position_embeddings=max_count + 64), seed=seed)
        tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
        rows = task.make_rows(20000, seed=seed, split="train")
        supervised_warm_start(model, tokenizer, rows, SFTConfig(steps=steps, batch_size=32,
                                                                lr=2e-3, warmup_steps=20),
                              encode_prompt=lambda s: tokenizer(s)["input_ids"], seed=seed,
                              device=torch.device("cpu"))
        model.save_pretrained(model_dir)
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    prompts = [tokenizer(r["prompt"])["input_ids"]
               for r in task.make_rows(4096, seed=seed + 1, split="test")]
    return tokenizer, model, prompts


def run_engine(engine, prompts, params) -> dict:
    torch.manual_seed(1234)
    start = time.perf_counter()
    if hasattr(engine, "submit"):  # plait: per-request seeds, so every sync_every variant
        # generates the very same completions (HF draws from the global generator)
        engine.submit(prompts, params, n=1, seeds=list(range(len(prompts))))
        done = dict(engine.stream())
        groups = [done[i] for i in range(len(prompts))]
    else:
        groups = engine.generate(prompts, params, n=1)
    seconds = time.perf_counter() - start
    lengths = [len(c.token_ids) for g in groups for c in g]
    return {"seconds": seconds, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
            "length_min": min(lengths), "length_median": statistics.median(lengths),
            "length_max": max(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64, help="plait engine batch slots")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--max-count", type=int, default=256, help="longest repeat answer")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/plait-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sync-every", type=int, nargs="+", default=None,
                        help="also run plait's engine with these rollout.sync_every values "
                             "(decode steps between host transfers)")
    parser.add_argument("--compile", action="store_true",
                        help="also run plait's engine with rollout.compile (its one-time "
                             "compilation is timed apart, before the timed runs)")
    args = parser.parse_args()

    from plait.rollout.base import SamplingParams
    from plait.rollout.engine import PlaitEngine
    from plait.rollout.hf_engine import HFGenerateEngine

    torch.set_num_threads(args.threads)
    tokenizer, model, pool = warm_model(Path(args.work), args.sft_steps, args.max_count, 0)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    engines = {"hf_generate": HFGenerateEngine(model, tokenizer, batch_size=args.samples),
               "plait": PlaitEngine(model, tokenizer, max_batch=args.slots)}
    for k in args.sync_every or []:
        engines[f"plait_sync_every_{k}"] = PlaitEngine(model, tokenizer, max_batch=args.slots,
                                                      sync_every=k)
    compile_s = {}
    # compiled: the default sync_every (4 on the CPU: a run of 4 steps per compiled call),
    # and each --sync-every value
    for k in [None, *(args.sync_every or [])] if args.compile else []:
        name = "plait_compiled" if k is None else f"plait_compiled_sync_every_{k}"
        engine = PlaitEngine(model, tokenizer, max_batch=args.slots, compile=True,
                             sync_every=k)
        start = time.perf_counter()  # the first decode compiles; later calls reuse it
        engine.submit(pool[-2:], SamplingParams(max_new_tokens=2 * engine.sync_every + 2,
                                                temperature=1.0), seeds=[0, 1])
        list(engine.stream())
        compile_s[name] = time.perf_counter() - start
        engines[name] = engine
    runs = {name: [] for name in engines}
    for repeat in range(args.repeats):
        prompts = pool[repeat * args.samples:(repeat + 1) * args.samples]
        for name, engine in engines.items():  # same prompts for both, alternating order
            runs[name].append(run_engine(engine, prompts, params))
    summary = {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "runs": rs} for name, rs in runs.items()}
    hf_rate = summary["hf_generate"]["tokens_per_s"]
    ratio = summary["plait"]["tokens_per_s"] / hf_rate
    result = {"benchmark": "long-tailed generation", "samples": args.samples,
              "slots": args.slots, "max_new_tokens": args.max_new_tokens,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads "
                         f"{torch.get_num_threads()}, cuda={torch.cuda.is_available()}",
              "engines": summary, "ratio_plait_over_hf": ratio,
              "compile_seconds": compile_s or None,
              "ratios_over_hf": {name: r["tokens_per_s"] / hf_rate
                                 for name, r in summary.items() if name != "hf_generate"}}
    for name, r in summary.items():
        lengths = r["runs"][0]
        print(f"{name:12s} {r['tokens_per_s']:9.1f} tok/s  (lengths min/median/max "
              f"{lengths['length_min']}/{lengths['length_median']}/{lengths['length_max']})")
    for name, value in result["ratios_over_hf"].items():
        print(f"ratio {name} / hf_generate: {value:.2f}x")
    for name, seconds in compile_s.items():
        print(f"{name}: first call (compilation) {seconds:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
