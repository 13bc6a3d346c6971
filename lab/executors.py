"""Executors run one evaluation on a slot (lab/slots.py) and return its outcome and the worker.

`LocalExecutor` starts the runner on this host, on the slot's GPU and CPU set. `RayExecutor`
sends it as a Ray task asking for one GPU (or one `lab_slot` resource for a CPU harness) to a
cluster that sees the run folder and the harness at the same paths (a shared filesystem); a
worker that dies mid-evaluation is reported to the caller (`on_lost`, which records it as
`lost`) and the evaluation re-run. Executors write no events: the lab does.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import stats
from .envs import Env
from .errors import LabError
from .evaluate import Outcome, run_evaluation
from .harness import Harness
from .locks import try_lock
from .records import CRASH, Evaluation, Verdict
from .slots import Slot, check_gpus, gpu_nodes, plan_slots, sequential_slot

SLOT_RESOURCE = "lab_slot"  # the Ray resource a CPU harness's task asks for (one per worker slot)


@dataclass
class Request:
    """One evaluation for an executor: what run_evaluation needs, by path."""

    label: str
    mode: str  # evaluate | aa (run_evaluation's modes)
    candidate: Path
    work: Path
    incumbent: Path | None = None
    delta: float = stats.MIN_DELTA
    fingerprint_extra: dict = field(default_factory=dict)
    node: str | None = None  # Ray: the node to run on (a confirmation goes where the first timing ran)


@dataclass
class Result:
    outcome: Outcome
    worker: dict  # executor, host, pid, slot, gpu, cpus (and Ray's node)


class Executor(Protocol):
    name: str

    def evaluate(self, slot: Slot, req: Request, on_lost: Callable | None = None) -> Result:
        """Run `req` on `slot`; `on_lost(req, attempt, error)` for each worker that died under it."""
        ...


class LocalExecutor:
    """The runner as a child process of the lab, on the slot's GPU and CPU set."""

    name = "local"

    def __init__(self, harness: Harness, env: Env):
        self.harness, self.env = harness, env

    def evaluate(self, slot: Slot, req: Request, on_lost: Callable | None = None) -> Result:
        env, device = self.env, slot.gpu
        if slot.own_gpu:  # one env per call: the slot's GPU goes into the runner's environment
            env = copy.copy(self.env)
            env.extra_env = {**self.env.extra_env, "CUDA_VISIBLE_DEVICES": str(slot.gpu)}
            device = 0
        outcome = run_evaluation(self.harness, req.candidate, req.work, env=env, mode=req.mode,
                                 incumbent_tree=req.incumbent, delta=req.delta, gpu_index=device,
                                 cpus=slot.cpus, fingerprint_extra=req.fingerprint_extra)
        return Result(outcome, {"executor": "local", "host": socket.gethostname(), "pid": os.getpid(),
                                **slot.describe()})


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """A Ray address that does not answer: one clear line before anything starts."""
    if address in ("", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LabError(f"--address {address!r}: write HOST:PORT (the head's GCS port, 6379 by default)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise LabError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                       "`ray start --head` or give the head's address to --address") from None


class RayExecutor:
    """Each evaluation a Ray task asking for one GPU (a CPU harness: one `lab_slot`), run on a
    worker that sees the harness and the run folder at the same paths (a shared filesystem)."""

    name = "ray"

    def __init__(self, harness: Harness, env_name: str, address: str, max_lost: int = 3):
        self.harness, self.env_name, self.address, self.max_lost = harness, env_name, address, max_lost
        self._task: Any = None  # the remote function, once connected

    def preflight(self) -> int:
        """Connect; returns how many evaluations the cluster can run at once."""
        check_address(self.address)
        try:
            import ray
        except ImportError:
            raise LabError("--executor ray needs Ray: pip install -e '.[cluster]'") from None
        ray.init(address=self.address or "auto", ignore_reinit_error=True, log_to_driver=False,
                 logging_level=logging.ERROR, configure_logging=False)
        resources = ray.cluster_resources()
        key = "GPU" if self.harness.environment.needs_gpu else SLOT_RESOURCE
        have = int(resources.get(key, 0))
        if have < 1:
            hint = ("no GPU" if key == "GPU" else
                    f"no '{SLOT_RESOURCE}' resource: start its workers with "
                    f"--resources '{{\"{SLOT_RESOURCE}\": N}}' (N evaluations at a time)")
            raise LabError(f"the Ray cluster at {self.address} has {hint}; {self.harness.name} cannot run there")
        self._task = ray.remote(max_retries=0)(_ray_evaluate)  # retries are ours: each loss is recorded
        return have

    def _options(self, req: Request) -> dict:
        opts: dict[str, Any] = ({"num_gpus": 1, "num_cpus": 1} if self.harness.environment.needs_gpu
                                else {"num_cpus": 1, "resources": {SLOT_RESOURCE: 1}})
        if req.node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(req.node, soft=True)
        return opts

    def evaluate(self, slot: Slot, req: Request, on_lost: Callable | None = None) -> Result:
        import ray

        last = ""
        for attempt in range(self.max_lost + 1):
            work = req.work if attempt == 0 else req.work.with_name(f"{req.work.name}-r{attempt}")
            payload = {"candidate": str(req.candidate), "work": str(work), "mode": req.mode,
                       "incumbent": str(req.incumbent) if req.incumbent else None, "delta": req.delta,
                       "fingerprint_extra": req.fingerprint_extra, "slot": slot.index,
                       # the same path on every node: a shared folder, or a copy at that path
                       "model": str(self.harness.model_path) if self.harness.model_path else None}
            ref = self._task.options(**self._options(req)).remote(str(self.harness.root), self.env_name, payload)
            try:
                data = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, LabError):
                    raise cause from None
                last = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            except ray.exceptions.RayError as exc:  # WorkerCrashedError, NodeDiedError, ...
                last = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            else:
                outcome = Outcome(Evaluation.from_dict(data["evaluation"]), Verdict.from_dict(data["verdict"]),
                                  Path(data["record"]), data.get("stderr_tail", ""))
                return Result(outcome, {**data["worker"], "slot": slot.index, "attempt": attempt})
            if on_lost:
                on_lost(req, attempt, last)
        evaluation = Evaluation(harness=self.harness.name, status=CRASH,
                                reason=f"lost {self.max_lost + 1} times (workers died): {last}")
        record = req.work / "record.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(evaluation.to_json())
        return Result(Outcome(evaluation, Verdict(CRASH, evaluation.reason, delta=req.delta), record),
                      {"executor": "ray", "slot": slot.index, "lost": self.max_lost + 1})


def _worker_slot(count: int):
    """A slot of this node no other task holds (a file lock per slot): (index, open lock file)."""
    for k in range(max(1, count)):
        held = try_lock(Path(tempfile.gettempdir()) / f"lab-ray-slot-{k}.lock")
        if held is not None:
            return k, held
    return 0, None


def _ray_evaluate(harness_root: str, env_name: str, req: dict) -> dict:
    """The Ray task: one run_evaluation on this worker; returns the record and the verdict."""
    import ray

    from .envs import get
    from .harness import load

    ctx = ray.get_runtime_context()
    node = ctx.get_node_id()
    work = Path(req["work"])
    work.mkdir(parents=True, exist_ok=True)
    harness = load(harness_root, model=req.get("model"))
    gpu_ids = [int(g) for g in ray.get_gpu_ids()]
    here: dict = next((n for n in ray.nodes() if n.get("NodeID") == node), {})
    key = "GPU" if harness.environment.needs_gpu else SLOT_RESOURCE
    per_node = int(here.get("Resources", {}).get(key, 1))
    k, lock = _worker_slot(per_node)  # disjoint CPU sets for the tasks that share this node
    try:
        gpus = list(range(per_node))
        slot = plan_slots(gpus, gpu_nodes(harness, gpus))[k]
        worker = {"executor": "ray", "host": socket.gethostname(), "pid": os.getpid(), "node": node,
                  "gpu": gpu_ids[0] if gpu_ids else k, "cpus": slot.cpus}
        (work / "worker.json").write_text(json.dumps(worker))
        # Ray already set CUDA_VISIBLE_DEVICES to this task's GPU: the runner's device 0.
        outcome = run_evaluation(harness, Path(req["candidate"]), work, env=get(env_name, harness),
                                 mode=req["mode"], incumbent_tree=Path(req["incumbent"]) if req["incumbent"] else None,
                                 delta=req["delta"], gpu_index=0, cpus=slot.cpus,
                                 fingerprint_extra=req["fingerprint_extra"])
    finally:
        if lock:
            lock.close()
    return {"evaluation": outcome.evaluation.to_dict(), "verdict": outcome.verdict.to_dict(),
            "record": str(outcome.record_path), "stderr_tail": outcome.stderr_tail, "worker": worker}


def sequential(harness: Harness, env: Env, gpu_index: int = 0) -> tuple[Executor, list[Slot]]:
    """A sequential run's executor and slot: this host, device `gpu_index`, every CPU."""
    return LocalExecutor(harness, env), [sequential_slot(gpu_index)]


def make_executor(harness: Harness, env: Env, settings) -> tuple[Executor, list[Slot]]:
    """The executor and its slots for `settings` (lab/loop.py Settings), every bad input refused
    before the run starts: no --gpus and the local executor is the sequential run's one slot."""
    if settings.executor == "ray":
        executor = RayExecutor(harness, settings.env, settings.address, settings.max_lost)
        capacity = executor.preflight()
        count = len(settings.gpus) or capacity
        return executor, [Slot(i, g, None) for i, g in enumerate(settings.gpus or range(count))]
    if settings.executor != "local":
        raise LabError(f"unknown executor '{settings.executor}': choose local or ray")
    if not settings.gpus:
        return sequential(harness, env, settings.gpu_index)
    gpus = list(settings.gpus)
    check_gpus(harness, gpus)
    return LocalExecutor(harness, env), plan_slots(gpus, gpu_nodes(harness, gpus))

