"""What one decode step of plait's engine costs as more rows decode together.

Continuous batching and partial rollout pay off when adding rows to a decode step costs
little (a memory-bound GPU step); on a CPU thread the step becomes compute-bound. This
measures it: the tiny default architecture (random weights), one prompt sampled ``rows``
times with ``ignore_eos`` so every row runs exactly ``--tokens`` tokens, eager and (with
``--compile``) through the compiled decode step; best of ``--repeats`` runs.

    python benchmarks/decode_rows.py --threads 1 --compile --out benchmarks/results/decode_rows_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the compiled decode step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if min(args.rows) < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--rows, --tokens and --repeats must be >= 1")
    from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model
    from plait.rollout.base import SamplingParams
    from plait.rollout.engine import PlaitEngine

    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    spec = TinyModelSpec(max_position_embeddings=args.tokens + 64)
    model = build_tiny_model(spec, tokenizer, seed=0).eval().to(args.device)
    prompt = tokenizer("repeat x 57 times:")["input_ids"]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    results = {}
    for compiled in (False, True) if args.compile else (False,):
        engine = PlaitEngine(model, tokenizer, max_batch=max(args.rows), compile=compiled)
        engine.generate([prompt], params, n=min(args.rows))  # warm-up (and compilation)
        name = "compiled" if compiled else "eager"
        results[name] = {}
        for rows in args.rows:
            best = float("inf")
            for _ in range(args.repeats):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                engine.generate([prompt], params, n=rows)
                best = min(best, time.perf_counter() - start)
            results[name][rows] = {"ms_per_step": best * 1000 / args.tokens,
                                   "tokens_per_s": rows * args.tokens / best}
            print(f"{name:8s} rows={rows:4d}: {best * 1000 / args.tokens:6.2f} ms per decode "
                  f"step, {rows * args.tokens / best:8.0f} tokens/s", flush=True)
    save({"benchmark": "decode_rows", "tokens": args.tokens, "threads": args.threads,
          "device": args.device, "results": results}, args.out)


if __name__ == "__main__":
    main()
