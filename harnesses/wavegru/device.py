"""Running the kernel once, the same way for the oracle and for timing: fresh buffers at fresh
addresses, each between guard regions checked after the launch, sentinel-filled outputs, a
zeroed workspace, inputs (weights, noise, teacher tokens) proven unchanged after the launch,
everything scrubbed once read, CUDA events around the launch and a host clock beside them, a
watchdog deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

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
    problems: list = field(default_factory=list)  # guards written, inputs changed


def _torch():
    from lab.sdk import require

    return require("torch")


GUARD_BYTES = 64 << 10  # before and after every buffer the kernel gets
ALIGN = 256


PLACEMENTS = 64  # 256-byte-aligned offsets an arena's first buffer may start at


class Arena:
    """Every buffer of one launch (or one weight set) in one fresh allocation, each between two
    guard regions filled with a word drawn for this arena. The first buffer starts at one of
    PLACEMENTS aligned offsets, `placement` or a random one, so that nothing can key a cache on
    an address. `guard_problems` names every guard a kernel wrote (a store past the end or
    before the start of a buffer)."""

    def __init__(self, torch, buffers: list[tuple[str, int, object]], device="cuda",
                 placement: int | None = None):
        self.torch = torch
        slot = random.randrange(0, PLACEMENTS) if placement is None else placement % PLACEMENTS
        offset = slot * ALIGN
        self.spans, self.guards = {}, []
        for name, n, dtype in buffers:
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            self.guards.append((offset, offset + GUARD_BYTES, name))
            offset += GUARD_BYTES
            self.spans[name] = (offset, nbytes, dtype, n)
            offset += -(-nbytes // ALIGN) * ALIGN
        self.guards.append((offset, offset + GUARD_BYTES, None))
        self.mem = torch.empty(offset + GUARD_BYTES, dtype=torch.uint8, device=device)
        self.word = random.getrandbits(32) - (1 << 31)
        for lo, hi, _ in self.guards:
            self.mem[lo:hi].view(torch.int32).fill_(self.word)

    def __getitem__(self, name: str):
        off, nbytes, dtype, n = self.spans[name]
        return self.mem[off:off + nbytes].view(dtype)

    def guard_problems(self) -> list[str]:
        torch = self.torch
        bad = torch.stack([(self.mem[lo:hi].view(torch.int32) != self.word).any() for lo, hi, _ in self.guards]).cpu()
        names = list(self.spans)
        out = []
        for i, flag in enumerate(bad.tolist()):
            if flag:
                after = names[i - 1] if i > 0 else None
                before = self.guards[i][2]
                where = " and ".join(x for x in (f"past the end of {after}" if after else "",
                                                 f"before the start of {before}" if before else "") if x)
                out.append(f"a write {where} (guard region overwritten)")
        return out

    def scrub(self) -> None:
        """Overwrite everything once the outputs are read: no later launch finds them."""
        self.mem.fill_(0xA5)


class DeviceWeights:
    """One weight set on the device between guards, with a pristine copy to prove after every
    launch that the kernel left its inputs alone (no state hidden in them across launches)."""

    def __init__(self, weights: dict):
        torch = _torch()
        self.arena = Arena(torch, [(n, weights[n].size, torch.float32) for n in NAMES])
        for n in NAMES:
            self.arena[n].copy_(torch.from_numpy(np.ascontiguousarray(weights[n], dtype=np.float32).reshape(-1)))
        self.pristine = self.arena.mem.clone()
        torch.cuda.synchronize()  # in place before any launch on the launcher's own stream

    def ptr(self, name: str) -> int:
        return self.arena[name].data_ptr()

    def problems(self) -> list[str]:
        out = [p + " of the weights" for p in self.arena.guard_problems()]
        if not self.arena.torch.equal(self.arena.mem, self.pristine):
            out.append("the weights were written (inputs are read-only)")
        return out


class Launcher:
    """Owns the stream and the events; launches one loaded module. Every launch, oracle or
    timed, goes through `run`: the same buffers, guards and checks."""

    def __init__(self, module: Module, stream=None):
        torch = _torch()
        self.torch = torch
        self.module = module
        # Launchers that share a stream share the allocator's blocks of that stream: launched
        # one after the other, they get their buffers at the same addresses.
        self.stream = stream if stream is not None else torch.cuda.Stream()
        self.start, self.end = Event(), Event()

    def run(self, weights: DeviceWeights, noise, mode: int = MODE_GENERATE, teacher=None,
            deadline_s: float = 30.0, what: str = "kernel", placement: int | None = None) -> Outputs:
        """noise: float32 [T, B, V] (numpy or a CUDA tensor); teacher: int [T, B] or None;
        placement: where the buffers start (Arena), random when None."""
        T, B, Vn = noise.shape
        if Vn != V:
            raise ValueError(f"noise has V={Vn}")
        staged = self._stage(noise, teacher, T, B, placement)
        prm = _params(weights, staged.arena, teacher is not None, T, B, mode)
        seconds, wall_seconds = self._launch(prm, deadline_s, what)
        return self._collect(staged, weights, seconds, wall_seconds, what)

    def _stage(self, noise, teacher, T: int, B: int, placement: int | None) -> "_Staged":
        """Fresh buffers between guards: the inputs copied in, the outputs sentinel-filled, the
        workspace zeroed (on the launcher's stream)."""
        torch = self.torch
        # A CUDA tensor given as input (the timed samples' noise) was made on the caller's stream,
        # maybe still in flight: this stream waits for it before reading it. Without the wait the
        # copy below raced the noise's own kernels (an H200 saw a pristine incumbent's sample
        # fail with "the noise was written", 2026-12-03), and those kernels could overlap the
        # timed launch, which synchronizes this stream only.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            src = torch.as_tensor(noise, device="cuda").reshape(-1)
            bufs = [("noise", T * B * V, torch.float32), ("teacher", T * B, torch.int32),
                    ("tokens", T * B, torch.int32), ("p", T * B, torch.int32), ("h0", B * H, torch.int32),
                    ("h1", B * H, torch.int32), ("workspace", WORKSPACE_BYTES, torch.uint8)]
            arena = Arena(torch, bufs, placement=placement)
            arena["noise"].copy_(src)
            tch_src = None
            if teacher is not None:
                tch_src = torch.as_tensor(np.ascontiguousarray(teacher, dtype=np.int32)).reshape(-1).cuda()
                arena["teacher"].copy_(tch_src)
            else:
                arena["teacher"].fill_(SENTINEL_TOKEN)
            for k in ("tokens",):
                arena[k].fill_(SENTINEL_TOKEN)
            for k in ("p", "h0", "h1"):
                arena[k].fill_(SENTINEL_FLOAT_BITS)
            arena["workspace"].zero_()
        return _Staged(arena, src, tch_src, T, B)

    def _launch(self, prm: Params, deadline_s: float, what: str) -> tuple[float, float]:
        """The kernel alone between the events, its inputs in place. Returns the device seconds
        and the host seconds from just before the launch to the completion seen."""
        s = self.stream.cuda_stream
        self.stream.synchronize()  # inputs in place; the GPU then runs only the kernel
        self.start.record(s)
        t0 = time.perf_counter()
        self.module.launch_async(prm, s)
        self.end.record(s)
        t1 = self.end.wait(deadline_s, what)
        seconds = self.end.elapsed_ms(self.start) / 1e3
        return seconds, t1 - t0

    def _collect(self, staged: "_Staged", weights: DeviceWeights, seconds: float, wall_seconds: float,
                 what: str) -> Outputs:
        """Every guard and input checked, the outputs copied to the host, the buffers scrubbed."""
        torch, arena, T, B = self.torch, staged.arena, staged.T, staged.B
        try:
            with torch.cuda.stream(self.stream):
                problems = arena.guard_problems() + weights.problems()
                if not torch.equal(arena["noise"], staged.noise):
                    problems.append("the noise was written (inputs are read-only)")
                if staged.teacher is not None and not torch.equal(arena["teacher"], staged.teacher):
                    problems.append("the teacher tokens were written (inputs are read-only)")
                out = Outputs(tokens=arena["tokens"].cpu().numpy().reshape(T, B),
                              p=arena["p"].view(torch.float32).cpu().numpy().reshape(T, B),
                              h0=arena["h0"].view(torch.float32).cpu().numpy().reshape(B, H),
                              h1=arena["h1"].view(torch.float32).cpu().numpy().reshape(B, H),
                              seconds=seconds, wall_seconds=wall_seconds, problems=problems)
                arena.scrub()
            self.stream.synchronize()
        except RuntimeError as exc:  # a sticky CUDA error surfaces at the copy
            raise KernelError(f"{what}: {exc}") from None
        return out

    @staticmethod
    def new_stream():
        return _torch().cuda.Stream()

    def close(self):
        self.start.destroy()
        self.end.destroy()


@dataclass
class _Staged:
    """One launch's buffers and the sources of its inputs (to prove them unchanged)."""

    arena: Arena
    noise: object  # the noise on the device, flat
    teacher: object  # the teacher tokens on the device, flat, or None
    T: int
    B: int


def _params(weights: DeviceWeights, arena: Arena, has_teacher: bool, T: int, B: int, mode: int) -> Params:
    """The kernel's arguments: every buffer's address, the shape, the mode and the sampling constants."""
    prm = Params()
    for n in NAMES:
        setattr(prm, n, weights.ptr(n))
    prm.noise = arena["noise"].data_ptr()
    prm.teacher = arena["teacher"].data_ptr() if has_teacher else None
    prm.tokens, prm.p = arena["tokens"].data_ptr(), arena["p"].data_ptr()
    prm.h0_out, prm.h1_out = arena["h0"].data_ptr(), arena["h1"].data_ptr()
    prm.workspace = arena["workspace"].data_ptr()
    prm.T, prm.B, prm.mode = T, B, mode
    prm.temperature = TEMPERATURE
    prm.log_min_p = log_min_p(MIN_P, False)
    prm.reserved = 0
    return prm
