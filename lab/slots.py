"""Evaluation slots: one GPU (a "virtual GPU" for a CPU harness: an index with no CUDA behind it)
and its own CPU set on that GPU's NUMA node, for one runner at a time.

A sequential run has one slot, the runner placed as `--gpu-index` says; `lab run --gpus 0,1`
plans one slot per GPU with disjoint CPU sets (plan_slots), after refusing a GPU that does not
exist or that another process uses (check_gpus). The scheduler (lab/loop.py) hands each slot one
evaluation at a time; an executor (lab/executors.py) runs it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError
from .harness import Harness
from .system import cpus as cpu_topology


@dataclass
class Slot:
    index: int
    gpu: int  # own_gpu: the NVML (physical) index, the runner's CUDA device 0; else its CUDA index
    cpus: list[int] | None = None  # the runner's CPU set (None: the executor's choice)
    # True: the runner sees only this GPU (CUDA_VISIBLE_DEVICES). False (a sequential run): it sees
    # the GPUs the lab sees and uses `gpu` as its device index, as `--gpu-index` says.
    own_gpu: bool = True

    def describe(self) -> dict:
        return {"slot": self.index, "gpu": self.gpu, "cpus": self.cpus}


def sequential_slot(gpu_index: int = 0) -> Slot:
    """The one slot of a sequential run: device `gpu_index`, every CPU the lab has."""
    return Slot(0, gpu_index, None, own_gpu=False)


def parse_gpus(text: str) -> list[int]:
    """'0,1' -> [0, 1]; a clear message for anything else."""
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LabError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. --gpus 0,1") from None
    if not gpus or any(g < 0 for g in gpus):
        raise LabError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. --gpus 0,1")
    if len(set(gpus)) != len(gpus):
        raise LabError(f"--gpus {text!r} names a GPU twice; each GPU is one slot")
    return gpus


def check_gpus(harness: Harness, gpus: list[int], nvml=None) -> None:
    """Refuse, before the run starts, a GPU that does not exist or that another process uses.
    A CPU harness takes any indices (virtual GPUs: the slots are the mechanism, not CUDA)."""
    if not harness.environment.needs_gpu:
        return
    from .system.telemetry import open_nvml, read

    nvml = open_nvml(nvml)
    if nvml is None:
        raise LabError("cannot count the GPUs: NVML does not answer (no NVIDIA driver, or "
                       "nvidia-ml-py is missing: pip install -e '.[cuda]')")
    try:
        count = read(nvml, "nvmlDeviceGetCount") or 0
        for g in gpus:
            if g >= count:
                have = f"GPUs 0-{count - 1}" if count else "no GPU"
                raise LabError(f"GPU {g} does not exist: this machine has {have} (nvidia-smi -L)")
            handle = read(nvml, "nvmlDeviceGetHandleByIndex", g)
            procs = (read(nvml, "nvmlDeviceGetComputeRunningProcesses", handle) or []) if handle else []
            procs = [p for p in procs if getattr(p, "pid", p) != os.getpid()]  # the lab's own probe
            if procs:
                pids = ", ".join(str(getattr(p, "pid", p)) for p in procs)
                raise LabError(f"GPU {g} is busy: process {pids} runs on it; stop it or leave GPU {g} "
                               "out of --gpus (a shared GPU makes every timing on it noise)")
    finally:
        read(nvml, "nvmlShutdown")


def gpu_nodes(harness: Harness, gpus: list[int], nvml=None) -> dict[int, int | None]:
    """The NUMA node of each GPU (None for a CPU harness or where the OS does not say)."""
    nodes: dict[int, int | None] = {g: None for g in gpus}
    if not harness.environment.needs_gpu:
        return nodes
    from .system.telemetry import numa_node, open_nvml, read

    nvml = open_nvml(nvml)
    if nvml is None:
        return nodes
    try:
        for g in gpus:
            nodes[g] = numa_node(nvml, read(nvml, "nvmlDeviceGetHandleByIndex", g))
    finally:
        read(nvml, "nvmlShutdown")
    return nodes


def plan_slots(gpus: list[int], nodes: dict[int, int | None] | None = None,
               allowed: list[int] | None = None, root: Path = cpu_topology.ROOT) -> list[Slot]:
    """One slot per GPU with disjoint CPU sets, each on its GPU's NUMA node where it can be.

    The lowest core stays with the lab, the agent and its compiles when there are more cores
    than slots; each runner builds on its own set and pins its timing to the set's top core
    (lab/runner.py), so no slot's compile shares a core with another slot's timing."""
    allowed = sorted(cpu_topology.allowed_cpus() if allowed is None else allowed)
    nodes = nodes or {}
    pool = allowed[1:] if len(allowed) > len(gpus) else list(allowed)
    share = max(1, len(pool) // max(1, len(gpus)))
    slots = []
    for i, g in enumerate(gpus):
        node = nodes.get(g)
        on_node = set(cpu_topology.node_cpus(node, root)) if node is not None else set()
        ranked = sorted(pool, key=lambda c: (c in on_node, c), reverse=True)
        chosen = sorted(ranked[:share])
        pool = [c for c in pool if c not in chosen]
        slots.append(Slot(i, g, chosen or None))
    return slots
