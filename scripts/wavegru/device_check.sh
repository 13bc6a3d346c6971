#!/usr/bin/env bash
# The GPU machine's part of issue 15, from the repository root, output under $OUT:
#   STAGE=tests   the GPU tests (baseline, every solution through the real lab path, the seal)
#   STAGE=measure `lab noise wavegru`, then bench.py (one full evaluation per correct solution)
# The sandbox: bubblewrap from $LAB_BWRAP when it can make namespaces here; otherwise
# LAB_SANDBOX=off, said in $OUT/sandbox.txt and recorded by the lab in every fingerprint.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD LAB_CACHE=${LAB_CACHE:-/tmp/labcache}
OUT=${OUT:-/tmp/wavegru_out}
mkdir -p "$OUT"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv; nvcc --version | tail -2; python3 -c 'import torch; print("torch", torch.__version__)'; } | tee "$OUT/gpu.txt"
if ! python3 -c 'from lab import sandbox; sandbox.check_available(); print("sandbox:", sandbox.describe())' >"$OUT/sandbox.txt" 2>&1; then
  export LAB_SANDBOX=off
  echo "bubblewrap cannot make namespaces here: LAB_SANDBOX=off for this run" >>"$OUT/sandbox.txt"
fi
cat "$OUT/sandbox.txt"
case "${STAGE:-tests}" in
  tests)
    timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -p no:cacheprovider tests/test_wavegru_gpu.py -rA ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" ;;
  measure)
    /usr/bin/time -v timeout 200 python3 -m lab.cli noise wavegru --json >"$OUT/noise.json" 2>"$OUT/noise.log"; tail -5 "$OUT/noise.log"; head -c 1500 "$OUT/noise.json"; echo
    timeout "${BENCH_TIMEOUT:-300}" python3 scripts/wavegru/bench.py --json "$OUT/bench_h200.json" --pairs "${PAIRS:-20}" 2>&1 | tee "$OUT/bench.log" ;;
esac
