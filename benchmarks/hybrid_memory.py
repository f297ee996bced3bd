"""The colocated hybrid engine on one GPU: memory high-water mark with and without
releasing the rollout state (the KV cache) while training runs.

One process generates and trains in turn. Two runs of the same job differ only in
``rollout.release_kv_cache``; every step logs each stage's peak allocated CUDA memory
(``memory/<stage>_peak_mb`` in ``metrics.jsonl``), and this script reports, per run,
the high-water mark of the whole step and of each stage (median over steps), and the
difference. The model is the tiny factory's Qwen2 at Qwen2.5-0.5B's layer shape (24
layers, width 896, 14/2 heads, MLP 4864; the factory's character vocabulary), trained
in float32 with AdamW, on the ``repeat`` task whose answers run long, so the KV cache
(``rollout.batch_size`` slots x prompt + ``max_new_tokens`` positions) is sizeable.

    python benchmarks/hybrid_memory.py --out benchmarks/results/hybrid_memory_gpu.json
    python benchmarks/hybrid_memory.py --device cpu --small --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE_0_5B = ["model.tiny.hidden_size=896", "model.tiny.intermediate_size=4864",
              "model.tiny.num_layers=24", "model.tiny.num_heads=14",
              "model.tiny.num_kv_heads=2", "model.tiny.max_position_embeddings=1024"]
SMALL = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
         "model.tiny.num_layers=2", "model.tiny.num_heads=4", "model.tiny.num_kv_heads=2",
         "model.tiny.max_position_embeddings=1024"]


def run(run_dir: Path, args, release: bool) -> list[dict]:
    overrides = [
        *(SMALL if args.small else SHAPE_0_5B), "sft.steps=0", "data.task=repeat",
        f"data.task_args={{max_count: {args.max_new_tokens - 8}}}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.batch_size={args.slots}",
        f"algo.prompts_per_step={args.prompts}", "algo.group_size=8",
        f"algo.micro_batch_size={args.micro_batch}", f"train.steps={args.steps}",
        f"train.device={args.device}", "train.eval_every=0", "data.num_eval=8",
        f"rollout.release_kv_cache={str(release).lower()}", f"run.dir={run_dir}",
        "run.tensorboard=false", "run.progress=false", "run.overwrite=true",
        "train.save_every=0",
    ]
    proc = subprocess.run([sys.executable, "-m", "plait.cli", "train", *overrides],
                          capture_output=True, text=True,
                          env={**os.environ, "PLAIT_PROGRESS": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"job failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def peaks(metrics: list[dict]) -> dict[str, float]:
    """Median over steps of each stage's peak, and of the step's high-water mark."""
    steps = [m for m in metrics if "time/step" in m]
    keys = sorted({k for m in steps for k in m if k.startswith("memory/")})
    out = {k.removeprefix("memory/").removesuffix("_peak_mb"):
           statistics.median(m[k] for m in steps if k in m) for k in keys}
    if keys:
        out["step_high_water"] = statistics.median(
            max(m[k] for k in keys if k in m) for m in steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--slots", type=int, default=128, help="engine KV-cache slots")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    result = {"benchmark": "hybrid engine memory, release vs keep the KV cache",
              "settings": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory() as work:
        for release in (True, False):
            name = "release" if release else "keep"
            metrics = run(Path(work) / name, args, release)
            result["runs"][name] = peaks(metrics)
            print(f"{name:8s} " + ", ".join(f"{k} {v:.0f} MB"
                                             for k, v in result["runs"][name].items()))
    release, keep = result["runs"]["release"], result["runs"]["keep"]
    if "step_high_water" in release and "step_high_water" in keep:
        result["saved_mb"] = keep["step_high_water"] - release["step_high_water"]
        print(f"high-water mark: release {release['step_high_water']:.0f} MB, keep "
              f"{keep['step_high_water']:.0f} MB ({result['saved_mb']:.0f} MB saved)")
    else:
        result["saved_mb"] = None
        print("no CUDA memory counters on this device: not measured")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
