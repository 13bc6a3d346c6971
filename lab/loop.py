"""The experiment loop: propose, apply, build, check, time, keep or discard, record.

The lab runs the loop, not a prompt. Every state change is appended to events.jsonl before the
lab acts on it, so a run killed at any point resumes from its folder alone: the experiments that
were in flight are evaluated again from their ledger entries (they never finished, so none is run
twice), and one whose keep was decided but not yet committed is committed.

Evaluations run on slots (lab/slots.py: a GPU and a CPU set) through an executor (lab/executors.py:
this host, or a Ray cluster); lab/scheduler.py dispatches the jobs. A sequential run is one local
slot; `--gpus 0,1` gives one slot per GPU and several proposals in flight. Either way the rules are
the ones below and only the Lab writes events. A slot applies a candidate onto the incumbent of the
moment and times it against that incumbent; only under the lock does anything reach the run's
branch: a KEEP measured against the current incumbent (and confirmed in a fresh process on the
same slot) is committed; one measured against an incumbent another slot replaced meanwhile is
re-applied onto the new one and timed again, or rejected as "stale" when it no longer applies.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import fmt, stats
from .agents import Agent, AgentContext, AgentFatal, Proposal
from .agents import clock as _clock
from .agents.memory import run_memory
from .envs import Env
from .errors import LabError, PatchRejected
from .evaluate import Outcome
from .executors import Executor, Request, Result, make_executor, sequential
from .harness import Harness, stage_editable
from .records import CRASH, FAIL, KEEP, TIMEOUT, WORSE, Verdict
from .scheduler import Dispatch
from .slots import Slot
from .store import RunFolder, event_status, new_run_id, pace
from .system.fingerprint import differences
from .workbench import Workbench
from .workspace import Workspace, check_patch, git, source_repo

CHANGE_PROPOSALS = 3  # proposals that get the instruction of a change of approach


def _oracle_lines(event: dict, count: int = 6) -> str:
    """The failing lines of an evaluation's oracle output (or its first lines), for the brief."""
    lines = [str(x) for x in event.get("check_lines") or []]
    bad = [x for x in lines if any(w in x.upper() for w in ("FAIL", "MISMATCH", "ERROR", "NAN"))] or lines
    return ("\n    " + "\n    ".join(x[:300] for x in bad[:count])) if bad else ""




@dataclass
class Staged:
    """A candidate applied in a slot's worktree, ready to be timed against `incumbent`."""

    base: str  # the incumbent commit it was applied onto and is measured against
    commit: str  # the candidate's commit in the slot's worktree
    source_hash: str
    incumbent: Path  # the incumbent's staged editable files
    delta: float


@dataclass
class Settings:
    budget_s: float = 8 * 3600
    max_experiments: int = 0  # 0: no limit
    max_usd: float = 0.0  # 0: no limit
    delta: float | None = None  # None: from the A/A noise floor
    confirm: bool = True
    canary_every: int = 10
    # A streak of this many failed evaluations (or failed proposals) in a row does not stop the
    # run: it triggers a canary (does the incumbent still pass?) and a change of approach.
    max_consecutive_failures: int = 8
    plateau_after: int = 25  # evaluations without a keep that also trigger a change of approach
    env: str = "native"
    gpu_index: int = 0
    agent: str = "anthropic"
    model: str | None = None
    web_search: bool = False  # the agent's research step may search the web
    gpus: list = field(default_factory=list)  # one slot per GPU (lab/slots.py); empty: one slot
    executor: str = "local"  # local | ray
    address: str = ""  # the Ray cluster's address, for --executor ray
    max_lost: int = 3  # re-runs of an evaluation whose worker died, before it counts as a crash
    # The anthropic agent's model settings (lab/agents/anthropic_agent.py; None: its defaults),
    # kept here so that a resumed run talks to the model as it did before.
    agent_effort: str | None = None
    agent_max_tokens: int | None = None
    thinking: bool = True
    max_episode_usd: float | None = None
    max_api_wait_s: float | None = None


