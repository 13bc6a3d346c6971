"""Which CPU cores time, and which compile: NUMA placement, pinning, and what the OS shows.

Host contention made host-bound timings 1.5-3x slower at the median; pinning the runner to a
free core on the GPU's NUMA node brought them back within 3-5%. The timing cores are taken from
the top of the allowed set so that the lab, the agent and the compilers, which the kernel tends
to place on low cores, keep to the rest (`rest_cpus`). Every function reads sysfs and procfs
below `root`, so that tests can hand it a fake tree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path("/")
CPU_DIR = "sys/devices/system/cpu"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_cpulist(text: str) -> list[int]:
    """The kernel's list format: "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            cpus.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"not a CPU list: {text!r}") from None
    return sorted(cpus)


def allowed_cpus() -> list[int]:
    """The cores this process may run on (a container's cpuset shows here too)."""
    return sorted(os.sched_getaffinity(0))


def gpu_numa_node(pci_bus_id: str, root: Path = ROOT) -> int | None:
    """The NUMA node of a PCI device, from NVML's bus id ("00000000:3B:00.0"); None if unknown."""
    *domain, bus, device = pci_bus_id.strip().lower().split(":")
    address = f"{int(domain[0] if domain else '0', 16):04x}:{bus}:{device}"  # sysfs: 4-digit domain
    node = _read(root / "sys/bus/pci/devices" / address / "numa_node")
    return int(node) if node not in (None, "-1") else None


def node_cpus(node: int, root: Path = ROOT) -> list[int]:
    text = _read(root / f"sys/devices/system/node/node{node}/cpulist")
    return parse_cpulist(text) if text else []


def isolated_cpus(root: Path = ROOT) -> list[int]:
    """Cores kept from the scheduler with isolcpus= (none on most machines)."""
    return parse_cpulist(_read(root / CPU_DIR / "isolated") or "")


def governor(cpu: int, root: Path = ROOT) -> str | None:
    return _read(root / CPU_DIR / f"cpu{cpu}/cpufreq/scaling_governor")


def turbo(root: Path = ROOT) -> bool | None:
    """Whether the CPU may boost above its base clock; None where the OS does not say."""
    no_turbo = _read(root / CPU_DIR / "intel_pstate/no_turbo")
    if no_turbo is not None:
        return no_turbo == "0"
    boost = _read(root / CPU_DIR / "cpufreq/boost")
    return None if boost is None else boost == "1"


def smt_siblings(cpu: int, root: Path = ROOT) -> list[int]:
    """The hardware threads sharing `cpu`'s core, itself included."""
    text = _read(root / CPU_DIR / f"cpu{cpu}/topology/thread_siblings_list")
    return parse_cpulist(text) if text else [cpu]


def choose_timing_cpus(count: int = 1, node: int | None = None, avoid: Iterable[int] = (),
                       root: Path = ROOT, allowed: Iterable[int] | None = None) -> list[int]:
    """`count` cores to time on, never every allowed core when there is more than one.

    Preference: isolated cores, then cores on `node` (the GPU's), then the highest numbers.
    """
    allowed = sorted(allowed_cpus() if allowed is None else allowed)
    if len(allowed) > 1:
        count = min(count, len(allowed) - 1)
    avoid = set(avoid)
    candidates = [c for c in allowed if c not in avoid] or allowed
    isolated = set(isolated_cpus(root))
    on_node = set(node_cpus(node, root)) if node is not None else set()
    ranked = sorted(candidates, key=lambda c: (c in isolated, c in on_node, c), reverse=True)
    return sorted(ranked[:count])


def rest_cpus(timing: Iterable[int], root: Path = ROOT, allowed: Iterable[int] | None = None) -> list[int]:
    """The cores for compilers and the agent: the allowed set minus the timing cores and their
    hyperthread siblings (which share the timing core's execution units), whichever is not empty."""
    allowed = sorted(allowed_cpus() if allowed is None else allowed)
    timing = set(timing)
    siblings = {s for c in timing for s in smt_siblings(c, root)}
    for taken in (timing | siblings, timing):
        rest = [c for c in allowed if c not in taken]
        if rest:
            return rest
    return allowed


def pin(cpus: Iterable[int]) -> None:
    """Run this process (and the threads and children it starts later) on `cpus` only."""
    os.sched_setaffinity(0, set(cpus))


def cpu_state(cpus: Iterable[int] | None = None, root: Path = ROOT) -> dict:
    """What the OS shows about the timing cores: governor per core, turbo, isolated cores."""
    cpus = allowed_cpus() if cpus is None else sorted(cpus)
    return {
        "governor": {str(c): governor(c, root) for c in cpus},
        "turbo": turbo(root),
        "isolated": isolated_cpus(root),
    }


def _cpu_times(root: Path) -> dict[int, tuple[int, int]]:
    """Per core (busy, total) jiffies from /proc/stat."""
    times = {}
    for line in (_read(root / "proc/stat") or "").splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            # user nice system idle iowait irq softirq steal; guest time is already in user.
            ticks = [int(f) for f in fields[:8]]
            total = sum(ticks)
            times[int(name[3:])] = (total - ticks[3] - ticks[4], total)
    return times


def busy_cpus(cpus: Iterable[int], interval: float = 0.2, threshold: float = 0.5, root: Path = ROOT,
              sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """The cores of `cpus` busier than `threshold` (a fraction) over `interval` seconds."""
    before = _cpu_times(root)
    sleep(interval)
    after = _cpu_times(root)
    busy = []
    for c in sorted(cpus):
        if c in before and c in after:
            d_busy = after[c][0] - before[c][0]
            d_total = after[c][1] - before[c][1]
            if d_total > 0 and d_busy / d_total > threshold:
                busy.append(c)
    return busy
