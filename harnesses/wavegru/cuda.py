"""The CUDA driver API through ctypes (no dependency), and one loaded kernel module.

The harness owns everything here: it loads the cubin, reads the exported launch configuration,
checks it against the device, owns the stream and the events, and launches. Buffers come from
PyTorch's allocator (the same primary context), so the reference and the kernel share a device.
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass

from lab.sdk import CandidateAborted, EnvironmentUnavailable, LabError

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600
# CUfunction_attribute
FUNC_MAX_THREADS_PER_BLOCK = 0
FUNC_SHARED_SIZE_BYTES = 1
FUNC_LOCAL_SIZE_BYTES = 3
FUNC_NUM_REGS = 4
FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
# CUdevice_attribute
DEV_MAX_THREADS_PER_BLOCK = 1
DEV_MAX_REGISTERS_PER_BLOCK = 12
DEV_MULTIPROCESSOR_COUNT = 16
DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
DEV_COOPERATIVE_LAUNCH = 95
DEV_CC_MAJOR = 75
DEV_CC_MINOR = 76
DEV_MAX_REGISTERS_PER_MULTIPROCESSOR = 82
DEV_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81


class KernelError(CandidateAborted):
    """The kernel failed at run time (illegal address, launch failure): the context is lost."""

    status = "CRASH"


class KernelTimeout(CandidateAborted):
    """The kernel did not finish within its deadline; only ending the process frees the GPU."""

    status = "TIMEOUT"


class LaunchConfigError(LabError):
    """The exported launch configuration cannot run on this GPU."""


class Driver:
    _instance = None

    @classmethod
    def get(cls) -> "Driver":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @classmethod
    def probe(cls) -> "Driver":
        """The device's name and capability without a context: the lab's own process (preflight)
        must not hold a context on a GPU it is about to time on, nor show up as its user."""
        return cls(context=False)

    def __init__(self, context: bool = True):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise EnvironmentUnavailable(f"the CUDA driver (libcuda.so.1) is not loadable here: {exc}") from None
        self.call("cuInit", ctypes.c_uint(0))
        self.device = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(self.device), 0)
        self.context = ctypes.c_void_p()
        if context:
            self.call("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), self.device)
            self.make_current()

    def make_current(self):
        self.call("cuCtxSetCurrent", self.context)

    def error_text(self, code: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        self.lib.cuGetErrorName(code, ctypes.byref(name))
        self.lib.cuGetErrorString(code, ctypes.byref(text))
        return f"{(name.value or b'?').decode()} ({code}): {(text.value or b'').decode()}"

    def call(self, fn: str, *args, error=KernelError) -> int:
        code = getattr(self.lib, fn)(*args)
        if code != CUDA_SUCCESS:
            raise error(f"{fn} failed: {self.error_text(code)}")
        return code

    def attribute(self, attr: int) -> int:
        v = ctypes.c_int()
        self.call("cuDeviceGetAttribute", ctypes.byref(v), attr, self.device)
        return v.value

    def name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", buf, 256, self.device)
        return buf.value.decode()

    def capability(self) -> tuple[int, int]:
        return self.attribute(DEV_CC_MAJOR), self.attribute(DEV_CC_MINOR)


@dataclass
class LaunchConfig:
    grid: int
    block: int
    smem_bytes: int
    cooperative: bool

    @classmethod
    def from_bytes(cls, raw: bytes) -> "LaunchConfig":
        g, b, s, c = struct.unpack("<4I", raw[:16])
        return cls(g, b, s, bool(c))


class Params(ctypes.Structure):
    """Mirror of WavegruParams in wavegru.h (216 bytes)."""

    _fields_ = [(n, ctypes.c_void_p) for n in (
        "emb", "g0", "W_ih0", "W_hh0", "b_ih0", "b_hh0", "g1", "W_ih1", "W_hh1", "b_ih1", "b_hh1",
        "W_a", "W_b", "b_a", "b_b", "W_o", "b_o", "noise", "teacher", "tokens", "p", "h0_out",
        "h1_out", "workspace")] + [("T", ctypes.c_int), ("B", ctypes.c_int), ("mode", ctypes.c_int),
                                   ("temperature", ctypes.c_float), ("log_min_p", ctypes.c_float),
                                   ("reserved", ctypes.c_int)]


assert ctypes.sizeof(Params) == 216, ctypes.sizeof(Params)


class Module:
    """One loaded cubin: its entry point, its launch configuration checked against the device."""

    def __init__(self, cubin: bytes, entry: str, launch_symbol: str):
        self.drv = Driver.get()
        self.drv.make_current()
        self.handle = ctypes.c_void_p()
        self.drv.call("cuModuleLoadData", ctypes.byref(self.handle), ctypes.c_char_p(cubin), error=LaunchConfigError)
        self.func = ctypes.c_void_p()
        self.drv.call("cuModuleGetFunction", ctypes.byref(self.func), self.handle, entry.encode(),
                      error=LaunchConfigError)
        ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
        self.drv.call("cuModuleGetGlobal_v2", ctypes.byref(ptr), ctypes.byref(size), self.handle,
                      launch_symbol.encode(), error=LaunchConfigError)
        raw = ctypes.create_string_buffer(16)
        self.drv.call("cuMemcpyDtoH_v2", raw, ptr, ctypes.c_size_t(16), error=LaunchConfigError)
        self.launch = LaunchConfig.from_bytes(raw.raw)
        self.info = self._validate()

    def func_attr(self, attr: int) -> int:
        v = ctypes.c_int()
        self.drv.call("cuFuncGetAttribute", ctypes.byref(v), attr, self.func)
        return v.value

    def _validate(self) -> dict:
        lc, d = self.launch, self.drv
        regs = self.func_attr(FUNC_NUM_REGS)
        static_smem = self.func_attr(FUNC_SHARED_SIZE_BYTES)
        max_threads = self.func_attr(FUNC_MAX_THREADS_PER_BLOCK)
        sms = d.attribute(DEV_MULTIPROCESSOR_COUNT)
        smem_optin = d.attribute(DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        info = {"registers": regs, "static_smem": static_smem, "dynamic_smem": lc.smem_bytes,
                "grid": lc.grid, "block": lc.block, "cooperative": lc.cooperative, "sms": sms}
        if lc.grid < 1 or lc.block < 1:
            raise LaunchConfigError(f"launch configuration grid={lc.grid} block={lc.block} is empty")
        if lc.block > max_threads:
            raise LaunchConfigError(
                f"block of {lc.block} threads, but with {regs} registers per thread the kernel allows at most "
                f"{max_threads} threads per block ({d.attribute(DEV_MAX_REGISTERS_PER_BLOCK)} registers per block)")
        if static_smem + lc.smem_bytes > smem_optin:
            raise LaunchConfigError(
                f"shared memory {static_smem} static + {lc.smem_bytes} dynamic bytes exceeds the "
                f"{smem_optin} bytes a block may use on this GPU")
        if lc.smem_bytes > 48 * 1024:
            self.drv.call("cuFuncSetAttribute", self.func, FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                          lc.smem_bytes, error=LaunchConfigError)
        per_sm = ctypes.c_int()
        self.drv.call("cuOccupancyMaxActiveBlocksPerMultiprocessor", ctypes.byref(per_sm), self.func,
                      lc.block, ctypes.c_size_t(lc.smem_bytes), error=LaunchConfigError)
        info["blocks_per_sm"] = per_sm.value
        if per_sm.value < 1:
            raise LaunchConfigError(
                f"not one block fits on an SM: {lc.block} threads x {regs} registers, {static_smem + lc.smem_bytes} "
                f"bytes of shared memory (SM limits: {d.attribute(DEV_MAX_REGISTERS_PER_MULTIPROCESSOR)} registers, "
                f"{d.attribute(DEV_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)} bytes)")
        if lc.cooperative and lc.grid > per_sm.value * sms:
            raise LaunchConfigError(
                f"cooperative grid of {lc.grid} blocks is larger than the {per_sm.value} x {sms} = "
                f"{per_sm.value * sms} blocks this GPU can hold at once with this kernel's resources")
        return info

    def launch_async(self, params: Params, stream: int) -> None:
        lc = self.launch
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        if lc.cooperative:
            self.drv.call("cuLaunchCooperativeKernel", self.func, lc.grid, 1, 1, lc.block, 1, 1,
                          lc.smem_bytes, ctypes.c_void_p(stream), args)
        else:
            self.drv.call("cuLaunchKernel", self.func, lc.grid, 1, 1, lc.block, 1, 1,
                          lc.smem_bytes, ctypes.c_void_p(stream), args, None)

    def unload(self) -> None:
        if self.handle:
            self.drv.lib.cuModuleUnload(self.handle)
            self.handle = ctypes.c_void_p()


class Event:
    def __init__(self):
        self.drv = Driver.get()
        self.handle = ctypes.c_void_p()
        self.drv.call("cuEventCreate", ctypes.byref(self.handle), 0)

    def record(self, stream: int) -> None:
        self.drv.call("cuEventRecord", self.handle, ctypes.c_void_p(stream))

    def wait(self, deadline_s: float, what: str) -> float:
        """Poll until the event completes; raise KernelTimeout past the deadline. Returns the
        host time at completion (time.perf_counter)."""
        start = time.perf_counter()
        sleep = 0.0
        while True:
            code = self.drv.lib.cuEventQuery(self.handle)
            now = time.perf_counter()
            if code == CUDA_SUCCESS:
                return now
            if code != CUDA_ERROR_NOT_READY:
                raise KernelError(f"{what}: {self.drv.error_text(code)}")
            if now - start > deadline_s:
                raise KernelTimeout(f"{what} did not finish within {deadline_s:.0f} s (a hang, or far too slow)")
            time.sleep(sleep)
            sleep = min(1e-3, sleep + 5e-5)

    def elapsed_ms(self, start: "Event") -> float:
        ms = ctypes.c_float()
        self.drv.call("cuEventElapsedTime", ctypes.byref(ms), start.handle, self.handle)
        return ms.value

    def destroy(self) -> None:
        if self.handle:
            self.drv.lib.cuEventDestroy_v2(self.handle)
            self.handle = ctypes.c_void_p()


def elf_symbol(cubin: bytes, name: str) -> bytes | None:
    """The initial bytes of a data symbol in an ELF64 cubin (read at build time, no GPU)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        return None
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sec[6]]
        for off in range(sec[4], sec[4] + sec[5], 24):
            st_name, st_info, st_other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", cubin, off)
            start = strtab[4] + st_name
            sym = cubin[start:cubin.index(b"\0", start)].decode(errors="replace")
            if sym == name and 0 < st_shndx < shnum:
                target = sections[st_shndx]
                if target[1] == 8:  # SHT_NOBITS: zero-initialised
                    return bytes(st_size)
                return cubin[target[4] + st_value: target[4] + st_value + st_size]
    return None
