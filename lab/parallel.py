"""Parallel experiments: one evaluation slot per GPU, several proposals in flight, Ray beyond a host.

A slot is one GPU (a "virtual GPU" for a CPU harness: an index with no CUDA behind it) and its
own CPU set on that GPU's NUMA node. A dispatcher thread per slot asks the agent for a proposal
(agent calls are serialised), applies it in the slot's own git worktree onto the incumbent of
the moment, and evaluates it on the slot: incumbent and candidate timed in one runner process on
one GPU, as in the sequential loop. Only under the run's lock does anything reach the run's
branch: a KEEP measured against the current incumbent (and confirmed in a fresh process on the
same slot) is applied to the main worktree and committed; a KEEP measured against an older
incumbent (another keep landed meanwhile) is re-applied onto the new incumbent and timed again,
or rejected as "stale" when it no longer applies. Every step is an event with the slot, the GPU
and the worker's fingerprint, so the run folder stays the single source of truth and resumes.

Executors run one evaluation on a slot: `LocalExecutor` starts the runner on this host;
`RayExecutor` sends it as a Ray task asking for one GPU (or one `lab_slot` resource for a CPU
harness) to a cluster that sees the run folder and the harness at the same paths (a shared
filesystem). A worker that dies mid-evaluation is recorded as `lost` and the evaluation re-run.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stats
from .agents import Agent, AgentFatal, Proposal
from .envs import Env
from .errors import LabError, PatchRejected
from .evaluate import Outcome, run_evaluation
from .harness import Harness, stage_editable
from .locks import try_lock
from .loop import Interrupts, Lab, RunState
from .records import CRASH, KEEP, Evaluation, Verdict
from .system import cpus as cpu_topology
from .system.fingerprint import differences
from .workspace import Workspace, git

SLOT_RESOURCE = "lab_slot"  # the Ray resource a CPU harness's task asks for (one per worker slot)


# --- slots -----------------------------------------------------------------------------------------
@dataclass
class Slot:
    index: int
    gpu: int  # the NVML (physical) index; the runner sees it as CUDA device 0
    cpus: list[int] | None = None  # the runner's CPU set (None: the executor's choice)

    def describe(self) -> dict:
        return {"slot": self.index, "gpu": self.gpu, "cpus": self.cpus}


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


# --- executors -------------------------------------------------------------------------------------
@dataclass
class Request:
    """One evaluation for an executor: what run_evaluation needs, by path."""

    label: str
    mode: str  # evaluate | aa
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


class LocalExecutor:
    """The runner as a child process of the lab, on the slot's GPU and CPU set."""

    name = "local"

    def __init__(self, harness: Harness, env: Env):
        self.harness, self.env = harness, env

    def preflight(self) -> None:
        pass

    def evaluate(self, slot: Slot, req: Request, on_lost=None) -> Result:
        env = copy.copy(self.env)  # one per call: the slot's GPU goes into the runner's environment
        env.extra_env = {**self.env.extra_env, "CUDA_VISIBLE_DEVICES": str(slot.gpu)}
        outcome = run_evaluation(self.harness, req.candidate, req.work, env=env, mode=req.mode,
                                 incumbent_tree=req.incumbent, delta=req.delta, gpu_index=0,
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
        self._task: Any = None

    def preflight(self) -> int:
        """Connect; returns how many evaluations the cluster can run at once."""
        check_address(self.address)
        try:
            import ray
        except ImportError:
            raise LabError("--executor ray needs Ray: pip install -e '.[cluster]'") from None
        ray.init(address=self.address or "auto", ignore_reinit_error=True, log_to_driver=False,
                 logging_level="ERROR", configure_logging=False)
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
        opts = ({"num_gpus": 1, "num_cpus": 1} if self.harness.environment.needs_gpu
                else {"num_cpus": 1, "resources": {SLOT_RESOURCE: 1}})
        if req.node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(req.node, soft=True)
        return opts

    def evaluate(self, slot: Slot, req: Request, on_lost=None) -> Result:
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
        f = try_lock(Path(tempfile.gettempdir()) / f"lab-ray-slot-{k}.lock")
        if f is not None:
            return k, f
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


def make_executor(harness: Harness, env: Env, settings) -> tuple[object, list[Slot]]:
    """The executor and its slots for `settings`, every bad input refused before the run starts."""
    if settings.executor == "ray":
        executor = RayExecutor(harness, settings.env, settings.address, settings.max_lost)
        capacity = executor.preflight()
        count = len(settings.gpus) or capacity
        return executor, [Slot(i, g, None) for i, g in enumerate(settings.gpus or range(count))]
    if settings.executor != "local":
        raise LabError(f"unknown executor '{settings.executor}': choose local or ray")
    gpus = list(settings.gpus or [settings.gpu_index])
    check_gpus(harness, gpus)
    return LocalExecutor(harness, env), plan_slots(gpus, gpu_nodes(harness, gpus))


# --- the parallel loop -------------------------------------------------------------------------------
class ParallelLab(Lab):
    """The loop of lab/loop.py with one dispatcher thread per slot; the same events and folder."""

    def attach(self, executor, slots: list[Slot]) -> "ParallelLab":
        self.executor, self.slots = executor, slots
        self.lock = threading.RLock()  # the main worktree, the incumbent stage, the views
        self.agent_lock = threading.Lock()  # agents are not assumed thread-safe
        self._local = threading.local()
        self._queue: list[tuple[Proposal, int, dict]] = []
        self._canaries_claimed: set[int] = set()  # canaries a slot has taken on (one per due point)
        self._stop = ""
        self._errors: list[BaseException] = []
        render = self.folder.render  # results.tsv and log.md are rewritten by one thread at a time

        def locked_render() -> None:
            with self.lock:
                render()

        self.folder.render = locked_render  # type: ignore[method-assign]
        return self

    # --- evaluation on a slot ------------------------------------------------------------------
    def _slot(self) -> Slot:
        return getattr(self._local, "slot", None) or self.slots[0]

    def _slot_dir(self, slot: Slot) -> Path:
        return self.folder.path / "slots" / f"slot-{slot.index}"

    def _slot_workspace(self, slot: Slot) -> Workspace:
        path = self._slot_dir(slot) / "worktree"
        if not (path / ".git").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            git(self.folder.worktree, "worktree", "add", "-q", "--detach", str(path.resolve()), "HEAD")
        return Workspace(path, self.workspace.prefix, self.harness)

    def _snapshot_incumbent(self, slot: Slot, name: str) -> Path:
        """The incumbent's editable files as of now, for one evaluation on `slot` (under the lock)."""
        with self.lock:
            return self._stage(self.incumbent_dir, self._slot_dir(slot) / name)

    def _stage(self, tree: Path, dest: Path) -> Path:
        import shutil

        if dest.exists():
            shutil.rmtree(dest)
        stage_editable(self.harness, tree, dest)
        return dest

    def _run(self, slot: Slot, label: str, mode: str, candidate: Path, incumbent: Path | None,
             delta: float, node: str | None = None) -> Result:
        import shutil

        work = self.folder.path / "evaluations" / label
        if work.exists():
            shutil.rmtree(work)
        req = Request(label, mode, candidate, work, incumbent, delta,
                      {"run": self.folder.meta["id"], "slot": slot.index}, node)

        def lost(r: Request, attempt: int, error: str) -> None:
            self.folder.append("lost", label=r.label, attempt=attempt, slot=slot.index, gpu=slot.gpu,
                               error=error, text=f"{r.label}: the worker died ({error}); re-running it")

        return self.executor.evaluate(slot, req, on_lost=lost)

    def _evaluate(self, number: str, mode: str, delta: float) -> Outcome:
        """The A/A evaluations of Lab (baseline, canary) on the calling thread's slot."""
        slot = self._slot()
        tree = self._snapshot_incumbent(slot, "aa")
        return self._run(slot, str(number), mode, tree, None, delta).outcome

    # --- one experiment on a slot ----------------------------------------------------------------
    def experiment_on(self, slot: Slot, proposal: Proposal, number: int, replay: dict | None = None) -> dict:
        ws = self._slot_workspace(slot)
        message = f"lab #{number}: {proposal.hypothesis}".strip()
        start = time.monotonic()
        own = {replay["evaluating"]["source_hash"]} if replay and replay.get("evaluating") else set()
        label, attempt = f"{number:04d}", 0
        with self.lock:
            state = self.state()
            staged = self._apply_on_slot(slot, ws, proposal, number, message, state, own, reason=None)
        if staged is None:
            return {}
        base, commit, source_hash, incumbent = staged
        while True:
            result = self._run(slot, label, "evaluate", ws.tree, incumbent, state.delta)
            outcome, verdict, confirmation = result.outcome, result.outcome.verdict, None
            if verdict.status == KEEP and self.settings.confirm:
                self.say(f"#{number}: KEEP on slot {slot.index}; confirming in a fresh process")
                confirmation = self._run(slot, f"{label}-confirm", "evaluate", ws.tree, incumbent, state.delta,
                                         node=result.worker.get("node")).outcome
                differ = differences(outcome.evaluation.fingerprint, confirmation.evaluation.fingerprint)
                verdict = stats.confirm(verdict, confirmation.verdict,
                                        f"the confirming run ran on another machine ({', '.join(differ[:3])})"
                                        if differ else "")
            with self.lock:
                state = self.state()
                if verdict.status == KEEP and state.incumbent_commit != base:
                    attempt += 1
                    self.folder.append("stale_keep", number=number, slot=slot.index, gpu=slot.gpu,
                                       measured_against=base, incumbent=state.incumbent_commit,
                                       verdict=verdict.to_dict(), record=self._rel(outcome.record_path),
                                       text=f"#{number} won against {base[:10]}, but {state.incumbent_commit[:10]} "
                                            "was kept meanwhile: re-timing it against the new incumbent")
                    staged = self._apply_on_slot(slot, ws, proposal, number, message, state, set(), reason="stale")
                    if staged is None:
                        return {}
                    base, commit, source_hash, incumbent = staged
                    label = f"{number:04d}-retime{attempt}"
                    continue
                keep = verdict.status == KEEP
                if keep:  # the main worktree holds the incumbent: the same patch gives the same source
                    self.workspace.reset(base)
                    commit, main_hash = self.workspace.apply(proposal.patch, message,
                                                             state.tried_hashes - {source_hash})
                    assert main_hash == source_hash, "the main worktree and the slot disagree"
                event = self._record_evaluated(
                    number, commit, source_hash, proposal.hypothesis, outcome, verdict, confirmation,
                    ws.diff_stat(state.base_commit), time.monotonic() - start,
                    slot=slot.index, gpu=slot.gpu, worker=result.worker, measured_against=base,
                    fingerprint=outcome.evaluation.fingerprint)
                if keep:
                    self._commit_keep(event, state)
                self.folder.render()
                return event

    def _apply_on_slot(self, slot, ws, proposal, number, message, state: RunState, own: set, reason):
        """Under the lock: the candidate onto the current incumbent in the slot's worktree.
        Returns (incumbent commit, candidate commit, source hash, staged incumbent) or None when
        the patch is rejected (then the `rejected` event is written)."""
        base = state.incumbent_commit
        ws.reset(base)
        try:
            commit, source_hash = ws.apply(proposal.patch, message, set(state.tried_hashes) - own)
        except PatchRejected as exc:
            self.folder.append("rejected", number=number, reason=reason or exc.reason,
                               detail=f"{exc.reason}: {exc.detail}" if reason else exc.detail,
                               description=proposal.hypothesis, slot=slot.index)
            self.folder.render()
            return None
        self.folder.append("evaluating", number=number, commit=commit, source_hash=source_hash,
                           slot=slot.index, gpu=slot.gpu, incumbent=base)
        self.say(f"#{number}: evaluating on slot {slot.index} (GPU {slot.gpu}): {proposal.hypothesis[:60]}")
        return base, commit, source_hash, self._stage(self.incumbent_dir, self._slot_dir(slot) / "incumbent")

    def _rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.folder.path))
        except ValueError:
            return str(path)

    # --- the dispatchers ----------------------------------------------------------------------------
    def _next_job(self, agent: Agent, deadline: float, interrupts: Interrupts):
        """Under the agent lock: an interrupted proposal to finish, or a new one; None: stop."""
        s = self.settings
        with self.agent_lock:
            while True:
                if self._stop or self._errors:
                    return None
                if self._queue:
                    return self._queue.pop(0)
                state = self.state()
                reason = self._stop_reason(state, deadline, interrupts, agent)
                if reason:
                    self._stop = reason
                    return None
                if s.canary_every and state.proposed and state.proposed % s.canary_every == 0 \
                        and state.proposed not in self._canaries_claimed and not self._canary_done(state.proposed):
                    # run by this slot outside the agent lock: the other slots go on meanwhile
                    self._canaries_claimed.add(state.proposed)
                    return "canary", state.proposed
                try:
                    proposal = self._ask(agent, state)
                except AgentFatal as exc:
                    self.folder.append("agent_failed", reason=str(exc), fatal=True)
                    self._stop = f"the agent cannot go on: {exc}"
                    return None
                if proposal.failure:
                    self._stop = self._agent_failed(agent, proposal)  # the sequential loop's rules
                    if self._stop:
                        return None
                    continue
                return proposal, self._record_proposal(proposal, state.proposed + 1), None

    def _dispatch(self, slot: Slot, agent: Agent, deadline: float, interrupts: Interrupts) -> None:
        self._local.slot = slot
        try:
            while True:
                job = self._next_job(agent, deadline, interrupts)
                if job is None:
                    return
                if job[0] == "canary":
                    self.canary(at=job[1])
                    continue
                event = self.experiment_on(slot, *job)
                with self.agent_lock:  # streaks and plateaus: the sequential loop's rules
                    self._after_experiment(agent, event)
        except AgentFatal as exc:  # from a change of approach's research: stop cleanly
            self.folder.append("agent_failed", reason=str(exc), fatal=True)
            self._stop = f"the agent cannot go on: {exc}"
        except BaseException as exc:  # stop the others; the run folder stays resumable
            self._errors.append(exc)

    def loop(self, agent: Agent, started: float | None = None) -> str:
        started = started or self.clock.now()
        deadline = started + self.settings.budget_s
        self._deadline = deadline
        with self.lock:
            for slot in self.slots:
                self._slot_workspace(slot)
        self.folder.append("workers", executor=self.executor.name, slots=[s.describe() for s in self.slots],
                           text=f"{len(self.slots)} slot(s) on the {self.executor.name} executor: "
                                + ", ".join(f"GPU {s.gpu} CPUs {s.cpus}" for s in self.slots))
        with Interrupts() as interrupts:
            if not any(e["type"] == "baseline" for e in self.folder.events()):
                self.measure_noise()
            for number, pending in sorted(self.state().open_proposals.items()):
                patch = (self.folder.ledger / f"{pending['ledger']}.patch").read_text()
                self.folder.append("note", text=f"re-evaluating #{number}, interrupted mid-evaluation")
                self._queue.append((Proposal(patch=patch, hypothesis=pending["hypothesis"]), number, pending))
            if not any(e["type"] == "research" for e in self.folder.events()):
                try:
                    self._research(agent)
                except AgentFatal as exc:  # the slots see _stop and end at once
                    self.folder.append("agent_failed", reason=str(exc), fatal=True)
                    self._stop = f"the agent cannot go on: {exc}"
            threads = [threading.Thread(target=self._dispatch, args=(slot, agent, deadline, interrupts),
                                        name=f"lab-slot-{slot.index}", daemon=True) for slot in self.slots]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        if self._errors:
            raise self._errors[0]
        reason = self._stop or "stopped"
        self.folder.append("run_stopped", reason=reason)
        with self.lock:
            self.folder.render()
        return reason


