"""Teacher-forced forward + backward of a GRPO batch: every [prompt | response] row in
full, each group's prompt once with its responses as padded rows against the cached prompt
(``algo.pack_group_tokens=0``), and each group packed into unpadded sequences
(``algo.pack_group_tokens``, the default; at each cap given) two ways: split by plait's cost
model (``packed_<cap>``, what training runs) and filled up to the cap (``fill_<cap>``, fewest
sequences). All give the same logits and gradients (tests/test_forward.py); this measures
their time on the tiny default architecture, for short and long, long-tailed responses.

    python benchmarks/packed_forward.py --out benchmarks/results/packed_forward_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import save

# groups x samples per group, prompt tokens, longest response
SHAPES = [(8, 8, 8, 5), (8, 8, 8, 16), (4, 8, 32, 64), (4, 8, 64, 128), (2, 8, 128, 256),
          (2, 16, 64, 128), (1, 8, 256, 512)]


def make_batch(vocab: int, groups: int, samples: int, prompt: int, longest: int, seed: int = 0):
    """Distinct prompts answered ``samples`` times; response lengths long-tailed
    (``longest * u^2``), one row of every batch at the longest."""
    from plait.train.experience import Experience

    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (groups, prompt), generator=g)
    group_ids = torch.arange(groups).repeat_interleave(samples)
    rows = groups * samples
    lengths = (torch.rand(rows, generator=g) ** 2 * longest).long().clamp(min=1)
    lengths[0] = longest
    response_mask = (torch.arange(longest) < lengths.unsqueeze(1)).float()
    response_ids = torch.randint(4, vocab, (rows, longest), generator=g)
    return Experience(prompt_ids=prompt_ids[group_ids],
                      prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
                      response_ids=response_ids.masked_fill(response_mask == 0, 0),
                      response_mask=response_mask, group_ids=group_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12, help="timed passes per path and shape "
                        "(interleaved; median reported, the first 2 of each left out)")
    parser.add_argument("--pack-tokens", type=int, nargs="+", default=[512, 1024],
                        help="caps of a packed sequence to time (algo.pack_group_tokens)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import plait.train.forward as forward
    from plait.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_model
    from plait.train.forward import response_logits

    cost_model = forward.attention_crossover

    def run(batch, fill=False, **kwargs):
        # fill: no crossover, so the plan fills each sequence up to the cap
        forward.attention_crossover = (lambda config, base: None) if fill else cost_model
        try:
            return response_logits(model, batch, **kwargs)
        finally:
            forward.attention_crossover = cost_model

    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(max_position_embeddings=4096), tokenizer,
                             seed=1).train()
    paths = {"full": dict(share_prompts=False), "cached": dict(share_prompts=True),
             **{f"packed_{cap}": dict(share_prompts=True, pack_tokens=cap)
                for cap in args.pack_tokens},
             **{f"fill_{cap}": dict(share_prompts=True, pack_tokens=cap, fill=True)
                for cap in args.pack_tokens}}
    rows = []
    for groups, samples, prompt, longest in SHAPES:
        batch = make_batch(len(tokenizer), groups, samples, prompt, longest)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats + 2):
            for name, kwargs in paths.items():
                start = time.perf_counter()
                logits = run(batch, **kwargs)
                picked = torch.log_softmax(logits, -1).gather(
                    -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
                (picked * batch.response_mask).sum().backward()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t[2:]) * 1000 for name, t in times.items()}
        rows.append({"groups": groups, "samples": samples, "prompt": prompt, "longest": longest,
                     "response_tokens": int(batch.response_mask.sum()), "ms": ms,
                     "over_cached": {name: ms[name] / ms["cached"] for name in paths}})
        print(f"{groups:2d} x {samples:2d} rows, prompt {prompt:3d}, responses <= {longest:4d}: "
              + "  ".join(f"{name} {value:7.1f} ms" for name, value in ms.items())
              + "  (vs cached: " + ", ".join(f"{name} {ms[name] / ms['cached']:.2f}x"
                                             for name in paths if name not in ("full", "cached"))
              + ")", flush=True)
    save({"benchmark": "packed_forward", "threads": args.threads,
          "pack_tokens": args.pack_tokens, "repeats": args.repeats, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
