#!/bin/bash
# Usage: M=<model .gguf> OLD=<bin folder of the build before> NEW=<bin folder of the build after> bash scripts/llamacpp/cpu_cost.sh
# (the 2026-12-02 run used two builds of the lab cache, builds/llamacpp/<lock>-<source>/out/bin).
# CPU seconds (user+sys, load-independent to first order) of what one timed pair costs, before and after issue 20.
# before: two llama-bench tg128 processes per pair; after: two lab-llama-driver processes (64 tokens) + one
# teacher-forced reference pass of the pristine driver (score mode, persistent process: no load).
M=${M:?set M to the model file (in the lab cache: llamacpp/models/gemma-3-270m-q4_k_m.gguf)}
OLD=${OLD:?set OLD to the bin folder of the build before}
NEW=${NEW:?set NEW to the bin folder of the build after}
P=$(printf 'everyone has the right to freedom of thought, conscience and religion; this right includes' | xxd -p | tr -d '\n')
for i in 1 2 3; do
  /usr/bin/time -f "before llama-bench-tg128 user %U sys %S wall %e" taskset -c 1 $OLD/llama-bench -m $M -p 0 -n 128 -r 1 -o jsonl -fa 1 -t 1 -ngl 0 -C 0x2 --cpu-strict 1 >/dev/null 2>/tmp/cc.err; tail -1 /tmp/cc.err
  /usr/bin/time -f "after driver-gen64 user %U sys %S wall %e" taskset -c 1 sh -c "echo '64 $P' | $NEW/lab-llama-driver $M 1 0 512" > /tmp/cc.out 2>/tmp/cc.err; tail -1 /tmp/cc.err
  TOK=$(python3 -c "import json;l=open('/tmp/cc.out').read().splitlines()[1];t=json.loads(l)['tokens'];print(len(t),' '.join(map(str,t)))")
  # the score pass alone: one process scoring the same request twice, minus one process scoring it once
  /usr/bin/time -f "after scorer-1pass user %U sys %S wall %e" taskset -c 1 sh -c "echo '$P $TOK' | $NEW/lab-llama-driver $M 1 0 512 --score" >/dev/null 2>/tmp/cc.err; tail -1 /tmp/cc.err
  /usr/bin/time -f "after scorer-2pass user %U sys %S wall %e" taskset -c 1 sh -c "printf '$P $TOK\n$P $TOK\n' | $NEW/lab-llama-driver $M 1 0 512 --score" >/dev/null 2>/tmp/cc.err; tail -1 /tmp/cc.err
done
