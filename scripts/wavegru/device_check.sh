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
  all)
    timeout "${TEST_TIMEOUT:-430}" python3 -m pytest -q -p no:cacheprovider tests/test_wavegru_gpu.py -rA ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log"
    W=$OUT/measure; mkdir -p "$W"
    /usr/bin/time -f "noise wall %e s" timeout 100 python3 -m lab.cli noise wavegru --json >"$W/noise.json" 2>"$W/noise.log"
    tail -3 "$W/noise.log"; cat "$W/noise.json"; echo
    python3 -c 'import json,sys,shutil; shutil.copy(json.load(open(sys.argv[1]))["record"], sys.argv[2])' "$W/noise.json" "$W/noise_record.json" ;;
  bench)  # one `lab bench` per correct patch (incumbent: the baseline), records under $OUT/bench
    W=$OUT/bench; mkdir -p "$W"
    for p in ${BENCH_PATCHES:-input_table}; do
      rm -rf /tmp/src_$p && mkdir -p /tmp/src_$p && cp harnesses/wavegru/kernel.cu /tmp/src_$p/ && (cd /tmp/src_$p && git apply "$OLDPWD/harnesses/wavegru/solutions/correct/$p.patch")
      /usr/bin/time -f "bench $p wall %e s" timeout 120 python3 -m lab.cli bench wavegru --src /tmp/src_$p --json >"$W/bench_$p.json" 2>"$W/bench_$p.log"
      tail -1 "$W/bench_$p.log"; head -c 600 "$W/bench_$p.json"; echo
    done ;;
  tests)
    timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -p no:cacheprovider tests/test_wavegru_gpu.py -rA ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" ;;
  measure)
    W=$(mktemp -d); cp "$OUT/gpu.txt" "$OUT/sandbox.txt" "$W/"
    /usr/bin/time -f "noise wall %e s" timeout 200 python3 -m lab.cli noise wavegru --json >"$W/noise.json" 2>"$W/noise.log"
    tail -3 "$W/noise.log"; cat "$W/noise.json"; echo
    python3 -c 'import json,sys,shutil; shutil.copy(json.load(open(sys.argv[1]))["record"], sys.argv[2])' "$W/noise.json" "$W/noise_record.json"
    for p in ${BENCH_PATCHES:-input_table}; do
      rm -rf /tmp/src_$p && mkdir -p /tmp/src_$p && cp harnesses/wavegru/kernel.cu /tmp/src_$p/ && (cd /tmp/src_$p && git apply "$OLDPWD/harnesses/wavegru/solutions/correct/$p.patch")
      /usr/bin/time -f "bench $p wall %e s" timeout 120 python3 -m lab.cli bench wavegru --src /tmp/src_$p --json >"$W/bench_$p.json" 2>"$W/bench_$p.log"
      tail -2 "$W/bench_$p.log"; python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ("status","reason","ratio","ci_low","ci_high","pairs","verdict")})' "$W/bench_$p.json" 2>&1 | head -c 1500; echo
    done
    timeout "${BENCH_TIMEOUT:-200}" python3 scripts/wavegru/bench.py --json "$W/bench_h200.json" --pairs "${PAIRS:-20}" >"$W/bench.log" 2>&1; tail -6 "$W/bench.log"
    tar czf "$OUT/measure.tgz" -C "$W" . ;;
esac
