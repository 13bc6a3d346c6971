#!/usr/bin/env bash
# One call on the GPU machine: GPU tests (baseline + every solution through the real oracle),
# then the benchmark of BENCH.md. Logs and JSON under $OUT. Run from the repository root.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/wavegru_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_wavegru_gpu.py -rA 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 400 python3 scripts/wavegru/bench.py --json "$OUT/bench_h100.json" --pairs "${PAIRS:-20}" 2>&1 | tee "$OUT/bench.log"
fi
