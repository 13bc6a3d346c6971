"""llama-bench's tg128, the familiar figure: measured beside the verdict, never the verdict.

Nothing llama-bench generates is checked (it decodes fixed tokens), so no verdict may rest on it
(the timed samples run the harness's driver, driver.py); the check reports one tg128 of the
candidate and one of the baseline as information, and the profile uses it. One process, one
repetition, sandboxed like every process that runs candidate code.

The workload is fixed here, never by the candidate: `-p 0 -n 128 -r 1 -fa 1`, the model, the
threads and the CPU mask (`-t N -C mask --cpu-strict 1`) on CPU, `-ngl 99` on a GPU. llama-bench
prints one JSON object per test with `-o jsonl`; its field set changes between versions, so the
parser is tolerant (numbers as strings, missing optional fields, log noise between the lines)
and then strict about what it found: exactly one generation row with the fixed work, a finite
positive time, tokens/s that agree with the time, a time inside the process's own wall clock and
above the speed-of-light floor. Anything else is a Sample with ok=False and the reason: a FAIL
with a reason, never a number.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.sdk import Sample, sandbox

N_GEN = 128
N_PROMPT = 0
REPETITIONS = 1
BENCH_TIMEOUT_S = 300.0
# Peak memory bandwidth no machine of ours exceeds (bytes/s): decode reads every weight once
# per token, so no token can take less than model bytes / this.
MAX_BANDWIDTH = {"cpu": 1.0e12, "cuda": 10.0e12}
TS_TOLERANCE = 0.02  # avg_ts against n_gen / time: llama-bench computes both from samples_ns


@dataclass
class TgResult:
    seconds: float  # generation time of the n_gen tokens (samples_ns), no load or warm-up
    tokens_per_s: float
    row: dict = field(default_factory=dict)


def command(binary: Path, model: Path, *, backend: str, threads: int, cpu_mask: str) -> list[str]:
    cmd = [str(binary), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN), "-r", str(REPETITIONS),
           "-o", "jsonl", "-fa", "1", "-t", str(threads)]
    if backend == "cuda":
        cmd += ["-ngl", "99"]
    else:
        cmd += ["-ngl", "0", "-C", cpu_mask, "--cpu-strict", "1"]
    return cmd


def cpu_mask(cpus) -> str:
    """llama-bench's hex mask of CPU indices: {0, 1} -> '0x3'."""
    return hex(sum(1 << c for c in cpus))


# --- parsing -------------------------------------------------------------------------------------
def parse_rows(text: str) -> list[dict]:
    """Every JSON object on its own line of `text`; other lines (logs, partial writes) are skipped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value) -> float | None:
    """A JSON number, or a string holding one; None for anything else (bools included)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def samples_ns(row: dict) -> list[float] | None:
    raw = row.get("samples_ns")
    if isinstance(raw, str):  # some versions print the list as a string
        try:
            raw = json.loads(raw if raw.strip().startswith("[") else f"[{raw}]")
        except ValueError:
            return None
    if not isinstance(raw, list):
        return None
    values = [_number(v) for v in raw]
    return None if any(v is None for v in values) else values


def generation_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if _number(r.get("n_prompt")) == 0 and (_number(r.get("n_gen")) or 0) > 0]


def tg_result(text: str, *, wall_seconds: float, min_seconds: float = 0.0,
              expected: dict | None = None) -> TgResult | str:
    """The one generation row of llama-bench's JSONL output, checked; a string says why not.

    `expected` maps fields to the values the harness asked for (n_gen, n_threads, build_commit);
    a row that reports other work is refused. `min_seconds` is the speed-of-light floor."""
    rows = parse_rows(text)
    tg = generation_rows(rows)
    if not tg:
        return f"llama-bench printed no generation row (n_prompt 0, n_gen > 0) among {len(rows)} JSON rows"
    if len(tg) > 1:
        return f"llama-bench printed {len(tg)} generation rows; the harness asked for one test"
    row = tg[0]
    n_gen = _number(row.get("n_gen"))
    for name, want in (expected or {}).items():
        got = row.get(name)
        same = (_number(got) == _number(want)) if _number(want) is not None else str(got) == str(want)
        if name in row and not same:
            return f"llama-bench reported {name}={got!r}, the harness asked for {want!r}"
    samples = samples_ns(row)
    if samples is not None:
        if len(samples) != REPETITIONS:
            return f"llama-bench reported {len(samples)} repetitions, the harness asked for {REPETITIONS}"
        seconds = samples[0] / 1e9
    elif _number(row.get("avg_ns")) is not None:
        seconds = _number(row.get("avg_ns")) / 1e9
    elif _number(row.get("avg_ts")):
        seconds = n_gen / _number(row.get("avg_ts"))
    else:
        return "the generation row has no time (samples_ns, avg_ns or avg_ts)"
    if not (math.isfinite(seconds) and seconds > 0):
        return f"the generation time {seconds!r} s is not a finite positive number"
    tps = n_gen / seconds
    reported = _number(row.get("avg_ts"))
    if reported is not None and not (math.isfinite(reported) and abs(reported - tps) <= TS_TOLERANCE * tps):
        return f"avg_ts {reported!r} disagrees with n_gen / time = {tps:.4g} tokens/s"
    if wall_seconds > 0 and seconds > wall_seconds:
        return f"the generation took {seconds:.4g} s inside a process that ran {wall_seconds:.4g} s"
    if seconds < min_seconds:
        return (f"{n_gen:.0f} tokens in {seconds:.4g} s is faster than the memory bandwidth allows "
                f"(floor {min_seconds:.4g} s)")
    return TgResult(seconds=seconds, tokens_per_s=tps, row=row)


# --- running -------------------------------------------------------------------------------------
def run(box: sandbox.Sandbox, cmd: list[str], *, threads: int, min_seconds: float, build_commit: str,
        gpu: bool = False) -> Sample:
    """One llama-bench process in `box`; `cmd` from command() with the paths inside the box."""
    work = {"n_gen": N_GEN, "n_prompt": N_PROMPT, "threads": threads}
    t0 = time.perf_counter()
    result = box.run(cmd, sandbox.Limits(seconds=BENCH_TIMEOUT_S, memory_bytes=None if gpu else 8 << 30))
    wall = time.perf_counter() - t0
    if result.timed_out:
        return Sample(seconds=math.nan, value=0.0, ok=False, wall_seconds=wall, work=work,
                      detail=f"llama-bench ran past {BENCH_TIMEOUT_S:.0f} s and was killed")
    proc = subprocess.CompletedProcess(cmd, result.returncode, result.stdout, result.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return Sample(seconds=math.nan, value=0.0, ok=False, wall_seconds=wall, work=work,
                      detail=f"llama-bench exited {proc.returncode}: {' | '.join(tail)[-500:]}")
    got = tg_result(proc.stdout, wall_seconds=wall, min_seconds=min_seconds,
                    expected={"n_gen": N_GEN, "n_prompt": N_PROMPT, "n_threads": threads,
                              "build_commit": build_commit})
    if isinstance(got, str):
        return Sample(seconds=math.nan, value=0.0, ok=False, wall_seconds=wall, work=work, detail=got)
    row = got.row
    work = {"n_gen": int(_number(row.get("n_gen"))), "n_prompt": int(_number(row.get("n_prompt"))),
            "threads": int(_number(row.get("n_threads", threads)))}
    return Sample(seconds=got.seconds, value=got.tokens_per_s, ok=True, wall_seconds=wall, work=work)
