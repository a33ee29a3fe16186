#!/usr/bin/env bash
# GPU checks for dpft, on a machine with CUDA (not runnable on the CPU dev box). Budget: < 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with dpft importable
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. GPU tests: tests/test_device.py and the device/noise tests of tests/test_distributed.py (CUDA
#    tests run instead of skipping);
# 2. a 3-step DP run of the embedded model with --device cuda (LoRA, fp32 and bf16);
# 3. the step-cost benchmark with --device cuda, if step_cost.py has that option;
# 4. with >= 2 GPUs: the same seeded job as 1 GPU and as torchrun 2 GPUs (nccl): same privacy.json,
#    weights equal within tolerance (benchmarks/ddp_scaling.py --device cuda).
# One table at the end; each check has its own timeout so the whole stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG=$(mktemp -d /tmp/dpft-gpu-check.XXXXXX)
ROWS=()
STATUS=0

check() {  # check NAME TIMEOUT_S CMD... : run, time, record PASS/FAIL/TIMEOUT and the last line of output
  local name=$1 limit=$2
  shift 2
  local t0 rc dt
  t0=$(date +%s)
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  local verdict=PASS
  if [ "$rc" -eq 124 ]; then verdict=TIMEOUT; elif [ "$rc" -ne 0 ]; then verdict="FAIL($rc)"; fi
  [ "$verdict" = PASS ] || STATUS=1
  local last
  last=$(grep -v '^\s*$' "$LOG/$name.log" | tail -n 1 | cut -c1-70)
  ROWS+=("$(printf '%-28s %-11s %5ss  %s' "$name" "$verdict" "$dt" "$last")")
}

skip() { ROWS+=("$(printf '%-28s %-11s %5s   %s' "$1" SKIP - "$2")"); }

GPUS=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$GPUS" -lt 1 ]; then
  echo "no CUDA device visible to $PY: nothing to check" >&2
  exit 2
fi
$PY -c 'import torch; [print(f"GPU {i}: {torch.cuda.get_device_name(i)}") for i in range(torch.cuda.device_count())]'

# 1. tests that need CUDA (they skip on CPU)
check gpu-tests 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_device.py tests/test_distributed.py -m "not slow"

# 2. the embedded model on one GPU
DATA="$LOG/records.jsonl"
$PY - "$DATA" <<'EOF'
import json, sys
rows = [{"prompt": f"Patient {i} reports symptom {i % 13} since", "completion": f" day {i % 29}."} for i in range(256)]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
EOF
TRAIN=(-m dpft.cli.main train --data "$DATA" --batch-size 32 --micro-batch-size 16 --max-steps 3 --max-length 64
  --epsilon 8 --delta 1e-5 --checkpoint-every 0 --quiet --device cuda --json)
check train-cuda-fp32 120 $PY "${TRAIN[@]}" --output "$LOG/run-fp32" --dtype fp32
check train-cuda-bf16 120 $PY "${TRAIN[@]}" --output "$LOG/run-bf16" --dtype bf16

# 3. step cost on the GPU, if the benchmark takes --device
if $PY benchmarks/step_cost.py --help 2>/dev/null | grep -q -- '--device'; then
  check step-cost-cuda 150 $PY benchmarks/step_cost.py --device cuda --mode lora --dtype bf16 --no-memory \
    --json-out "$LOG/step_cost.json"
else
  skip step-cost-cuda "benchmarks/step_cost.py has no --device option yet"
fi

# 4. two GPUs, nccl: same seeded job as one GPU
if [ "$GPUS" -ge 2 ]; then
  check ddp-2gpu-vs-1gpu 180 $PY benchmarks/ddp_scaling.py --device cuda --nproc 2 --threads 1 --steps 4 \
    --json-out "$LOG/ddp.json"
  if [ -f "$LOG/ddp.json" ]; then
    $PY - "$LOG/ddp.json" <<'EOF' || STATUS=1
import json, sys
r = json.load(open(sys.argv[1]))
ok = r["same_privacy_json"] and r["max_weight_diff"] < 1e-3
print(f"ddp: same privacy.json={r['same_privacy_json']} max weight diff={r['max_weight_diff']:.2e} "
      f"step-time speedup={r['speedup_steps']:.2f}x")
sys.exit(0 if ok else 1)
EOF
  fi
else
  skip ddp-2gpu-vs-1gpu "$GPUS GPU visible"
fi

echo
printf '%-28s %-11s %6s  %s\n' CHECK RESULT TIME "LAST LINE"
printf '%s\n' "${ROWS[@]}"
echo "logs: $LOG"
exit $STATUS