@dataclass
class RunState:
    """What the events say: rebuilt on every resume, never stored separately."""

    base_commit: str = ""
    incumbent_commit: str = ""
    delta: float = stats.MIN_DELTA
    noise_floor: float | None = None
    baseline_metric: float | None = None
    proposed: int = 0
    tried_hashes: set = field(default_factory=set)
    verdicts: dict = field(default_factory=dict)
    spent_usd: float = 0.0
    evaluation_seconds: list = field(default_factory=list)
    since_keep: int = 0
    consecutive_failures: int = 0
    pending: dict | None = None  # the proposal in flight when the last process stopped
    open_proposals: dict = field(default_factory=dict)  # number -> every proposal in flight (parallel)
    pending_keep: dict | None = None  # a keep decided but not yet committed
    kept: list = field(default_factory=list)
    best_speedup: float = 1.0
    incumbent_failing: str = ""  # a canary since the last resume found the incumbent failing

    @classmethod
    def from_events(cls, events: list[dict], meta: dict) -> "RunState":
        st = cls(base_commit=meta.get("base_commit", ""), incumbent_commit=meta.get("base_commit", ""))
        open_proposal = None
        for e in events:
            t = e["type"]
            if t == "noise_floor":
                st.noise_floor, st.delta = e["noise_floor"], e["delta"]
            elif t == "baseline":
                st.baseline_metric = e.get("metric")
            elif t == "proposed":
                st.proposed = max(st.proposed, e["number"])
                st.spent_usd += e.get("cost_usd", 0.0)
                open_proposal = dict(e)
                st.open_proposals[e["number"]] = open_proposal
            elif t in ("agent_failed", "research"):
                st.spent_usd += e.get("cost_usd", 0.0)
            elif t == "canary" and e.get("incumbent_failed"):
                st.incumbent_failing = e.get("text", "the incumbent failed its canary")
            elif t == "resumed":
                st.incumbent_failing = ""
            elif t == "rejected":
                open_proposal = None
                st.open_proposals.pop(e.get("number"), None)
            elif t == "evaluating":
                st.tried_hashes.add(e["source_hash"])
                if e.get("number") in st.open_proposals:
                    st.open_proposals[e["number"]]["evaluating"] = e
                elif open_proposal is not None:
                    open_proposal["evaluating"] = e
            elif t == "evaluated":
                open_proposal = None
                st.open_proposals.pop(e.get("number"), None)
                status = e["verdict"]["status"]
                st.verdicts[status] = st.verdicts.get(status, 0) + 1
                st.evaluation_seconds.append(e.get("seconds", 0.0))
                if event_status(e) == KEEP:
                    st.pending_keep = e
                    st.since_keep = 0
                else:
                    st.since_keep += 1
                st.consecutive_failures = st.consecutive_failures + 1 if status in (FAIL, CRASH, TIMEOUT) else 0
            elif t == "kept":
                st.incumbent_commit = e["commit"]
                st.kept.append(e)
                st.best_speedup = e.get("cumulative_speedup", st.best_speedup)
                st.pending_keep = None
        st.pending = open_proposal
        return st


class Interrupts:
    """Ctrl-C once: finish the experiment in flight, record it, stop. Twice: stop now (the
    runner's process group is killed; the run stays consistent and resumable). Each is answered
    at once on stderr: the evaluation in flight may take minutes."""

    FIRST = "stopping after the evaluation in flight; Ctrl-C again to abandon it"
    SECOND = "abandoning the evaluation in flight (it is evaluated again on resume)"

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        # The state changes before anything is said: a second Ctrl-C that lands while the first
        # is being answered (a handler runs inside another) still abandons.
        first, self.requested = not self.requested, True
        if first:
            _clock.stop_waiting.set()  # an agent waiting out an API outage gives up now
            _tell(self.FIRST)
            return
        _tell(self.SECOND)
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous or signal.SIG_DFL)
        _clock.stop_waiting.clear()
        return False


def _tell(text: str) -> None:
    """One line on stderr from a signal handler: straight to the file descriptor, never through
    sys.stderr, whose buffer the handler may have interrupted mid-write (or that a handler
    running inside another would enter twice)."""
    os.write(2, (text + "\n").encode())


def _model_record(harness: Harness) -> dict | None:
    """The run's workload model (`--model`): where it was and what it was; None: the harness's own."""
    identity = harness.model_identity()
    return None if identity is None else {**identity, "path": str(harness.model_path)}


def _resume_model(harness: Harness, recorded: dict | None, path: Path) -> None:
    """A run keeps the model it started with: take the recorded file unless --model named one, and
    refuse a file whose sha256 differs (or a model for a run that ran the harness's own)."""
    if recorded is None:
        if harness.model_path is not None:
            raise LabError(f"{path} ran the harness's own model; a run cannot change its model: "
                           "resume without --model, or start a new run")
        return
    if harness.model_path is None:
        if not Path(recorded["path"]).is_file():
            raise LabError(f"{path} ran on the model {recorded['path']} (sha256 {recorded['sha256']}), "
                           "which is no longer there: give the same file with --model PATH")
        harness.use_model(recorded["path"])
    now = harness.model_identity()
    if now["sha256"] != recorded["sha256"]:
        raise LabError(f"{path} ran on {recorded['name']} (sha256 {recorded['sha256']}); {harness.model_path} "
                       f"has sha256 {now['sha256']}: a run cannot change its model; give the run's file with --model")