# --- cloud fan-out --------------------------------------------------------------------------------
def skypilot_task(harness: Harness, accelerators: str = "H200:1", nodes: int = 2, port: int = 6379,
                  image: str | None = None) -> str:
    """A SkyPilot task (YAML) whose nodes start Ray workers in the harness's pinned image; the lab
    provisions nothing itself. `lab run --executor ray --address HEAD:PORT` then uses them."""
    from .publish import resolve_image

    image = image or resolve_image(harness) or harness.environment.image
    if not image:
        raise LabError(f"{harness.name} has no published image: run `lab publish {harness.name} --registry R` "
                       "first (or give --image), so that every worker runs the same pinned environment")
    gpu = harness.environment.needs_gpu
    resources = f'"{{\\"{SLOT_RESOURCE}\\": 1}}"' if not gpu else ""
    start = "--num-gpus=$SKYPILOT_NUM_GPUS_PER_NODE" if gpu else f"--num-cpus=2 --resources={resources}"
    return f"""\
# SkyPilot task: Ray workers for the lab harness '{harness.name}' (written by `lab skypilot`).
#   sky launch -c lab-{harness.name} {harness.name}.sky.yaml
#   lab run {harness.name} --executor ray --address <head IP>:{port}
# The lab and every worker must see the harness and the run folder at the same paths
# (docs/scaling.md: a shared filesystem); mount one at the same path on the lab's machine.
name: lab-{harness.name}-workers
num_nodes: {nodes}
resources:
  accelerators: {accelerators if gpu else "null"}
  image_id: docker:{image}
  ports: {port}
setup: |
  python -c "import lab, ray" || pip install 'ray>=2.9'
run: |
  head=$(echo "$SKYPILOT_NODE_IPS" | head -n1)
  if [ "$SKYPILOT_NODE_RANK" = "0" ]; then
    ray start --head --port={port} --disable-usage-stats --include-dashboard=false {start}
  else
    sleep 10
    ray start --address="$head:{port}" --disable-usage-stats {start}
  fi
  sleep infinity
"""
