#!/bin/bash
# quiet-core llama.cpp (issue 20, deliverable 5): one evaluation cycle, then the A/A floor of the checked driver samples
cd "$REPO"
export LAB_CACHE=/tmp/q/cache CCACHE_DIR=$HOME/.cache/lab-test-ccache PYTHONPATH="$REPO"
L=.venv/bin
uptime; head -1 /proc/stat
rm -rf /tmp/q/cand /tmp/q/runs2 && $L/python /tmp/q/prep.py /tmp/q/cand
/usr/bin/time -f "bench wall %e s" $L/lab bench harnesses/llamacpp --src /tmp/q/cand --delta 0.047 --runs /tmp/q/runs2 --json > /tmp/q/bench2.json 2> /tmp/q/bench2.err
uptime; head -1 /proc/stat
/usr/bin/time -f "noise wall %e s" $L/lab noise harnesses/llamacpp --runs /tmp/q/runs2 --json > /tmp/q/noise2.json 2> /tmp/q/noise2.err
uptime; head -1 /proc/stat
# before (c83d89d^: llama-bench tg128 timed, unchecked), the same command, same hour
cd /tmp/q/before
export LAB_CACHE=/tmp/q/cache_before PYTHONPATH=/tmp/q/before
$L/python -c 'from lab.harness import load; h=load("harnesses/llamacpp"); h.preflight(); import time; t=time.time(); h.baseline(); print("before: pristine build", round(time.time()-t,1), "s")'
rm -rf /tmp/q/cand_before && $L/python /tmp/q/prep.py /tmp/q/cand_before
uptime; head -1 /proc/stat
/usr/bin/time -f "bench-before wall %e s" $L/python -m lab.cli bench harnesses/llamacpp --src /tmp/q/cand_before --delta 0.047 --runs /tmp/q/runs_before --json > /tmp/q/bench_before.json 2> /tmp/q/bench_before.err
uptime; head -1 /proc/stat
