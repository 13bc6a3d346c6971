#!/usr/bin/env bash
# The colleague's path for wavegru, end to end on one GPU machine (issue 17.8), in one call:
#   clone A (a git checkout of this tree in its own folder) runs
#     lab run wavegru --agent replay:harnesses/wavegru/solutions/correct
#   to a KEEP and exports the bundle;
#   clone B (another checkout elsewhere, its own LAB_CACHE, its own copy of the lab) runs
#     lab reproduce BUNDLE
#   and must exit 0: same cubin sha256, same outputs on the recorded seeds, speedup reproduced.
# Each clone runs its own lab (PYTHONPATH is the clone) from the default runs/ inside its checkout,
# as a person would. The tests do the same on the CPU (tests/test_colleague.py).
#
# Run from the repository root:   OUT=/tmp/colleague bash scripts/colleague_check.sh
# (HARNESS and REPLAY choose another harness and patch list, e.g. on a CPU:
#  HARNESS=examples/cdot REPLAY=examples/cdot/solutions/correct.)
# Writes under $OUT: gpu.txt, versions.txt, run_a.log, export_a.log, the bundle, reproduce_b.json,
# reproduce_b.log, reproduce_b_table.txt, summary.txt. Exits with lab reproduce's code (0: reproduced;
# 2 refused; 3 incorrect; 4 outputs differ; 5 artifact differs; 6 speedup not reproduced), or 10/11
# when clone A did not reach a KEEP or an export.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/colleague_out}
mkdir -p "$OUT"
SRC=$(pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$SRC/.venv/bin/python" ]; then PY="$SRC/.venv/bin/python"; else PY=python3; fi
fi
HARNESS=${HARNESS:-wavegru}
REPLAY=${REPLAY:-harnesses/wavegru/solutions/correct}
NAME=$(basename "$HARNESS")
WORK=$(mktemp -d /tmp/colleague.XXXXXX)
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
{ date -u; "$PY" --version; command -v nvcc >/dev/null && nvcc --version | tail -2; } > "$OUT/versions.txt" 2>&1

# The origin both colleagues clone: this tree's files as they are (tracked and new, not ignored).
ORIGIN="$WORK/origin"
mkdir -p "$ORIGIN"
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$SRC" ls-files -co --exclude-standard -z \
    | (cd "$SRC" && xargs -0 -r cp --parents -t "$ORIGIN" 2>/dev/null)
else
  tar -C "$SRC" --exclude=./.venv --exclude=./runs --exclude=__pycache__ --exclude=./.git -cf - . \
    | tar -C "$ORIGIN" -xf -
fi
git -C "$ORIGIN" init -q -b main
git -C "$ORIGIN" add -A
git -C "$ORIGIN" -c user.name=lab -c user.email=lab@localhost commit -qm "the lab"
A="$WORK/alice/lab"
B="$WORK/bob/somewhere/else/lab"
for clone in "$A" "$B"; do
  git clone -q "$ORIGIN" "$clone"
  git -C "$clone" config user.name lab
  git -C "$clone" config user.email lab@localhost
done
say "origin $(git -C "$ORIGIN" rev-parse HEAD); clone A $A; clone B $B; python $PY"

# Clone A: the run to a KEEP, then the export.
(cd "$A" && PYTHONPATH="$A" LAB_CACHE="$WORK/alice/cache" timeout "${RUN_TIMEOUT:-360}" \
  "$PY" -m lab.cli run "$HARNESS" --agent "replay:$REPLAY" \
  --max-experiments 1 --budget 30m --quiet) > "$OUT/run_a.log" 2>&1
say "clone A: lab run exited $?"
RUN=$(ls -d "$A/runs/$NAME"-* 2>/dev/null | head -1)
if [ -z "$RUN" ] || ! grep -q '"type":"kept"' "$RUN/events.jsonl"; then
  say "clone A reached no KEEP; see run_a.log"
  [ -n "$RUN" ] && cp "$RUN/log.md" "$RUN/events.jsonl" "$OUT/" 2>/dev/null
  exit 10
fi
cp "$RUN/log.md" "$RUN/results.tsv" "$OUT/" 2>/dev/null
(cd "$A" && PYTHONPATH="$A" LAB_CACHE="$WORK/alice/cache" "$PY" -m lab.cli export "$RUN") > "$OUT/export_a.log" 2>&1
BUNDLE=$(sed -n 's/^wrote //p' "$OUT/export_a.log" | tail -1)
if [ -z "$BUNDLE" ] || [ ! -f "$BUNDLE" ]; then say "clone A could not export; see export_a.log"; exit 11; fi
mkdir -p "$WORK/bob/inbox"
cp "$BUNDLE" "$WORK/bob/inbox/" && cp "$BUNDLE" "$OUT/"
BUNDLE_B="$WORK/bob/inbox/$(basename "$BUNDLE")"
say "clone A kept and exported $(basename "$BUNDLE") (sha256 $(sha256sum "$BUNDLE" | cut -c1-16))"

# Clone B: another checkout, another cache, another folder: the reproduction.
(cd "$B" && PYTHONPATH="$B" LAB_CACHE="$WORK/bob/cache" timeout "${REPRO_TIMEOUT:-200}" \
  "$PY" -m lab.cli reproduce "$BUNDLE_B" --harness "$HARNESS" --json) > "$OUT/reproduce_b.json" 2> "$OUT/reproduce_b.log"
CODE=$?
say "clone B: lab reproduce exited $CODE"
"$PY" - "$OUT/reproduce_b.json" <<'EOF' | tee "$OUT/reproduce_b_table.txt" | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    print(f"no report ({exc}); see reproduce_b.log"); sys.exit(0)
def sp(v):
    return f"{v.get('status')} {v['speedup']:.4f}x CI {v['ci'][0]:.4f}-{v['ci'][1]:.4f} ({v['pairs']} pairs)" \
        if v.get("speedup") and v.get("ci") else str(v.get("status"))
print(f"cubin   recorded {r['artifact_recorded']}\n        now      {r['artifact_now']}  identical={r['artifact_identical']}")
print(f"base    recorded {r['base_artifact_recorded']}\n        now      {r['base_artifact_now']}  identical={r['base_artifact_identical']}")
print(f"outputs identical={r['outputs_identical']}  correct={r['correct']}")
print(f"speedup claimed  {sp(r['speedup_recorded'])}\n        measured {sp(r['speedup_now'])}  consistent={r['speedup_consistent']}")
print(f"fingerprint fields that differ: {', '.join(r['fingerprint_differences']) or 'none'}")
print(f"ok={r['ok']} failed={r['failed']} exit_code={r['exit_code']}")
EOF
exit $CODE