class Lab:
    """One run: its folder, harness, environment and worktree, and the slots its evaluations run on."""

    def __init__(self, folder: RunFolder, harness: Harness, env: Env, settings: Settings,
                 display=None):
        self.folder = folder
        self.harness = harness
        self.env = env
        self.settings = settings
        self.workspace = Workspace.attach(harness, folder.worktree)
        self.incumbent_dir = folder.path / "incumbent"
        self.say = display or (lambda text: None)
        self.clock = _clock.current()  # the budget's time (a soak test compresses it)
        self.lock = threading.RLock()  # the run's worktree, the incumbent's stage, every decision
        self.agent_lock = threading.Lock()  # one agent call at a time: agents are not assumed thread-safe
        self._local = threading.local()  # the slot the calling thread works on
        self._deadline: float | None = None
        self.bench = Workbench(self)
        self.attach(*sequential(harness, env, settings.gpu_index))

    def attach(self, executor: Executor, slots: list[Slot]) -> "Lab":
        """Run the evaluations on `slots` through `executor` (lab/executors.make_executor). A new
        Lab has the sequential run's one local slot."""
        self.executor, self.slots = executor, list(slots)
        return self

    # --- creation and resumption ---------------------------------------------------------
    @classmethod
    def start(cls, harness: Harness, runs_dir: Path, env: Env, settings: Settings, display=None,
              kind: str = "run") -> "Lab":
        repo, prefix = source_repo(harness)
        run_id = new_run_id(harness.name)
        base = git(repo, "rev-parse", "HEAD").strip()
        folder = RunFolder.create(runs_dir, run_id, {
            "harness": harness.name, "harness_root": str(harness.root), "kind": kind,
            "base_commit": base, "branch": f"lab/{run_id}", "repo": str(repo), "prefix": prefix,
            "harness_lock": harness.lock_digest(), "environment": env.reference(),
            "settings": asdict(settings), "workload_model": _model_record(harness),
        })
        Workspace.create(harness, folder.worktree, f"lab/{run_id}", base)
        lab = cls(folder, harness, env, settings, display)
        stage_editable(harness, lab.workspace.tree, lab.incumbent_dir)
        folder.append("run_started", text=f"{kind} of {harness.name} from {base[:12]} in {env.reference()}")
        folder.render()
        return lab

    @classmethod
    def resume(cls, path: Path, harness: Harness, env: Env, settings: Settings | None = None,
               display=None) -> "Lab":
        folder = RunFolder.open(path)
        folder.hold()  # one owner per run folder: a second one is refused with the first's pid
        meta = folder.meta
        if meta.get("harness") != harness.name:
            raise LabError(f"{path} is a run of '{meta.get('harness')}', not of '{harness.name}'")
        if meta.get("environment") not in (None, env.reference()):
            raise LabError(f"{path} ran in the environment {meta['environment']}, not {env.reference()}: a run "
                           "cannot change its environment; resume without --env, or start a new run")
        if meta.get("harness_lock") != harness.lock_digest():
            raise LabError(f"the locked files of '{harness.name}' changed since {path} started; "
                           "resume with the harness as it was (git checkout) or start a new run")
        _resume_model(harness, meta.get("workload_model"), path)
        settings = settings or Settings(**meta.get("settings", {}))
        lab = cls(folder, harness, env, settings, display)
        state = lab.state()
        if state.pending_keep is not None:
            lab._commit_keep(state.pending_keep, state)
            state = lab.state()
        lab.workspace.reset(state.incumbent_commit)
        stage_editable(harness, lab.workspace.tree, lab.incumbent_dir)
        folder.append("resumed", text=f"at {state.incumbent_commit[:12]} after {state.proposed} proposals")
        return lab

    @classmethod
    def launch(cls, harness: Harness, env: Env, settings: Settings, runs_dir: Path, resume: Path | None = None,
               total_budget: float | None = None, display=None) -> "Lab":
        """`lab run`'s Lab on the slots of its executor: a new run under `runs_dir`, or the run at
        `resume`, whose record then holds the settings it goes on with (`total_budget`, the
        original budget and any added, among them). The slots come first: a missing or busy
        GPU, or a Ray address that does not answer, stops the run before its folder exists."""
        workers, slots = make_executor(harness, env, settings)
        lab = (cls.resume(resume, harness, env, settings, display=display) if resume
               else cls.start(harness, runs_dir, env, settings, display=display)).attach(workers, slots)
        if resume:
            lab.folder.update_meta(settings={**asdict(settings), "budget_s": total_budget})
        return lab

    def state(self) -> RunState:
        return RunState.from_events(self.folder.events(), self.folder.meta)

    # --- the slots ------------------------------------------------------------------------
    def _slot(self) -> Slot:
        """The slot of the calling thread: its dispatcher's, else the first."""
        return getattr(self._local, "slot", None) or self.slots[0]

    def _slot_dir(self, slot: Slot) -> Path:
        return self.folder.path / "slots" / f"slot-{slot.index}"

    def _slot_workspace(self, slot: Slot) -> Workspace:
        """Where `slot` applies its candidates. The only slot uses the run's worktree (which holds
        the incumbent between its experiments); each of several has a worktree of its own, so that
        the run's worktree only ever moves from one incumbent to the next, under the lock."""
        if len(self.slots) == 1:
            return self.workspace
        path = self._slot_dir(slot) / "worktree"
        with self.lock:
            if not (path / ".git").exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                git(self.folder.worktree, "worktree", "add", "-q", "--detach", str(path.resolve()), "HEAD")
        return Workspace(path, self.workspace.prefix, self.harness)

    def _incumbent_for(self, slot: Slot, name: str) -> Path:
        """The incumbent's editable files for one evaluation on `slot`: the run's stage itself for
        the only slot; a copy taken under the lock where another slot's keep may restage it."""
        if len(self.slots) == 1:
            return self.incumbent_dir
        dest = self._slot_dir(slot) / name
        with self.lock:
            if dest.exists():
                shutil.rmtree(dest)
            stage_editable(self.harness, self.incumbent_dir, dest)
        return dest

    def _run(self, slot: Slot, label: str, mode: str, candidate: Path, incumbent: Path | None,
             delta: float, node: str | None = None) -> Result:
        """One evaluation on `slot` through the executor, in evaluations/<label>; a worker that
        died under it is recorded (`lost`) before the executor runs it again."""
        work = self.folder.path / "evaluations" / label
        if work.exists():
            shutil.rmtree(work)
        req = Request(label, mode, candidate, work, incumbent, delta,
                      {"run": self.folder.meta["id"], "slot": slot.index}, node)

        def lost(r: Request, attempt: int, error: str) -> None:
            self.folder.append("lost", label=r.label, attempt=attempt, slot=slot.index, gpu=slot.gpu,
                               error=error, text=f"{r.label}: the worker died ({error}); re-running it")

        return self.executor.evaluate(slot, req, on_lost=lost)

    def _on(self, slot: Slot) -> str:
        """Where an evaluation runs, for the live view: "" in a run of one slot."""
        return f" on slot {slot.index} (GPU {slot.gpu})" if len(self.slots) > 1 else ""

    def _announce_slots(self) -> None:
        self.folder.append("workers", executor=self.executor.name, slots=[s.describe() for s in self.slots],
                           text=f"{len(self.slots)} slot(s) on the {self.executor.name} executor: "
                                + ", ".join(f"GPU {s.gpu} CPUs {s.cpus or 'all'}" for s in self.slots))

    # --- measurement of the incumbent -----------------------------------------------------
    def _evaluate(self, number: str, mode: str, delta: float) -> Outcome:
        """The incumbent against itself (mode aa: a baseline, a canary) on the calling thread's slot."""
        slot = self._slot()
        return self._run(slot, str(number), mode, self._incumbent_for(slot, "aa"), None, delta).outcome
    def measure_noise(self, label: str = "baseline") -> Outcome:
        """The incumbent against itself: checks it, gives the A/A noise floor and delta."""
        self.say(f"measuring the A/A noise floor ({label})")
        state = self.state()
        outcome = self._evaluate(f"{label}-{len(self.folder.events())}", "aa", state.delta)
        ev = outcome.evaluation
        if ev.status or not ev.pairs or outcome.verdict.status == FAIL:  # FAIL: e.g. a broken time
            raise LabError(f"the incumbent cannot be measured ({outcome.verdict.status}: "
                           f"{outcome.verdict.reason or ev.reason}); see {outcome.record_path}")
        ratios = stats.log_ratios(ev.pairs)
        noise = stats.noise_floor(ratios)
        delta = self.settings.delta if self.settings.delta else stats.delta_for(noise)
        metric = statistics.median(p.incumbent.value for p in ev.pairs)
        if label == "baseline":
            self.folder.append("baseline", metric=metric, metric_name=self.harness.metric.name,
                               unit_seconds=statistics.median(p.incumbent.seconds for p in ev.pairs),
                               record=str(outcome.record_path.relative_to(self.folder.path)),
                               fingerprint=ev.fingerprint)
        self.folder.append("noise_floor", noise_floor=noise, delta=delta, pairs=len(ratios),
                           report=stats.noise_report(ratios, ev.telemetry), label=label)
        self.folder.render()
        return outcome

    def canary(self, at: int | None = None) -> None:
        """An A/A evaluation in the middle of a run (after proposal `at`, default the latest): a
        KEEP or WORSE means the machine is noisier than measured."""
        state = self.state()
        at = state.proposed if at is None else at
        outcome = self._evaluate(f"canary-{at}", "aa", state.delta)
        status = outcome.verdict.status
        if status in (FAIL, CRASH, TIMEOUT):  # the incumbent itself no longer passes: stop the run
            why = outcome.verdict.reason or outcome.evaluation.reason
            self.folder.append("canary", text=f"A/A canary: {status}: the incumbent no longer passes ({why[:300]})",
                               verdict=outcome.verdict.to_dict(), at=at, incumbent_failed=True)
            self.folder.render()
            return
        self.folder.append("canary", text=f"A/A canary: {status}", verdict=outcome.verdict.to_dict(), at=at)
        if status in (KEEP, WORSE):
            self.folder.append("note", text="the A/A canary was not SAME: the machine is noisier than "
                               "measured; re-measuring the noise floor and widening delta")
            old = state.delta
            self.measure_noise(label="canary")
            new = max(self.state().delta, old * 1.5)
            self.folder.append("noise_floor", noise_floor=self.state().noise_floor, delta=new,
                               label="widened", pairs=0, report={})
        self.folder.render()


    # --- one experiment ---------------------------------------------------------------------
    def _record_proposal(self, proposal: Proposal, number: int) -> int:
        """The patch and its transcript into the ledger, then the `proposed` event: `number`."""
        notes = {k: getattr(proposal, k, "") for k in ("learned", "next_idea") if getattr(proposal, k, "")}
        entry = self.folder.write_ledger(number, proposal.patch, {
            "number": number, "hypothesis": proposal.hypothesis, "cost_usd": proposal.cost_usd,
            "usage": proposal.usage, "transcript": proposal.transcript, **notes,
        })
        self.folder.append("proposed", number=number, hypothesis=proposal.hypothesis,
                           ledger=entry, cost_usd=proposal.cost_usd, **notes)
        return number

    def experiment(self, proposal: Proposal, number: int | None = None, replay: dict | None = None) -> dict:
        """Record a new proposal (unless `number` is given) and take it through the gate on the
        calling thread's slot; returns the `evaluated` or `rejected` event."""
        if number is None:
            number = self._record_proposal(proposal, self.state().proposed + 1)
        return self.experiment_on(self._slot(), proposal, number, replay)

    def experiment_on(self, slot: Slot, proposal: Proposal, number: int, replay: dict | None = None) -> dict:
        """Proposal `number` through the gate on `slot`: apply it onto the incumbent of the moment,
        time it against that incumbent, confirm a KEEP, decide. A KEEP measured against an
        incumbent that another slot replaced meanwhile is re-applied onto the new one and timed
        again (or rejected as stale). Returns the `evaluated` or `rejected` event; `replay` is
        the proposal's events from a process that stopped before it finished."""
        ws = self._slot_workspace(slot)
        own = {replay["evaluating"]["source_hash"]} if replay and replay.get("evaluating") else set()
        start, label = time.monotonic(), f"{number:04d}"
        staged = self._apply_on_slot(slot, ws, proposal, number, own, stale=False)
        retimes = 0
        while isinstance(staged, Staged):
            result, verdict, confirmation = self._measure(slot, number, label, ws.tree, staged)
            with self.lock:
                state = self.state()
                if verdict.status != KEEP or state.incumbent_commit == staged.base:
                    return self._decide(slot, ws, proposal, number, staged, result, verdict, confirmation,
                                        time.monotonic() - start)
                self.folder.append("stale_keep", number=number, slot=slot.index, gpu=slot.gpu,
                                   measured_against=staged.base, incumbent=state.incumbent_commit,
                                   verdict=verdict.to_dict(), record=self._rel(result.outcome.record_path),
                                   text=f"#{number} won against {staged.base[:10]}, but "
                                        f"{state.incumbent_commit[:10]} was kept meanwhile: re-timing it "
                                        "against the new incumbent")
                staged = self._apply_on_slot(slot, ws, proposal, number, set(), stale=True)
            retimes += 1
            label = f"{number:04d}-retime{retimes}"
        return staged  # the `rejected` event

    def _apply_on_slot(self, slot: Slot, ws: Workspace, proposal: Proposal, number: int, own: set,
                       stale: bool) -> Staged | dict:
        """Under the lock: the candidate onto the current incumbent in the slot's worktree, and
        its `evaluating` event; or the `rejected` event when the patch does not apply (`stale`:
        any more, onto an incumbent that moved on)."""
        with self.lock:
            state = self.state()
            base = state.incumbent_commit
            ws.reset(base)
            try:
                commit, source_hash = ws.apply(proposal.patch, f"lab #{number}: {proposal.hypothesis}".strip(),
                                               set(state.tried_hashes) - own)
            except PatchRejected as exc:
                event = self.folder.append(
                    "rejected", number=number, reason="stale" if stale else exc.reason,
                    detail=f"{exc.reason}: {exc.detail}" if stale else exc.detail,
                    description=proposal.hypothesis, slot=slot.index)
                self.folder.render()
                return event
            self.folder.append("evaluating", number=number, commit=commit, source_hash=source_hash,
                               slot=slot.index, gpu=slot.gpu, incumbent=base)
            incumbent = self._incumbent_for(slot, "incumbent")
        self.say(f"#{number}: evaluating{self._on(slot)}: {proposal.hypothesis[:70]}")
        return Staged(base, commit, source_hash, incumbent, state.delta)

    def _measure(self, slot: Slot, number: int, label: str, tree: Path, staged: Staged):
        """Time the candidate against the staged incumbent on `slot`; a KEEP is confirmed in a
        fresh process on fresh seeds, on the same slot (and Ray node). (result, verdict, confirmation)."""
        result = self._run(slot, label, "evaluate", tree, staged.incumbent, staged.delta)
        verdict = result.outcome.verdict
        if verdict.status != KEEP or not self.settings.confirm:
            return result, verdict, None
        self.say(f"#{number}: KEEP{self._on(slot)}; confirming in a fresh process on fresh seeds")
        confirmation = self._run(slot, f"{label}-confirm", "evaluate", tree, staged.incumbent,
                                 staged.delta, node=result.worker.get("node")).outcome
        differ = differences(result.outcome.evaluation.fingerprint, confirmation.evaluation.fingerprint)
        refused = f"the confirming run ran on another machine ({', '.join(differ[:3])})" if differ else ""
        return result, stats.confirm(verdict, confirmation.verdict, refused), confirmation

    def _decide(self, slot: Slot, ws: Workspace, proposal: Proposal, number: int, staged: Staged,
                result: Result, verdict: Verdict, confirmation: Outcome | None, seconds: float) -> dict:
        """Under the lock, against the incumbent it was measured against: record the verdict; a
        KEEP reaches the run's branch, anything else leaves the slot's worktree at the incumbent."""
        state = self.state()
        keep = verdict.status == KEEP
        commit = staged.commit
        if keep and ws is not self.workspace:  # the run's worktree holds the incumbent: same patch, same source
            self.workspace.reset(staged.base)
            commit, main_hash = self.workspace.apply(proposal.patch, f"lab #{number}: {proposal.hypothesis}".strip(),
                                                     state.tried_hashes - {staged.source_hash})
            assert main_hash == staged.source_hash, "the run's worktree and the slot disagree"
        outcome = result.outcome
        event = self._record_evaluated(
            number, commit, staged.source_hash, proposal.hypothesis, outcome, verdict, confirmation,
            ws.diff_stat(state.base_commit), seconds, slot=slot.index, gpu=slot.gpu, worker=result.worker,
            measured_against=staged.base, fingerprint=outcome.evaluation.fingerprint)
        if keep:
            self._commit_keep(event, state)
        else:
            ws.reset(state.incumbent_commit)
        self.folder.render()
        return event

    def _rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.folder.path))
        except ValueError:
            return str(path)

    def _record_evaluated(self, number: int, commit: str, source_hash: str, description: str,
                          outcome: Outcome, verdict, confirmation: Outcome | None, diffstat: str,
                          seconds: float, **extra) -> dict:
        """Append the `evaluated` event of one experiment."""
        ev = outcome.evaluation
        if ev.busy_cpus:
            self.folder.append("note", text=f"#{number}: timing core(s) {ev.busy_cpus} were busy before "
                               "the timing: another process competes with the measurement")
        candidate_seconds = [p.candidate.seconds for p in ev.pairs]
        return self.folder.append(
            "evaluated", number=number, commit=commit, source_hash=source_hash, status=verdict.status,
            correct=bool(ev.check and ev.check.passed), description=description,
            metric=statistics.median(p.candidate.value for p in ev.pairs) if ev.pairs else None,
            unit_seconds=statistics.median(candidate_seconds) if candidate_seconds else None,
            verdict=verdict.to_dict(),
            confirmation=confirmation.verdict.to_dict() if confirmation else None,
            check_lines=ev.check.lines if ev.check else [], reason=ev.reason[-500:],
            seeds=ev.seeds,  # revealed only now, after the verdict
            diffstat=diffstat, work=ev.work,
            build_info=ev.candidate_build.info if ev.candidate_build else {},
            record=str(outcome.record_path.relative_to(self.folder.path)),
            seconds=seconds, **extra,
        )

    def _commit_keep(self, event: dict, state: RunState) -> None:
        v = event["verdict"]
        gain = stats.speedup(v["median"])
        cumulative = state.best_speedup * gain
        message = (f"lab #{event['number']}: {event['description']}\n\n"
                   f"speedup over the incumbent {fmt.speedup_and_ci(v)}; "
                   f"cumulative {fmt.speedup(cumulative)}\n")
        head_hash = self.workspace.editable_hash()
        if head_hash != event["source_hash"]:  # killed before the reset? re-apply from the ledger
            raise LabError(f"the worktree of {self.folder.path} does not hold experiment "
                           f"#{event['number']}; repair it with `git -C worktree reset --hard {event['commit']}`")
        commit = self.workspace.keep(message)
        stage_editable(self.harness, self.workspace.tree, self.incumbent_dir)
        self.folder.append("kept", number=event["number"], commit=commit, speedup=gain,
                           cumulative_speedup=cumulative)


    # --- the loop ---------------------------------------------------------------------------
    def loop(self, agent: Agent, started: float | None = None) -> str:
        """Propose and evaluate on every slot until a budget or stop rule ends the run; returns
        why it ended. The dispatching is lab/scheduler.py's; every rule and event is here."""
        started = started or self.clock.now()
        self._deadline = started + self.settings.budget_s
        self._announce_slots()
        with Interrupts() as interrupts:
            if not any(e["type"] == "baseline" for e in self.folder.events()):
                self.measure_noise()
            reason = Dispatch(self, agent, interrupts).run()
        self.record_stop(reason)
        return reason

    def record_stop(self, reason: str) -> None:
        """This process is done with the run (`reason`): said in its events and log, so that the
        run reads as stopped, not died (lab/runs.py)."""
        self.folder.append("run_stopped", reason=reason)
        self.folder.render()

    def try_patch(self, patch: str, hypothesis: str) -> dict:
        """`lab try`: a person's patch as this run's next experiment, through the agent's gate.
        The patch is checked against the incumbent first: a refused one is recorded as the
        experiment's rejection and nothing is measured; else a run without a noise floor
        measures it first. Returns the `evaluated` or `rejected` event."""
        try:
            check_patch(patch, self.workspace.tree, self.harness)
            refused = False
        except PatchRejected:  # recorded by the experiment below
            refused = True
        if not refused and self.state().noise_floor is None:
            self.measure_noise()
        event = self.experiment(Proposal(patch=patch, hypothesis=hypothesis))
        self.record_stop(f"try #{event['number']} done")
        return event

    def _stop_reason(self, state: RunState, interrupts: Interrupts) -> str:
        """Why the run must stop now, or "". The only stop rules: Ctrl-C, the budgets (time,
        experiments, dollars), and a canary that found the incumbent itself failing. Failure
        streaks and plateaus never stop a run (see _after_experiment)."""
        s = self.settings
        if interrupts.requested:
            return "stopped by Ctrl-C"
        if state.incumbent_failing:
            return (f"the incumbent stopped passing: {state.incumbent_failing}; fix the machine or the "
                    "environment, then `lab run --resume RUN`")
        if s.max_experiments and state.proposed >= s.max_experiments:
            return f"{s.max_experiments} experiments done"
        spent = state.spent_usd
        if s.max_usd and spent >= s.max_usd:
            return f"spend limit reached (${spent:.2f} of ${s.max_usd:.2f})"
        expected = statistics.median(state.evaluation_seconds) if state.evaluation_seconds else 0.0
        if self._deadline is not None and self.clock.now() + expected > self._deadline:
            return "the time budget cannot fit another evaluation"
        return ""

    def _canary_due(self, state: RunState) -> bool:
        """Every canary_every proposals, one A/A canary (is the machine as quiet as measured?)."""
        every = self.settings.canary_every
        return bool(every and state.proposed and state.proposed % every == 0
                    and not self._canary_done(state.proposed))

    # --- failure streaks and plateaus: inform, change approach, never stop ------------------
    def _ask(self, agent: Agent, state: RunState) -> Proposal:
        """One proposal. An agent that raises (a bug, an OS error) gives a failed proposal, never
        the run's end; only AgentFatal (no key, no credit) goes through."""
        try:
            return agent.propose(self._context(state))
        except AgentFatal:
            raise
        except Exception as exc:
            text = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.folder.append("agent_fault", kind="agent_crash", text=text,
                               traceback=traceback.format_exc(limit=10)[-4000:])
            return Proposal(failure=f"the agent crashed: {text}")

    def _agent_failed(self, agent: Agent, proposal: Proposal) -> str:
        """Record a failed proposal; returns a stop reason only when the agent has nothing left.
        An API that stayed unavailable is not the agent's failure and starts no streak."""
        self.folder.append("agent_failed", reason=proposal.failure, cost_usd=proposal.cost_usd,
                           api_unavailable=bool(getattr(proposal, "api_unavailable", False)))
        if getattr(agent, "exhausted", False):
            return "the agent has no more proposals"
        streak = self._recent_agent_failures()
        n = self.settings.max_consecutive_failures
        if n and streak and streak % n == 0:
            self._change_approach(agent, f"{streak} proposals in a row failed (last: {proposal.failure[:200]})")
        if n and streak >= n:  # never spin: a broken agent is asked again after a pause
            self.clock.sleep(min(60.0 * (streak - n + 1), 600.0))
        return ""

    def _after_experiment(self, agent: Agent, event: dict) -> None:
        """After an evaluation (`event`; a rejection changes no streak): a failure streak runs a
        canary (is it the machine?) and, if the incumbent still passes, asks for a change of
        approach; so does a plateau."""
        if not event or event.get("type") != "evaluated":
            return
        s, state = self.settings, self.state()
        if state.consecutive_failures and s.max_consecutive_failures and \
                state.consecutive_failures % s.max_consecutive_failures == 0:
            self.say(f"{state.consecutive_failures} evaluations in a row failed: a canary, then a change of approach")
            self.canary()
            if self.state().incumbent_failing:
                return
            self._change_approach(agent, f"{state.consecutive_failures} evaluations in a row failed or crashed")
        elif s.plateau_after and state.since_keep and state.since_keep % s.plateau_after == 0:
            self.folder.append("plateau", text=f"{state.since_keep} evaluations without a keep")
            self._change_approach(agent, f"{state.since_keep} evaluations without a keep (a plateau)")

    def _change_approach(self, agent: Agent, why: str) -> None:
        """Research again with the run memory and the log, and tell the next proposals to try a
        structurally different idea."""
        self.folder.append("note", kind="change_approach", why=why,  # a note: log.md shows it
                           text=f"change of approach: {why}; researching again")
        self._research(agent, again=why)

    def _direction(self, events: list[dict]) -> str:
        """The instruction of the latest change of approach, for the CHANGE_PROPOSALS proposals after it."""
        last = max((i for i, e in enumerate(events) if e.get("kind") == "change_approach"), default=None)
        if last is None or sum(1 for e in events[last:] if e["type"] == "proposed") >= CHANGE_PROPOSALS:
            return ""
        return (f"{events[last]['why']}. Step back from the ideas of the recent experiments: try a "
                "structurally different one (another algorithmic structure, data layout, parallel "
                "decomposition or memory hierarchy level), taken from the fresh research list in the "
                "run memory, not a variant of a dead end. Check your draft before you submit.")

    def _canary_done(self, proposed: int) -> bool:
        return any(e["type"] == "canary" and e.get("at") == proposed for e in self.folder.events())

    def _recent_agent_failures(self) -> int:
        n = 0
        for e in reversed(self.folder.events()):
            if e["type"] == "agent_failed" and e.get("api_unavailable"):
                continue  # the API's outage, not the agent's failure
            if e["type"] == "agent_failed":
                n += 1
            elif e["type"] in ("proposed", "evaluated", "rejected"):
                break
        return n

    def _research(self, agent: Agent, again: str = "") -> None:
        self.say("research" + (f" again: {again}" if again else ""))
        before = getattr(agent, "research_cost_usd", 0.0)
        try:
            text = agent.research(self._context(self.state()))
        except AgentFatal:
            raise
        except Exception as exc:  # research is a help, not a gate
            text = f"(research failed: {exc})"
        if text:
            self.folder.append("research", text=text, again=bool(again),
                               cost_usd=getattr(agent, "research_cost_usd", 0.0) - before)
            self.folder.render()

    def _context(self, state: RunState) -> AgentContext:
        events = self.folder.events()
        failures = [f"#{e['number']} {e['verdict']['status']}: {e.get('description', '')} — "
                    f"{e['verdict'].get('reason') or e.get('reason', '')}"[:600] + _oracle_lines(e)
                    for e in events if e["type"] == "evaluated" and event_status(e) in (FAIL, CRASH, TIMEOUT)][-5:]
        failures += [f"#{e['number']} rejected: {e['reason']} {e.get('detail', '')}"[:300]
                     for e in events if e["type"] == "rejected"][-3:]
        scratch = self.folder.path / "agent" / "scratch"
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        return AgentContext(
            # the run's worktree, not the user's checkout: the agent reads what the run holds
            harness_name=self.harness.name, harness_root=self.workspace.tree,
            incumbent_tree=self.workspace.tree, editable=tuple(self.harness.editable),
            program_md=self.harness.program.read_text() if self.harness.program.exists() else "",
            results_tsv=(self.folder.path / "results.tsv").read_text(),
            log_md=(self.folder.path / "log.md").read_text(),
            recent_failures=failures, run_dir=self.folder.path, scratch=scratch,
            compile=self.bench.compile, profile=self.bench.profile,
            tried_hypotheses=[e.get("hypothesis", "") for e in events if e["type"] == "proposed"],
            memory=run_memory(events), direction=self._direction(events),
            seconds_left=(self._deadline - self.clock.now()) if self._deadline is not None else None,
            usd_left=(self.settings.max_usd - state.spent_usd) if self.settings.max_usd else None,
            spent_usd=state.spent_usd, private=tuple(self.harness.private),
            check=None if self.settings.executor == "ray" else self.bench.check, report=self._report,
        )

    def _report(self, type_: str, **payload) -> None:
        """What an agent reports mid-episode (an API wait, a fault): an event, and the live view."""
        self.folder.append(type_, **payload)
        if payload.get("text"):
            self.say(f"{type_.replace('_', ' ')}: {payload['text']}")

    # --- summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        state = self.state()
        events = self.folder.events()
        kept = [e for e in events if e["type"] == "kept"]
        return {
            "run": str(self.folder.path), "branch": self.folder.meta.get("branch"),
            "baseline_metric": state.baseline_metric, "metric": self.harness.metric.name,
            "best_speedup": state.best_speedup, "kept": [(e["commit"][:10], e["speedup"]) for e in kept],
            "verdicts": state.verdicts, "proposals": state.proposed,
            "rejected": sum(1 for e in events if e["type"] == "rejected"),
            "spent_usd": round(state.spent_usd, 4), "noise_floor": state.noise_floor, "delta": state.delta,
            "pace": pace(events),
        }
