"""What the GPU reports while we time it: clocks, power, temperature, clock-event reasons.

Read-only NVML access lives here, shared by the fingerprint, the clock lock and CPU placement:
`open_nvml`, `device_handle`, `read` (one guarded call), `event_reasons` and `numa_node`. `GpuTelemetry.block` watches one
block of timed pairs; a block in which the GPU slowed itself down for heat or a hardware limit
is marked throttled and its pairs are dropped from the verdict (lab/stats.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..records import TelemetryBlock
from . import cpus

# Constants of nvml.h (ABI-stable), spelled here so that a fake NVML in tests needs none.
CLOCK_SM, CLOCK_MEM = 1, 2
TEMPERATURE_GPU = 0
ERROR_NOT_SUPPORTED = 3

# Bits of nvmlDeviceGetCurrentClocksEventReasons, in the order they are reported.
REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clock_setting",
}
# Reasons that make a block's timings unlike the others': heat or a hardware limit. The power cap
# is left out on purpose: compute-bound work sits on it all the time and both sides share it.
THROTTLING = frozenset({"sw_thermal", "hw_thermal", "hw_slowdown", "hw_power_brake"})

SAMPLE_INTERVAL_S = 0.05


def open_nvml(nvml: Any = None):
    """An initialised NVML module (or the given fake), or None when there is no NVML or driver."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return None
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    return nvml


def read(nvml, name: str, *args):
    """One NVML query; None when this NVML lacks it or the device does not support it."""
    fn = getattr(nvml, name, None)
    if fn is None:
        return None
    try:
        value = fn(*args)
    except nvml.NVMLError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def device_handle(nvml, index: int):
    """The NVML handle of CUDA device `index`, or None.

    NVML numbers every GPU of the host while CUDA numbers those in CUDA_VISIBLE_DEVICES, so a
    logical index is mapped through that list (indices or GPU UUIDs) first. The CUDA order is
    taken to be the PCI order, as on hosts of identical GPUs.
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            return read(nvml, "nvmlDeviceGetHandleByIndex", int(entry))
        return read(nvml, "nvmlDeviceGetHandleByUUID", entry)
    return read(nvml, "nvmlDeviceGetHandleByIndex", index)


def numa_node(nvml, handle) -> int | None:
    """The NUMA node of the GPU behind `handle`: its PCI bus id from NVML, looked up in sysfs;
    None where NVML or the OS does not say."""
    pci = read(nvml, "nvmlDeviceGetPciInfo", handle) if handle is not None else None
    bus = getattr(pci, "busId", None)
    if bus is None:
        return None
    return cpus.gpu_numa_node(bus.decode() if isinstance(bus, bytes) else str(bus))


def event_reasons(nvml, handle) -> int | None:
    """The clock-event reason bits; the older 'throttle reasons' call where the driver lacks the new one."""
    bits = read(nvml, "nvmlDeviceGetCurrentClocksEventReasons", handle)
    return bits if bits is not None else read(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", handle)


def reason_names(bits: int | None) -> list[str]:
    return [name for bit, name in REASON_BITS.items() if bits and bits & bit]


class GpuTelemetry:
    """Watches one GPU, block by block. Without NVML every block is empty and never throttled."""

    def __init__(self, index: int = 0, nvml=None, interval_s: float | None = SAMPLE_INTERVAL_S):
        self.index = index
        self.interval_s = interval_s
        self.nvml = open_nvml(nvml)
        self.handle = device_handle(self.nvml, index) if self.nvml is not None else None
        self.available = self.handle is not None

    def block(self, index: int) -> "BlockMonitor":
        """A context manager that samples at entry, every `interval_s` and at exit; `.result` after."""
        return BlockMonitor(self, index)

    def sample(self) -> dict:
        nvml, h = self.nvml, self.handle
        power_mw = read(nvml, "nvmlDeviceGetPowerUsage", h)
        return {
            "sm": read(nvml, "nvmlDeviceGetClockInfo", h, CLOCK_SM),
            "mem": read(nvml, "nvmlDeviceGetClockInfo", h, CLOCK_MEM),
            "power": None if power_mw is None else power_mw / 1000,
            "temperature": read(nvml, "nvmlDeviceGetTemperature", h, TEMPERATURE_GPU),
            "reasons": event_reasons(nvml, h),
        }


class BlockMonitor:
    """One block's samples, summarised into a TelemetryBlock on exit (also when the block raised)."""

    def __init__(self, telemetry: GpuTelemetry, index: int):
        self.telemetry = telemetry
        self.result = TelemetryBlock(index=index)
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "BlockMonitor":
        if self.telemetry.available:
            self._samples.append(self.telemetry.sample())
            if self.telemetry.interval_s:
                self._thread = threading.Thread(target=self._poll, name="gpu-telemetry", daemon=True)
                self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.telemetry.interval_s):
            self._samples.append(self.telemetry.sample())

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.telemetry.available:
            self._samples.append(self.telemetry.sample())
            self.result = summarise(self.result.index, self._samples)


def summarise(index: int, samples: list[dict]) -> TelemetryBlock:
    """Lowest clocks, mean power, highest temperature and every reason seen in the block."""
    def values(key):
        return [s[key] for s in samples if s[key] is not None]

    sm, mem, power, temperature = values("sm"), values("mem"), values("power"), values("temperature")
    bits = 0
    for b in values("reasons"):
        bits |= b
    reasons = reason_names(bits)
    return TelemetryBlock(
        index=index,
        sm_clock_mhz=min(sm) if sm else None,
        mem_clock_mhz=min(mem) if mem else None,
        power_w=sum(power) / len(power) if power else None,
        temperature_c=max(temperature) if temperature else None,
        reasons=reasons,
        throttled=bool(THROTTLING.intersection(reasons)),
    )

