"""Controller scalability: parallel controllers vs a single controller, side by side.

For each controller mode, rank count (1, 2, 4) and global batch (64 to 1,024
samples per step), runs a few GRPO steps of the default task with
``plait train`` and reads, per step, from rank 0's metrics (each a maximum over
ranks, so the busiest controller counts):

- ``controller/traffic_bytes``: collective payload through the process in the
  step, gradients excluded (prompts, rollouts, batches, metrics, control);
- ``controller/gradient_bytes``: the gradient all-reduce payload (model-sized,
  the same in both modes);
- ``controller/batch_bytes``: experience held by the process at once;
- ``controller/peak_rss_mb``: the process's peak resident memory;
- ``time/step``.

    python benchmarks/controller_scaling.py --out benchmarks/results/controller_scaling_cpu.json

Every run is a separate job; run the script alone (ranks share the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import save

KEYS = ("controller/traffic_bytes", "controller/gradient_bytes", "controller/batch_bytes",
        "controller/peak_rss_mb", "time/step")


def run_job(run_dir: Path, ranks: int, samples: int, controller: str, steps: int,
            group: int) -> dict:
    args = [sys.executable, "-m", "plait.cli", "train", "examples/grpo_addition.yaml",
            f"run.dir={run_dir}", "run.overwrite=true", "run.tensorboard=false",
            "run.progress=false", "sft={steps: 0}", "data.num_eval=64", f"train.steps={steps}",
            "train.eval_every=0", "train.save_every=0", "train.threads=null",
            f"algo.prompts_per_step={samples // group}", f"algo.group_size={group}",
            f"runtime.num_ranks={ranks}", f"runtime.controller={controller}"]
    start = time.time()
    proc = subprocess.run(args, capture_output=True, text=True,
                          env={**os.environ, "PLAIT_PROGRESS": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({' '.join(args[3:])}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "time/step" in r][1:]  # the first step warms up
    out = {k: statistics.median(r.get(k, 0.0) for r in steps_) for k in KEYS}
    out["controller/peak_rss_mb"] = max(r.get("controller/peak_rss_mb", 0.0) for r in steps_)
    out["wall_s"] = round(time.time() - start, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-") as tmp:
        for samples in args.samples:
            for ranks in args.ranks:
                modes = ["parallel"] if ranks == 1 else ["parallel", "single"]
                for controller in modes:
                    result = run_job(Path(tmp) / "run", ranks, samples, controller, args.steps,
                                     args.group_size)
                    row = {"controller": controller, "ranks": ranks, "samples": samples,
                           **result}
                    rows.append(row)
                    print(f"{controller:8s} ranks={ranks} samples={samples:5d}  "
                          f"traffic={row['controller/traffic_bytes'] / 1024:9.1f} KiB/step  "
                          f"grads={row['controller/gradient_bytes'] / 1024:7.1f} KiB  "
                          f"held={row['controller/batch_bytes'] / 1024:8.1f} KiB  "
                          f"rss={row['controller/peak_rss_mb']:6.1f} MB  "
                          f"step={row['time/step']:.3f} s", flush=True)
    save({"benchmark": "controller_scaling", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
