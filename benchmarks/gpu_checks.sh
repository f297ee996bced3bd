#!/usr/bin/env bash
# The GPU checks in one go, each under its own time limit, each logged on its own:
# generation at Qwen2.5-0.5B's shape (plait's engine vs HF generate), the hybrid
# engine's memory with and without releasing the KV cache, a short GRPO job on the
# GPU (one rank; two ranks over gloo and over NCCL), and the compiled decode step.
# A failing check is reported and the next one runs.
#
#     bash benchmarks/gpu_checks.sh OUT_DIR        # from the repository root
#
# Sizes and limits are set so the whole script ends within about 11 minutes;
# PYTHON picks the interpreter (default python3), SCALE=full runs the benchmarks at
# their documented sizes, ONLY="NAME ..." runs only the checks named.
set -u
out=${1:-gpu_checks}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PLAIT_PROGRESS=0
status=0

check() {  # check NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start))s"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"

if [ "${SCALE:-}" = full ]; then
  gen=(); mem=()
else
  gen=(--max-new-tokens 512 --median-new-tokens 64); mem=(--steps 2 --max-new-tokens 256)
fi
job=(examples/grpo_addition.yaml sft.steps=100 train.steps=20 train.eval_every=10
     train.save_every=10 data.num_eval=200 run.progress=false run.overwrite=true)

check generation 130 $py benchmarks/gpu_generation.py --sync-every 1 8 "${gen[@]}" \
  --out "$out/gpu_generation.json"
check hybrid_memory 130 $py benchmarks/hybrid_memory.py "${mem[@]}" \
  --out "$out/hybrid_memory_gpu.json"
check grpo_1rank 80 $py -m plait.cli train "${job[@]}" run.dir=/tmp/plait_gpu/r1
check grpo_2rank_gloo 80 $py -m plait.cli train "${job[@]}" run.dir=/tmp/plait_gpu/r2g \
  runtime.num_ranks=2 runtime.backend=gloo
check grpo_2rank_nccl 40 $py -m plait.cli train "${job[@]}" run.dir=/tmp/plait_gpu/r2n \
  runtime.num_ranks=2 runtime.backend=nccl
for run in r1 r2g r2n; do
  [ -f /tmp/plait_gpu/$run/summary.json ] && cp /tmp/plait_gpu/$run/summary.json \
    "$out/grpo_$run.summary.json"
done
check generation_compiled 200 $py benchmarks/gpu_generation.py --sync-every 8 --compile \
  --repeats 1 --profile "${gen[@]}" --out "$out/gpu_generation_compiled.json"
exit $status
