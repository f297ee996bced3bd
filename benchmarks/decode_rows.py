"""What one decode step of plait's engine costs as more rows decode together.

Continuous batching and partial rollout pay off when adding rows to a decode step costs
little (a memory-bound GPU step); on a CPU thread the step becomes compute-bound. This
measures it: the tiny default architecture (random weights), one prompt sampled ``rows``
times (seeded, as plait's jobs sample) with ``ignore_eos`` so every row runs exactly
``--tokens`` tokens, eager and (with ``--compile``) through the compiled decode step;
best of ``--repeats`` runs, the variants taking turns within each repeat.

``--plain`` adds ``compiled_plain``: the engine's compiled step (decode, then draw the
next tokens) as ``torch.compile`` gives it with no engine-specific tuning (HF's sdpa
attention, kernels called from Python, inductor's default choice of what to store and
what to recompute, every guard checked, float constants as graph inputs), to show what
the tuning of the compiled CPU step buys (its figures are in RESULTS.md).

    python benchmarks/decode_rows.py --threads 1 --compile --out benchmarks/results/decode_rows_cpu.json
    python benchmarks/decode_rows.py --threads 1 --compile --plain --rows 1 8 16 32 64 --out benchmarks/results/decode_rows_plain_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import save


def generate(engine, prompt: list[int], params, rows: int) -> None:
    """``rows`` seeded samples of ``prompt`` (plait's jobs sample with per-prompt seeds)."""
    engine.submit([prompt], params, n=rows, seeds=[rows])
    for _ in engine.stream():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the compiled decode step")
    parser.add_argument("--plain", action="store_true",
                        help="also the compiled step without the engine's tuning")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if min(args.rows) < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--rows, --tokens and --repeats must be >= 1")
    if args.plain and not args.compile:
        parser.error("--plain compares with the compiled step: add --compile")
    if args.plain and args.device != "cpu":
        parser.error("--plain compares the CPU's tuned compiled step: use --device cpu")
    from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model
    from plait.rollout.base import SamplingParams
    from plait.rollout.engine import PlaitEngine

    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    spec = TinyModelSpec(max_position_embeddings=args.tokens + 64)
    model = build_tiny_model(spec, tokenizer, seed=0).eval().to(args.device)
    prompt = tokenizer("repeat x 57 times:")["input_ids"]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    engines = {"eager": PlaitEngine(model, tokenizer, max_batch=max(args.rows))}
    if args.compile:
        engines["compiled"] = PlaitEngine(model, tokenizer, max_batch=max(args.rows),
                                          compile=True)
    if args.plain:
        plain = PlaitEngine(model, tokenizer, max_batch=max(args.rows))
        plain.slots.compiled = torch.compile(plain.slots.decode_draw, dynamic=True,
                                             fullgraph=True)
        plain.slots.decode_attention, plain.slots.traced = False, True
        engines["compiled_plain"] = plain
    for engine in engines.values():
        generate(engine, prompt, params, min(args.rows))  # warm-up (and compilation)
    results = {name: {} for name in engines}
    for rows in args.rows:
        best = dict.fromkeys(engines, float("inf"))
        for _ in range(args.repeats):
            for name, engine in engines.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                generate(engine, prompt, params, rows)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - start)
        for name in engines:
            results[name][rows] = {"ms_per_step": best[name] * 1000 / args.tokens,
                                   "tokens_per_s": rows * args.tokens / best[name]}
            print(f"{name:14s} rows={rows:4d}: {best[name] * 1000 / args.tokens:6.2f} ms per "
                  f"decode step, {rows * args.tokens / best[name]:8.0f} tokens/s", flush=True)
        if "compiled_plain" in results:
            results.setdefault("compiled_vs_plain", {})[rows] = (
                results["compiled"][rows]["ms_per_step"]
                / results["compiled_plain"][rows]["ms_per_step"])
    save({"benchmark": "decode_rows", "tokens": args.tokens, "threads": args.threads,
          "device": args.device, "results": results}, args.out)


if __name__ == "__main__":
    main()
