"""Nsight Compute digest of one short generation (clocks as found: --clock-control none).
For the agent's eyes only; never feeds a verdict."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

DRIVER = """
import sys
from pathlib import Path
from lab.sdk import load
h = load(sys.argv[1])
from importlib import import_module
pkg = type(h).__module__.rsplit('.', 1)[0]
dev = import_module(pkg + '.device'); cuda = import_module(pkg + '.cuda')
weights = import_module(pkg + '.weights'); philox = import_module(pkg + '.philox'); oracle = import_module(pkg + '.oracle')
module = cuda.Module(Path(sys.argv[2]).read_bytes(), dev.ENTRY, dev.LAUNCH_SYMBOL)
launcher = dev.Launcher(module)
w = dev.DeviceWeights(weights.make_weights(oracle.PUBLIC_WEIGHT_SEED))
launcher.run(w, philox.gumbel(1, int(sys.argv[3]), 1), deadline_s=60)
"""

KEEP = ("Duration", "Registers Per Thread", "Theoretical Occupancy", "Achieved Occupancy",
        "Memory Throughput", "DRAM Throughput", "L2 Cache Throughput", "L1/TEX Cache Throughput",
        "Compute (SM) Throughput", "SM Frequency", "Dynamic Shared Memory Per Block",
        "Block Limit Registers", "Warp Cycles Per Issued Instruction", "Issue Slots Busy")


def ncu_digest(root: Path, cubin: Path, steps: int = 512) -> str:
    ncu = shutil.which("ncu")
    if not ncu:
        return "ncu (Nsight Compute) is not on PATH: no profile"
    cmd = [ncu, "--clock-control", "none", "--kernel-name", "wavegru_generate", "--launch-count", "1",
           "--section", "SpeedOfLight", "--section", "Occupancy", "--section", "LaunchStats",
           "--section", "MemoryWorkloadAnalysis", "--section", "WarpStateStats",
           "--metrics", "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio",
           "--csv", "--page", "details", sys.executable, "-c", DRIVER, str(root), str(cubin), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rows = [r for r in csv.reader(io.StringIO(proc.stdout)) if len(r) > 4]
    if proc.returncode != 0 or len(rows) < 2:
        return f"ncu failed (exit {proc.returncode}):\n" + (proc.stderr or proc.stdout)[-2000:]
    head = rows[0]
    name_i, unit_i, val_i = head.index("Metric Name"), head.index("Metric Unit"), head.index("Metric Value")
    lines, stalls = [f"ncu digest: one generation of {steps} steps, clocks as found"], []
    for r in rows[1:]:
        name, unit, value = r[name_i], r[unit_i], r[val_i]
        if name in KEEP:
            lines.append(f"  {name}: {value} {unit}".rstrip())
        elif name.startswith("smsp__average_warps_issue_stalled_"):
            try:
                stalls.append((float(value.replace(",", "")), name[len("smsp__average_warps_issue_stalled_"):
                                                                   -len("_per_issue_active.ratio")]))
            except ValueError:
                pass
    stalls.sort(reverse=True)
    if stalls:
        lines.append("  top stall reasons (warps per issued instruction): " +
                     ", ".join(f"{n} {v:.2f}" for v, n in stalls[:6]))
    return "\n".join(lines)
