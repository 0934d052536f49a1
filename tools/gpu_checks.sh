#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for one device-machine call (../shared/gpu/README.md):
#
#   source .gpu-w/device-install.sh && bash tools/gpu_checks.sh
#
# Each check runs under its own time limit and writes its log to $OUT/<name>.log (OUT defaults to
# runs/gpu_checks); a failing or timed-out check does not stop the others. $OUT/summary.txt gets one
# line per check: name, exit status, seconds. The checks, most important first:
#
#   gpu_tests  pytest -m gpu: the Triton kernels on CUDA; data.pack=true refused on the TE spec;
#              tests/distributed/test_gpu_generation.py (TE-spec generation against the training model,
#              TF32 off and on, with the worker's JSON kept in $OUT; 20 swap cycles, log in $OUT); RM pair
#              weights on the GPU (these two files were written after the H200 run and wrap what it ran,
#              except the RM test, which has not run on a GPU)
#   sft_fp8    keel train sft on bench-34m with bf16 + FP8 (hybrid) on the TE spec, 20 steps
#   algorithms keel train grpo, ppo, dpo and rm a few steps each on the TE spec (not yet run on a GPU)
#   train_bench tools/bench/gpu_train_step.py: Keel's SFT step (TE bf16, FP8) against HF eager and
#              compiled on bench-1b, seq 2048 (not yet run on a GPU)
#   gen_bench  tools/bench/gpu_generate.py: the native backend (TE, bf16) against HF generate, dynamic and
#              compiled static cache, bench-1b, batch 64, 128 + 256 tokens (not yet run on a GPU)
#
# All of it takes longer than one device call may run (600 s): the limits of each of these two groups add
# up to 540 s, one call each: KEEL_GPU_CHECKS="gpu_tests sft_fp8 algorithms", then
# KEEL_GPU_CHECKS="train_bench gen_bench". With staging (~2 min) a 15-minute device budget holds both only
# when the machine stays warm between them. The script exits 1 when a check failed or ran out of time.
#
# KEEL_GPU_CHECKS="gpu_tests" runs a subset; KEEL_GPU_SCALE multiplies every time limit;
# KEEL_GPU_LAYER_SPEC=local runs the algorithms on the local spec (a CPU smoke test of this script).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-runs/gpu_checks}"
mkdir -p "$OUT"
SCALE="${KEEL_GPU_SCALE:-1}"
KNOWN="gpu_tests sft_fp8 algorithms train_bench gen_bench"
CHECKS="${KEEL_GPU_CHECKS:-$KNOWN}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 KEEL_GPU_OUT="$OUT"

for name in $CHECKS; do
  [[ " $KNOWN " == *" $name "* ]] || { echo "gpu_checks: unknown check '$name' (known: $KNOWN)" >&2; exit 2; }
done
awk -v k="$SCALE" 'BEGIN { exit !(k + 0 > 0) }' || { echo "gpu_checks: KEEL_GPU_SCALE=$SCALE is not > 0" >&2; exit 2; }
FAILED=()

check() {  # check NAME SECONDS COMMAND...
  local name="$1" limit
  limit="$(awk -v s="$2" -v k="$SCALE" 'BEGIN { l = int(s * k); print (l < 1 ? 1 : l) }')"
  shift 2
  [[ " $CHECKS " == *" $name "* ]] || return 0
  local start=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  # SIGINT first: pytest then runs its finally blocks, which kill the launches in their own sessions
  timeout -s INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  (( rc == 0 )) || FAILED+=("$name")
  echo "== $name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} >> "$OUT/summary.txt"

check gpu_tests 270 "$PY" -m pytest -m gpu -q -s -p no:cacheprovider tests

check sft_fp8 90 "$PY" -m engine train sft model.preset=bench-34m model.layer_spec=te \
  precision.dtype=bf16 precision.fp8=hybrid run.train_steps=20 data.seq_length=256 \
  logging.progress=false checkpoint.save_interval=0 checkpoint.resume=none "run.output_dir=$OUT/sft_fp8"

# every trainer a few steps on the TE spec (the examples start from random weights); exits 1 if any failed
# shellcheck disable=SC2016  # expanded by the inner bash: $0 python, $1 output folder, $2 layer spec
ALGORITHMS='
status=0
for cmd in "grpo --config examples/grpo_tiny.yaml run.train_steps=3" "ppo --config examples/ppo_tiny.yaml run.train_steps=2" \
           "dpo --config examples/dpo_tiny.yaml run.train_steps=5" "rm run.train_steps=5"; do
  name=${cmd%% *}
  echo "-- keel train $cmd"
  "$0" -m engine train $cmd logging.progress=false checkpoint.save_interval=0 checkpoint.resume=none \
    "model.layer_spec=$2" "run.output_dir=$1/$name" || { echo "-- $name FAILED"; status=1; }
done
exit $status'
check algorithms 180 bash -c "$ALGORITHMS" "$PY" "$OUT" "${KEEL_GPU_LAYER_SPEC:-te}"

check train_bench 300 "$PY" tools/bench/gpu_train_step.py --out "$OUT/gpu_train_step.json"
check gen_bench 240 "$PY" tools/bench/gpu_generate.py --warmup 1 --runs 2 --out "$OUT/gpu_generate.json"

cat "$OUT/summary.txt"
if (( ${#FAILED[@]} )); then
  echo "gpu_checks: failed or out of time: ${FAILED[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
