"""A per-op time digest of tg128 for the agent (never used for a verdict).

CPU: `perf record` (software clock, so it works in VMs without a PMU) samples one llama-bench
run of three tg128 repetitions; the symbols are grouped into what they are in a ggml graph
(the quantised dot product of each weight type is a MUL_MAT, ggml_compute_forward_X is op X,
libgomp is the threads waiting at the graph's barriers). Load and warm-up are in the samples
too and are shown as such, not hidden. Where perf is missing the digest says so.
CUDA: the share of the generation during which no kernel runs (seed 000 found the GPU idle 38% of
each token, waiting for the host), read from NVML's utilization counter while llama-bench
generates, then `test-backend-ops perf` for the ops of a decode step (GPU time per op shape).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from lab import sandbox

from . import bench, driver
from .oracle import DECODE_OPS, backend_ops_args

# Every process here runs the candidate's build (llama-bench, test-backend-ops), so each runs in
# the same sandbox as the driver and the oracle's tools (driver.box): the build and the model
# read-only, a scratch folder, nothing of the lab, a cleared environment (no LLAMA_/GGML_
# overrides). perf runs inside with it and reads its own data file there: a candidate's process
# can write that file, so the host never parses it.
PROFILE_TIMEOUT_S = 600.0

IDLE_N_GEN, IDLE_REPS = 1024, 3  # ~5 s of generation on an H200: many NVML readings
NVML_POLL_S = 0.02
PERF_OP_TIMEOUT_S = 60.0  # the digest must stay a few minutes at most
_GROUPS = [
    (re.compile(r"^ggml_(?:vec_dot|gemv|gemm)_(\w+?)_q8"), lambda m: f"MUL_MAT weights {m.group(1)}"),
    (re.compile(r"^ggml_compute_forward_(\w+?)(?:_f32|_f16|_one_chunk|\.isra.*|\.part.*)*$"),
     lambda m: m.group(1).upper()),
    (re.compile(r"^(?:quantize_row_q8|ggml_cpu_fp16_to_fp32|ggml_cpu_fp32_to_fp16)"), lambda m: "activation quantize/convert"),
    (re.compile(r"^ggml_graph_compute|^ggml_barrier|^ggml_threadpool"), lambda m: "graph scheduling"),
    (re.compile(r"llama_vocab|llama_model_loader|gguf_|_Hashtable|_Map_base|basic_string|llama_model::load"),
     lambda m: "model load (not decode)"),
]


def _group(dso: str, symbol: str) -> str:
    if "libgomp" in dso:
        return "threads waiting (OpenMP barrier spin)"
    if dso.startswith("[kernel"):
        return "kernel (page faults, syscalls)"
    for pattern, name in _GROUPS:
        m = pattern.search(symbol)
        if m:
            return name(m)
    return "other"


def cpu_digest(bindir: Path, model: Path, threads: int, cpu_mask: str, top: int = 12) -> str:
    if shutil.which("perf") is None:
        return "profile: `perf` is not installed (apt-get install linux-perf); no per-op digest on this machine"
    with tempfile.TemporaryDirectory(prefix="lab-llamacpp-perf-") as tmp:
        sb = driver.box(bindir, model, gpu=False, extra=(sandbox.Bind(Path(tmp), "/out", writable=True),))
        cmd = bench.command(Path(sb.path(bindir / "llama-bench")), Path(sb.path(model)), backend="cpu",
                            threads=threads, cpu_mask=cpu_mask)
        cmd[cmd.index("-r") + 1] = "3"
        data = sb.path(Path(tmp) / "perf.data")
        rec = sb.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-o", data, "--", *cmd],
                     driver.limits(PROFILE_TIMEOUT_S, gpu=False))
        if not rec.ok:
            return f"profile: perf record failed ({(rec.stderr or '').strip()[-300:]})"
        rep = sb.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,symbol",
                      "--field-separator", "\t"], driver.limits(PROFILE_TIMEOUT_S / 2, gpu=False))
    groups: dict[str, float] = defaultdict(float)
    symbols: list[tuple[float, str, str]] = []
    for line in rep.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        share = float(parts[0].rstrip("%"))
        dso, symbol = parts[1], re.sub(r"^\[[.k]\]\s*", "", parts[2])
        groups[_group(dso, symbol)] += share
        symbols.append((share, dso, symbol))
    tg = next((r for r in bench.parse_rows(rec.stdout) if r.get("n_gen")), {})
    lines = [f"profile: perf, cpu-clock samples of one llama-bench run (3 x tg128, {threads} threads, "
             f"{tg.get('avg_ts', '?')} tokens/s), load and warm-up included",
             "by kind (share of all samples):"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines.append(f"top {top} symbols:")
    lines += [f"  {share:5.1f}%  {symbol[:80]}  ({Path(dso).name})" for share, dso, symbol in symbols[:top]]
    return "\n".join(lines)


def gpu_busy(bindir: Path, model: Path, gpu_index: int = 0) -> str:
    """One line: the share of llama-bench's generation during which a kernel ran, per NVML.

    NVML's utilization is the share of its last sample period (1/6 s to 1 s by GPU) in which any
    kernel ran; it is read every 20 ms while llama-bench generates IDLE_N_GEN tokens IDLE_REPS
    times, and only readings inside the generation (the last sum(samples_ns) before the process
    ended, less its first 0.2 s) are averaged. Coarse, but it needs no profiler."""
    from lab.system.telemetry import device_handle, open_nvml, read

    nvml = open_nvml()
    handle = device_handle(nvml, gpu_index) if nvml is not None else None
    if handle is None:
        return "GPU idle between kernels: no NVML here"
    sb = driver.box(bindir, model, gpu=True)
    cmd = [sb.path(bindir / "llama-bench"), "-m", sb.path(model), "-p", "0", "-n", str(IDLE_N_GEN),
           "-r", str(IDLE_REPS), "-o", "jsonl", "-fa", "1", "-ngl", "99"]
    readings: list[tuple[float, float]] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            rates = read(nvml, "nvmlDeviceGetUtilizationRates", handle)
            if rates is not None:
                readings.append((time.monotonic(), float(rates.gpu)))
            time.sleep(NVML_POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        proc = sb.run(cmd, driver.limits(PROFILE_TIMEOUT_S, gpu=True))
    finally:
        ended = time.monotonic()
        done.set()
        poller.join()
    row = next((r for r in bench.parse_rows(proc.stdout) if r.get("n_gen")), None)
    samples = bench.samples_ns(row) if row else None
    if not proc.ok or not samples:
        return f"GPU idle between kernels: llama-bench gave no generation row (exit {proc.returncode})"
    generating = sum(samples) / 1e9
    inside = [u for t, u in readings if ended - generating + 0.2 <= t <= ended - 0.05]
    if not inside:
        return "GPU idle between kernels: no NVML reading fell inside the generation"
    busy = sum(inside) / len(inside)
    per_token_ms = 1e3 * generating / (IDLE_N_GEN * len(samples))
    return (f"GPU idle between kernels: {100 - busy:.0f}% of the generation (NVML utilization {busy:.0f}%, "
            f"{len(inside)} readings over {generating:.1f} s; tg{IDLE_N_GEN} x {len(samples)}, "
            f"{per_token_ms:.2f} ms per token). Idle time is the host between kernels and tokens "
            "(sampling, graph set-up, launches), not memory stalls.")


def cuda_digest(bindir: Path, model: Path) -> str:
    out = [gpu_busy(bindir, model)]
    sb = driver.box(bindir, model, gpu=True)
    for op in DECODE_OPS:
        args = backend_ops_args(op, model)
        if op == "MUL_MAT":  # decode multiplies one column: n=1
            args[-1] += r".*\bn=1,"
        proc = sb.run([sb.path(bindir / "test-backend-ops"), "perf", "-b", "CUDA0", *args],
                      driver.limits(PERF_OP_TIMEOUT_S, gpu=True))
        if proc.timed_out:
            out.append(f"{op}: test-backend-ops perf ran past {PERF_OP_TIMEOUT_S:.0f} s; left out")
            continue
        rows = [l.strip() for l in proc.stdout.splitlines() if "us/run" in l]
        out.append(f"{op}: " + (f"{len(rows)} shapes" if rows else "no rows"))
        out += [f"  {r}" for r in rows[:8]]
    return "profile: CUDA0, NVML utilization and test-backend-ops perf (GPU time per op and shape)\n" + "\n".join(out)
