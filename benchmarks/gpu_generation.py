"""Long-tailed generation at a real model's shape: plait's engine vs Hugging Face
``generate``, and the engine's decode rate against the device's memory bandwidth.

The model is randomly initialised with Qwen2.5-0.5B's shape (24 layers, width 896,
14 query / 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings) in
bfloat16; nothing is downloaded. ``--samples`` prompts of ``--prompt-len`` random tokens
each get a target length drawn from a clipped log-normal (``--median-new-tokens``,
``--tail-sigma``, at most ``--max-new-tokens``): a few rows run ~10x longer than most,
as RL completions do. Both engines ignore EOS, so every row generates exactly its target
(a random model's EOS would otherwise end rows at random):

- ``hf_generate``: the whole batch in one ``generate`` call with ``max_new_tokens`` = the
  longest target; every row computes until the longest ends (that is how ``generate``
  handles a batch), only each row's target tokens are counted.
- ``plait``: every request submitted with its own ``max_new_tokens``; a row leaves its
  slot when it reaches its target.

Throughput = counted tokens / wall seconds, same prompts, same targets, temperature 1.0.

The decode measurement prefills ``--samples`` rows to ``--prompt-len + median`` positions,
then times engine decode steps at that batch: each step must read every weight once
(the tied embedding as the output head) and every row's keys and values, so
``bytes per step / step time`` is compared with a measured device-to-device copy rate
and the nominal peak of known GPUs.

    python benchmarks/gpu_generation.py --out benchmarks/results/gpu_generation.json
    python benchmarks/gpu_generation.py --shape tiny --device cpu --samples 16 \\
        --prompt-len 16 --max-new-tokens 64 --median-new-tokens 8   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# nominal HBM bandwidth, bytes/s (SXM parts)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "B200": 8.0e12}

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=2048, tie_word_embeddings=True),
}


class IdTokenizer:
    """Just what both engines need from a tokenizer when prompts are token ids."""

    def __init__(self, vocab_size: int):
        self.pad_token_id = 0
        self.eos_token_id = vocab_size - 1
        self.bos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return ["" for _ in sequences]


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], pad_token_id=0, eos_token_id=None, bos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def workload(args, vocab: int):
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, vocab - 1, (args.samples, args.prompt_len),
                            generator=generator).tolist()
    normal = torch.randn(args.samples, generator=generator, dtype=torch.float64)
    targets = (math.log(args.median_new_tokens) + args.tail_sigma * normal).exp()
    targets = targets.round().clamp(args.min_new_tokens, args.max_new_tokens).long().tolist()
    return prompts, targets


def run_hf(model, tokenizer, prompts, targets) -> float:
    from plait.rollout.base import SamplingParams
    from plait.rollout.hf_engine import HFGenerateEngine

    engine = HFGenerateEngine(model, tokenizer, batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=max(targets), temperature=1.0, ignore_eos=True)
    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    engine.generate(prompts, params)
    synchronize(device)
    return time.perf_counter() - start


def run_plait(engine, prompts, targets) -> float:
    from plait.rollout.base import SamplingParams

    device = next(engine.model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    for index, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        engine.submit([prompt], SamplingParams(max_new_tokens=target, temperature=1.0,
                                               ignore_eos=True), seeds=[index])
    lengths = [len(c.token_ids) for _, group in engine.stream() for c in group]
    synchronize(device)
    seconds = time.perf_counter() - start
    assert sorted(lengths) == sorted(targets), "a row stopped before its target"
    return seconds


def model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied weights once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_rate(model, tokenizer, args, steps: int, compile: bool = False) -> dict:
    """Steady decode steps at the full batch; bytes each step must read vs its time."""
    from plait.rollout.base import SamplingParams
    from plait.rollout.engine import PlaitEngine

    device = next(model.parameters()).device
    context = args.prompt_len + args.median_new_tokens
    prompts, _ = workload(args, model.config.vocab_size)
    engine = PlaitEngine(model, tokenizer, max_batch=len(prompts), compile=compile)
    params = SamplingParams(max_new_tokens=context - args.prompt_len + steps + 2,
                            temperature=0.0, ignore_eos=True)
    contexts = [p + [1] * (context - args.prompt_len) for p in prompts]
    engine.submit(contexts, params)
    with torch.no_grad():
        engine._admit()  # prefill every row into its slot
        tokens = engine._pending_logits.argmax(-1)
        plan = engine._sampling_plan()  # greedy rows (the compiled step draws them)
        positions = torch.full((len(prompts),), context, device=device)
        for k in range(3):  # warm-up
            engine.slots.decode_step(tokens, positions + k, kv_len=context + k + 1,
                                     plan=plan)
        synchronize(device)
        start = time.perf_counter()
        for k in range(steps):
            logits, _ = engine.slots.decode_step(tokens, positions + 3 + k,
                                                 kv_len=context + 4 + k, plan=plan)
            tokens = logits.argmax(-1)
        synchronize(device)
    step = (time.perf_counter() - start) / steps
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = (len(prompts) * (context + 3 + steps / 2) * config.num_hidden_layers * 2
                * config.num_key_value_heads * head_dim * next(model.parameters()).element_size())
    weights = model_bytes(model)
    return {"batch": len(prompts), "kv_len": context, "step_ms": step * 1e3,
            "tokens_per_s": len(prompts) / step, "weight_bytes": weights,
            "kv_bytes_per_step": kv_bytes, "bytes_per_s": (weights + kv_bytes) / step}


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy rate (read + write bytes per second) of a 1 GiB tensor."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 2 * x.numel() * 20 / (time.perf_counter() - start)


def profile(name: str, engine, prompts, device: torch.device, new_tokens: int = 32) -> None:
    """Where an engine's time goes: the top operators by host time and by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        seconds = run_plait(engine, prompts, [new_tokens] * len(prompts))
    engine.release()
    print(f"[profile] {name}: {len(prompts)} rows x {new_tokens} tokens in {seconds:.2f} s "
          f"(under the profiler)")
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if device.type == "cuda":
        print(table.table(sort_by="self_device_time_total", row_limit=15,
                          max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--min-new-tokens", type=int, default=16)
    parser.add_argument("--median-new-tokens", type=int, default=128)
    parser.add_argument("--tail-sigma", type=float, default=0.9,
                        help="log-normal sigma of the target lengths")
    parser.add_argument("--sync-every", type=int, nargs="+", default=[None],
                        help="plait engine variants (null = its default for the device)")
    parser.add_argument("--compile", action="store_true",
                        help="also run the engine with rollout.compile (its compilation "
                             "is timed apart, in the warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operators over a short engine run "
                             "(every row 32 new tokens) after the timed runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    tokenizer = IdTokenizer(model.config.vocab_size)
    prompts, targets = workload(args, model.config.vocab_size)
    counted = sum(targets)
    print(f"[bench] {args.shape} on {device}: {args.samples} prompts x {args.prompt_len} "
          f"tokens; targets min/median/max {min(targets)}/{statistics.median(targets)}/"
          f"{max(targets)}, {counted} tokens in all")
    from plait.rollout.engine import PlaitEngine

    runs: dict[str, list[float]] = {"hf_generate": []}
    engines = {("plait" if k is None else f"plait_sync_every_{k}"):
               PlaitEngine(model, tokenizer, max_batch=len(prompts), sync_every=k)
               for k in args.sync_every}
    if args.compile:
        engines["plait_compiled"] = PlaitEngine(model, tokenizer, max_batch=len(prompts),
                                                compile=True)
    runs.update({name: [] for name in engines})
    warmup = {}
    for name, engine in engines.items():  # allocator, kernels, and the compilation
        start = time.perf_counter()
        run_plait(engine, prompts[:8], [4] * 8)
        warmup[name] = time.perf_counter() - start
        engine.release()
    for repeat in range(args.repeats):
        runs["hf_generate"].append(run_hf(model, tokenizer, prompts, targets))
        for name, engine in engines.items():
            runs[name].append(run_plait(engine, prompts, targets))
            engine.release()  # one KV cache resident at a time; each run allocates its own
        print(f"[bench] repeat {repeat + 1}: " + ", ".join(
            f"{name} {times[-1]:.2f} s" for name, times in runs.items()))
    rates = {name: counted / statistics.median(times) for name, times in runs.items()}
    if args.profile:
        for name, engine in engines.items():
            profile(name, engine, prompts, device)
    decode = decode_rate(model, tokenizer, args, args.decode_steps)
    if args.compile:
        decode["compiled"] = decode_rate(model, tokenizer, args, args.decode_steps,
                                         compile=True)
    copy = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in (name or "")), None)
    decode["fraction_of_copy_bandwidth"] = decode["bytes_per_s"] / copy if copy else None
    decode["fraction_of_nominal_peak"] = decode["bytes_per_s"] / peak if peak else None
    result = {
        "benchmark": "long-tailed generation at Qwen2.5-0.5B shape" if args.shape != "tiny"
        else "long-tailed generation (tiny smoke shape)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": f"{name} ({device}), {os.cpu_count()} cpus, torch {torch.__version__}",
        "targets": {"min": min(targets), "median": statistics.median(targets),
                    "max": max(targets), "tokens": counted},
        "seconds": runs, "warmup_seconds": warmup, "tokens_per_s": rates,
        "ratios_over_hf": {k: v / rates["hf_generate"] for k, v in rates.items()
                           if k != "hf_generate"},
        "decode": decode, "copy_bandwidth_bytes_per_s": copy, "nominal_peak_bytes_per_s": peak,
    }
    for key, rate in rates.items():
        print(f"{key:24s} {rate:10.0f} tok/s")
    for key, ratio in result["ratios_over_hf"].items():
        print(f"ratio {key} / hf_generate: {ratio:.2f}x")
    print(f"decode at batch {decode['batch']}, {decode['kv_len']} positions: "
          f"{decode['step_ms']:.2f} ms/step, {decode['bytes_per_s'] / 1e9:.0f} GB/s read"
          + (f" = {decode['fraction_of_copy_bandwidth']:.0%} of the measured copy rate"
             if copy else "")
          + (f", {decode['fraction_of_nominal_peak']:.0%} of the nominal peak" if peak else ""))
    if "compiled" in decode:
        print(f"compiled decode: {decode['compiled']['step_ms']:.2f} ms/step; warm-up "
              f"(compilation) {warmup['plait_compiled']:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
