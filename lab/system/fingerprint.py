"""The machine a result came from: GPU, CPU and OS, software, plus what the lab adds.

Stored with every result; results from different fingerprints are never compared. `collect`
only reads (every NVML query guarded: a field the device or driver does not give is None), and
`differences` names the fields that would make two results incomparable, leaving out the
VOLATILE ones that change from minute to minute or from one evaluation to the next.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from . import cpus
from .telemetry import CLOCK_MEM, CLOCK_SM, TEMPERATURE_GPU, device_handle, event_reasons, open_nvml, read, reason_names

SOFTWARE = ("torch", "triton", "numpy", "nvidia-ml-py")

VOLATILE = frozenset({
    # the state of the moment, not of the machine
    "gpu.clocks.sm_mhz",
    "gpu.clocks.mem_mhz",
    "gpu.temperature_c",
    "gpu.clock_event_reasons",
    "cpu.affinity",
    # what the lab adds per evaluation (lab/evaluate.py, lab/loop.py): which sources, which run,
    # which of the run's slots (a reproduction runs on none)
    "candidate_source",
    "incumbent_source",
    "run",
    "slot",
})


def collect(extra: dict | None = None, gpu_index: int | None = 0, *, nvml=None, root: Path = cpus.ROOT,
            software: tuple[str, ...] = ()) -> dict:
    """Everything the protocol records about the machine; `extra` (hashes, image digest) merged in;
    `software`: the harness's own packages (Harness.software), recorded beside the lab's."""
    return {
        "gpu": _gpu(gpu_index, nvml) if gpu_index is not None else None,
        "cpu": _cpu(root),
        "os": {"kernel": platform.release(), "memory_bytes": _memory_bytes(root)},
        "software": {"python": platform.python_version(), "nvcc": nvcc_version(),
                     **{name: _version(name) for name in (*SOFTWARE, *software)}},
        **(extra or {}),
    }


def _gpu(index: int, nvml) -> dict | None:
    nvml = open_nvml(nvml)
    if nvml is None:
        return None
    try:
        h = device_handle(nvml, index)
        if h is None:
            return None
        return _gpu_fields(nvml, h)
    finally:
        read(nvml, "nvmlShutdown")


def _gpu_fields(nvml, h) -> dict:
    pci = read(nvml, "nvmlDeviceGetPciInfo", h)
    memory = read(nvml, "nvmlDeviceGetMemoryInfo", h)
    power_mw = read(nvml, "nvmlDeviceGetEnforcedPowerLimit", h)
    cuda = read(nvml, "nvmlSystemGetCudaDriverVersion")
    capability = read(nvml, "nvmlDeviceGetCudaComputeCapability", h)
    reasons = event_reasons(nvml, h)
    return {
        "name": read(nvml, "nvmlDeviceGetName", h),
        "uuid": read(nvml, "nvmlDeviceGetUUID", h),
        "pci_bus_id": _text(pci.busId) if pci is not None else None,
        "driver": read(nvml, "nvmlSystemGetDriverVersion"),
        "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
        "vbios": read(nvml, "nvmlDeviceGetVbiosVersion", h),
        "compute_capability": ".".join(map(str, capability)) if capability else None,
        "sm_count": None,  # not in NVML for a whole GPU; a harness adds it through `extra`
        "l2_bytes": None,  # not in NVML either
        "memory_bytes": memory.total if memory is not None else None,
        "power_limit_w": power_mw / 1000 if power_mw is not None else None,
        "persistence": read(nvml, "nvmlDeviceGetPersistenceMode", h),
        "mig": _current(read(nvml, "nvmlDeviceGetMigMode", h)),
        "ecc": _current(read(nvml, "nvmlDeviceGetEccMode", h)),
        "clocks": {
            "sm_mhz": read(nvml, "nvmlDeviceGetClockInfo", h, CLOCK_SM),
            "mem_mhz": read(nvml, "nvmlDeviceGetClockInfo", h, CLOCK_MEM),
            "max_sm_mhz": read(nvml, "nvmlDeviceGetMaxClockInfo", h, CLOCK_SM),
            "max_mem_mhz": read(nvml, "nvmlDeviceGetMaxClockInfo", h, CLOCK_MEM),
            # Applications clocks are a setting; NVML cannot read back locked clocks, which the
            # lab records itself when it locks them (lab/system/clocks.py).
            "applications_sm_mhz": read(nvml, "nvmlDeviceGetApplicationsClock", h, CLOCK_SM),
            "applications_mem_mhz": read(nvml, "nvmlDeviceGetApplicationsClock", h, CLOCK_MEM),
        },
        "temperature_c": read(nvml, "nvmlDeviceGetTemperature", h, TEMPERATURE_GPU),
        "clock_event_reasons": reason_names(reasons) if reasons is not None else None,
    }


def _current(mode_pair):
    """NVML gives (current, pending) for MIG and ECC; the current one is what ran."""
    return mode_pair[0] if mode_pair is not None else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu(root: Path) -> dict:
    return {
        "model": _cpu_model(root),
        "logical_cores": os.cpu_count(),
        "affinity": cpus.allowed_cpus(),
        "isolated": cpus.isolated_cpus(root),
        "governor": sorted({g for c in cpus.allowed_cpus() if (g := cpus.governor(c, root))}) or None,
        "turbo": cpus.turbo(root),
    }


def _cpu_model(root: Path) -> str:
    try:
        text = (root / "proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    # Arm kernels print no model name; the machine type is the best the OS gives without lscpu.
    return match.group(1).strip() if match else platform.machine()


def _memory_bytes(root: Path) -> int | None:
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _version(distribution: str) -> str | None:
    """The installed version, read from package metadata: nothing heavy gets imported."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def nvcc_version() -> str | None:
    """`nvcc --version`'s release ("12.4.131"), or None without a CUDA toolkit."""
    nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else (out.strip().splitlines() or [None])[-1]


# --- comparing two fingerprints -------------------------------------------------------------
def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _volatile(name: str) -> bool:
    return any(name == v or name.startswith(v + ".") for v in VOLATILE)


def differences(a: dict, b: dict) -> list[str]:
    """The dotted names of comparable fields that differ (a field missing on one side differs)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    return sorted(name for name in set(flat_a) | set(flat_b)
                  if not _volatile(name) and (name not in flat_a or name not in flat_b
                                              or flat_a[name] != flat_b[name]))


def comparable(a: dict, b: dict) -> bool:
    return not differences(a, b)
