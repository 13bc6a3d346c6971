#!/usr/bin/env bash
# One call on a GPU machine for docs/scaling.md: `lab run wavegru` over a replay of A/A and
# known-slowdown proposals (scripts/aa_replay.py) on the GPUs in $GPUS, then the run's summary
# (experiments per hour, noise floors, verdicts). The run folder's events, log and results come
# back under $OUT (its worktrees stay behind: they are copies of the repository).
#
#   GPUS=0   bash scripts/wavegru/scaling_check.sh     # one GPU
#   GPUS=0,1 bash scripts/wavegru/scaling_check.sh     # two
#   DELTA=0.01 GPUS=0,1 bash ...                          # a fixed delta (the same for both runs,
#                                                         # so that pairs per evaluation compare)
#
# Run from the repository root. AA and SLOW set the replay's size; BUDGET the run's budget.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/scaling_out}
GPUS=${GPUS:-0}
tag="gpus-${GPUS//,/-}"
mkdir -p "$OUT/$tag"
runs=$(mktemp -d /tmp/lab-runs.XXXX)
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,power.limit --format=csv | tee "$OUT/$tag/gpu.txt"
nproc | tee -a "$OUT/$tag/gpu.txt"
python3 scripts/aa_replay.py harnesses/wavegru --aa "${AA:-15}" --slow "${SLOW:-5}" \
    --slower harnesses/wavegru/solutions/measure/slower_3pct.patch -o "$runs/replay.jsonl"
start=$(date +%s)
timeout "${LIMIT:-560}" python3 -m lab.cli run wavegru --gpus "$GPUS" --agent "replay:$runs/replay.jsonl" \
    --budget "${BUDGET:-9m}" ${DELTA:+--delta "$DELTA"} --quiet --runs "$runs" 2>&1 | tee "$OUT/$tag/stdout.log"
echo "lab run exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/$tag/stdout.log"
for run in "$runs"/wavegru-*; do
    cp "$run"/{events.jsonl,log.md,results.tsv,run.json} "$OUT/$tag/" 2>/dev/null
    python3 scripts/scaling_summary.py "$run" --json "$OUT/$tag/summary.json"
done
