"""`--clocks lock`: hold the GPU's SM clock below the power knee while timing, and always give it back.

Compute-bound work on the power cap let the SM clock wander from 1980 to 1140-1500 MHz and the
medians spread 6-11% across processes; a clock held below the knee takes that wander away. This
changes the machine, so it is allowed only as root on a machine the user owns, and the clocks
are reset on every way out: normal exit, exception, SIGINT, SIGTERM and interpreter exit.
The default, `--clocks monitor`, never touches clocks (lab/system/telemetry.py watches them).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from typing import Any

from ..errors import EnvironmentUnavailable, LabError
from .telemetry import CLOCK_SM, ERROR_NOT_SUPPORTED, device_handle, open_nvml, read

MONITOR, LOCK = "monitor", "lock"
KNEE_FRACTION = 0.8  # of the maximum SM clock: below where power-capped parts start to wander
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def parse_clocks_option(text: str) -> tuple[str, int | None]:
    """"monitor" -> ("monitor", None); "lock" -> ("lock", None); "lock=1500" -> ("lock", 1500)."""
    mode, sep, value = text.strip().partition("=")
    if mode == MONITOR and not sep:
        return MONITOR, None
    if mode == LOCK and not sep:
        return LOCK, None
    if mode == LOCK and value.isdigit() and int(value) > 0:
        return LOCK, int(value)
    raise LabError(f"--clocks takes 'monitor', 'lock' or 'lock=MHZ' (e.g. lock=1500), not {text!r}")


class ClockLock:
    """Context manager: lock the SM (and, where supported, memory) clock of GPU `index`."""

    def __init__(self, index: int = 0, sm_mhz: int | None = None, nvml=None, geteuid=os.geteuid):
        self.index = index
        self.requested_mhz = sm_mhz
        self._nvml_given = nvml
        self._geteuid = geteuid
        self.sm_mhz: int | None = None  # what was locked, for the record
        self.mem_mhz: int | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._locked = False
        self._previous_handlers: dict[int, Any] = {}

    # --- entering ---------------------------------------------------------------------------
    def __enter__(self) -> "ClockLock":
        if self._geteuid() != 0:
            raise EnvironmentUnavailable(
                "--clocks lock changes the GPU's clocks and needs root: run the lab as root on a "
                "machine you own, or use --clocks monitor (the default), which never touches them")
        nvml = open_nvml(self._nvml_given)
        if nvml is None:
            raise EnvironmentUnavailable(
                "--clocks lock needs NVML (the nvidia-ml-py package and an NVIDIA driver); "
                "install the [cuda] extra or use --clocks monitor")
        handle = device_handle(nvml, self.index)
        if handle is None:
            raise EnvironmentUnavailable(f"--clocks lock: NVML shows no GPU {self.index}")
        self._nvml, self._handle = nvml, handle
        self.mem_mhz, self.sm_mhz = self._choose_clocks()

        # Restorers first, so that a signal arriving while the clocks are being set still resets them.
        self._locked = True
        self._install_handlers()
        atexit.register(self.restore)
        try:
            nvml.nvmlDeviceSetGpuLockedClocks(handle, self.sm_mhz, self.sm_mhz)
        except nvml.NVMLError as exc:
            self.restore()
            raise EnvironmentUnavailable(f"--clocks lock: NVML refused to lock GPU {self.index} "
                                         f"at {self.sm_mhz} MHz ({exc}); use --clocks monitor") from None
        if self.mem_mhz is not None:
            try:
                nvml.nvmlDeviceSetMemoryLockedClocks(handle, self.mem_mhz, self.mem_mhz)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) != ERROR_NOT_SUPPORTED:  # HBM parts often say so
                    self.restore()
                    raise EnvironmentUnavailable(f"--clocks lock: NVML refused to lock the memory clock "
                                                 f"of GPU {self.index} ({exc})") from None
                self.mem_mhz = None
        return self

    def _choose_clocks(self) -> tuple[int | None, int]:
        """(memory MHz or None, SM MHz): the requested SM clock or the knee, snapped to a supported one."""
        nvml, h = self._nvml, self._handle
        memory = read(nvml, "nvmlDeviceGetSupportedMemoryClocks", h)
        mem_mhz = max(memory) if memory else None
        supported = sorted(read(nvml, "nvmlDeviceGetSupportedGraphicsClocks", h, mem_mhz) or []) \
            if mem_mhz is not None else []
        max_sm = max(supported) if supported else read(nvml, "nvmlDeviceGetMaxClockInfo", h, CLOCK_SM)
        if not max_sm:
            raise EnvironmentUnavailable(f"--clocks lock: NVML gives no clock range for GPU {self.index}")
        if self.requested_mhz is not None:
            low = supported[0] if supported else 1
            if not low <= self.requested_mhz <= max_sm:
                raise LabError(f"--clocks lock={self.requested_mhz}: GPU {self.index} runs its SM "
                               f"clock between {low} and {max_sm} MHz")
            target = self.requested_mhz
        else:
            target = int(KNEE_FRACTION * max_sm)
        if supported:  # NVML rounds an unsupported value itself; snapping keeps the record true
            below = [c for c in supported if c <= target]
            target = below[-1] if below else supported[0]
        return mem_mhz, target

    # --- leaving ----------------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Reset the clocks (once) and put back the signal handlers; never raises."""
        if not self._locked:
            return
        self._locked = False
        nvml, h = self._nvml, self._handle
        for name in ("nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks"):
            try:
                getattr(nvml, name)(h)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) != ERROR_NOT_SUPPORTED:
                    print(f"lab: {name} failed on GPU {self.index} ({exc}); reset it by hand with "
                          f"`nvidia-smi -i {self.index} -rgc -rmc` as root", file=sys.stderr)
        self._uninstall_handlers()
        atexit.unregister(self.restore)

    def _install_handlers(self) -> None:
        # Python delivers signals to the main thread only; elsewhere exit and atexit still restore.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED_SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            # None: a handler installed outside Python, which cannot be put back; the default is.
            self._previous_handlers[signum] = signal.SIG_DFL if previous is None else previous

    def _uninstall_handlers(self) -> None:
        while self._previous_handlers:
            signum, previous = self._previous_handlers.popitem()
            signal.signal(signum, previous)

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self.restore()  # also puts `previous` back
        if callable(previous):
            previous(signum, frame)  # SIGINT's default raises KeyboardInterrupt here
        elif previous != signal.SIG_IGN:  # SIG_DFL: die of the same signal, clocks restored
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
