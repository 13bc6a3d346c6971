"""Running the kernel once: fresh buffers at fresh addresses, sentinel-filled outputs, a zeroed
workspace, CUDA events around the launch and a host clock beside them, a watchdog deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from .cuda import Event, KernelError, Module, Params
from .model import MIN_P, TEMPERATURE, log_min_p
from .weights import NAMES, V, H

WORKSPACE_BYTES = 16 << 20  # WG_WORKSPACE_BYTES in wavegru.h
SENTINEL_TOKEN = -0x21524111  # 0xDEADBEEF as int32: outside [0, V)
SENTINEL_FLOAT_BITS = 0x7FBADBAD  # a NaN with a payload nobody computes
MODE_GENERATE, MODE_TEACHER = 0, 1
ENTRY, LAUNCH_SYMBOL = "wavegru_generate", "wavegru_launch"


@dataclass
class Outputs:
    tokens: np.ndarray  # int32 [T, B]
    p: np.ndarray  # float32 [T, B]
    h0: np.ndarray  # float32 [B, H]
    h1: np.ndarray  # float32 [B, H]
    seconds: float  # device time between the events around the launch
    wall_seconds: float  # host time from just before the launch to the completion seen


def _torch():
    from lab.extras import require

    return require("torch")


def fresh(torch, n: int, dtype, device="cuda"):
    """A buffer of n elements at a fresh address: a random 256-byte-aligned offset into a
    slightly larger allocation, so that nothing can key a cache on the pointer."""
    elem = torch.empty((), dtype=dtype).element_size()
    pad = random.randrange(0, 64) * (256 // elem)
    return torch.empty(n + pad, dtype=dtype, device=device)[pad:]


class DeviceWeights:
    def __init__(self, weights: dict):
        torch = _torch()
        self.t = {n: fresh(torch, weights[n].size, torch.float32).copy_(
            torch.from_numpy(np.ascontiguousarray(weights[n]).reshape(-1))) for n in NAMES}

    def ptr(self, name: str) -> int:
        return self.t[name].data_ptr()


class Launcher:
    """Owns the stream and the events; launches one loaded module."""

    def __init__(self, module: Module):
        torch = _torch()
        self.torch = torch
        self.module = module
        self.stream = torch.cuda.Stream()
        self.start, self.end = Event(), Event()

    def run(self, weights: DeviceWeights, noise, mode: int = MODE_GENERATE, teacher=None,
            deadline_s: float = 30.0, what: str = "kernel") -> Outputs:
        """noise: float32 [T, B, V] (numpy or a CUDA tensor); teacher: int [T, B] or None."""
        torch = self.torch
        T, B, Vn = noise.shape
        if Vn != V:
            raise ValueError(f"noise has V={Vn}")
        with torch.cuda.stream(self.stream):
            g = fresh(torch, T * B * V, torch.float32)
            g.copy_(torch.as_tensor(noise).reshape(-1), non_blocking=False)
            tch = None
            if teacher is not None:
                tch = fresh(torch, T * B, torch.int32)
                tch.copy_(torch.as_tensor(np.ascontiguousarray(teacher, dtype=np.int32)).reshape(-1))
            tokens = fresh(torch, T * B, torch.int32).fill_(SENTINEL_TOKEN)
            p = fresh(torch, T * B, torch.int32).fill_(SENTINEL_FLOAT_BITS)
            h0 = fresh(torch, B * H, torch.int32).fill_(SENTINEL_FLOAT_BITS)
            h1 = fresh(torch, B * H, torch.int32).fill_(SENTINEL_FLOAT_BITS)
            ws = fresh(torch, WORKSPACE_BYTES, torch.uint8).zero_()
        prm = Params()
        for n in NAMES:
            setattr(prm, n, weights.ptr(n))
        prm.noise, prm.teacher = g.data_ptr(), (tch.data_ptr() if tch is not None else None)
        prm.tokens, prm.p, prm.h0_out, prm.h1_out = tokens.data_ptr(), p.data_ptr(), h0.data_ptr(), h1.data_ptr()
        prm.workspace = ws.data_ptr()
        prm.T, prm.B, prm.mode = T, B, mode
        prm.temperature = TEMPERATURE
        prm.log_min_p = log_min_p(MIN_P, False)
        prm.reserved = 0
        s = self.stream.cuda_stream
        self.stream.synchronize()  # inputs in place; the GPU then runs only the kernel
        self.start.record(s)
        t0 = time.perf_counter()
        self.module.launch_async(prm, s)
        self.end.record(s)
        t1 = self.end.wait(deadline_s, what)
        seconds = self.end.elapsed_ms(self.start) / 1e3
        try:
            out = Outputs(tokens=tokens.cpu().numpy().reshape(T, B),
                          p=p.view(torch.float32).cpu().numpy().reshape(T, B),
                          h0=h0.view(torch.float32).cpu().numpy().reshape(B, H),
                          h1=h1.view(torch.float32).cpu().numpy().reshape(B, H),
                          seconds=seconds, wall_seconds=t1 - t0)
        except RuntimeError as exc:  # a sticky CUDA error surfaces at the copy
            raise KernelError(f"{what}: {exc}") from None
        return out

    def close(self):
        self.start.destroy()
        self.end.destroy()
