#!/usr/bin/env bash
# The GPU set of the benchmarks end to end on one CUDA GPU in bf16: quality on all-MiniLM-L6-v2, gated_perplexity and
# decoder_compression on SmolLM2-135M, with the GPU budgets of benchmarks/README.md ("On a GPU"). Each step runs under
# a time limit (the limits sum to under 10 minutes); results go to benchmarks/results/NAME_gpu.{json,md,png}, beside
# the CPU ones, and each step's output to $LOGS/NAME.log. A step that fails or runs out of time does not stop the
# others; the summary lists every step, and the exit status is 1 when one of them did not finish.
#
#   benchmarks/run_gpu.sh                       # one visible GPU (pick it with CUDA_VISIBLE_DEVICES=N)
#   QUICK=1 DEVICE=cpu benchmarks/run_gpu.sh    # smoke run: the same commands in the scripts' --quick modes
#
# Environment: PYTHON (python), DEVICE (cuda), DTYPE (bfloat16), QUICK (0), LOGS (a new temporary folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
QUICK=${QUICK:-0}
LOGS=${LOGS:-$(mktemp -d -t run_gpu.XXXXXX)}
mkdir -p "$LOGS"
if [[ $DEVICE == cpu && $QUICK != 1 ]]; then
  echo "run_gpu.sh: DEVICE=cpu would run the GPU budgets on the CPU (hours); QUICK=1 DEVICE=cpu is the smoke run" >&2
  exit 2
fi
common=(--device "$DEVICE" --dtype "$DTYPE")
seeds=(0 1 2)
if [[ $QUICK == 1 ]]; then
  common+=(--quick)
  seeds=(0)
fi

summary=()
failures=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: COMMAND under the limit, its output shown and kept in $LOGS/NAME.log
  local name=$1 limit=$2 start=$SECONDS status=0 outcome=ok
  shift 2
  echo "=== $name (limit $limit s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || status=$?
  if ((status == 124 || status == 137)); then
    outcome="out of time"
  elif ((status != 0)); then
    outcome="failed (exit $status)"
  fi
  ((status == 0)) || failures=$((failures + 1))
  summary+=("$(printf '%-26s %-18s %4d s of %3d s' "$name" "$outcome" $((SECONDS - start)) "$limit")")
}

report() {
  echo
  echo "=== summary: $DEVICE, $DTYPE$([[ $QUICK == 1 ]] && echo ', quick modes (no results written)'); logs in $LOGS"
  printf '%s\n' "${summary[@]}"
  if [[ $QUICK != 1 ]]; then
    echo "results:"
    ls -1 benchmarks/results/quality_gpu.* benchmarks/results/gated_perplexity_gpu.* \
      benchmarks/results/decoder_compression_gpu.* 2>/dev/null || echo "  (none written)"
  fi
}

# the device, the dtype and every offline asset the three steps read, before spending time on any of them
step preflight 30 "$PYTHON" - "$DEVICE" "$DTYPE" <<'PY'
import sys

sys.path.insert(0, "benchmarks")
from common import assets, resolve_placement

try:
    print("device:", resolve_placement(sys.argv[1], sys.argv[2]).label())
except ValueError as error:
    raise SystemExit(f"run_gpu.sh: {error}") from None
for name in ("minilm_path", "smollm2_path", "load_shakespeare", "load_python_docs"):
    getattr(assets, name)()
assets.load_tweets(binary=True, seed=0, test_size=1000)
print("offline assets: found")
PY
if ((failures)); then
  report
  exit 1
fi

step quality_gpu 200 "$PYTHON" benchmarks/quality.py "${common[@]}" --seeds "${seeds[@]}" --methods baselines blend \
  --linear_target affine --refit_targets --order planned --reg_weight 10 --alpha_lr 0.2 --stage_steps 60 \
  --recovery_steps 120 --name quality_gpu
step gated_perplexity_gpu 170 "$PYTHON" benchmarks/gated_perplexity.py "${common[@]}" --linear_target affine \
  --refit_targets --trainable mlps --stage_steps 32 --batch_size 8 --heldout_tokens 16384 --calibration_tokens 32768 \
  --eval_batch 16 --name gated_perplexity_gpu
step decoder_compression_gpu 190 "$PYTHON" benchmarks/decoder_compression.py "${common[@]}" --calibrations shakespeare \
  --budgets 2 4 5 --methods shortgpt replaceme planner --windows 256 --eval_windows 64 --name decoder_compression_gpu

report
((failures == 0))
