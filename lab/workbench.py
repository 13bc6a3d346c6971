"""The lab's side of the agent's tools: a draft check, a compile, a profile of the incumbent.

Each goes through the lab's own evaluation path (lab/evaluate.run_evaluation): the runner in the
run's environment (the Env that runs every evaluation: native, docker, nix), the candidate's
processes in the sandbox, on the cores no slot's runner uses. The agent builds and runs nothing on
the host itself. None of it feeds a verdict; a draft check is recorded (an event, a line of
log.md) and, like any work, spends the run's budget. `profile_digest` is also `lab profile`'s,
so a person's profile runs where the agent's does.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from . import stats
from .envs import Env
from .errors import BuildFailed, LabError
from .evaluate import Outcome, run_evaluation
from .harness import Harness, stage_editable
from .records import Build
from .system.cpus import allowed_cpus

QUICK_PAIRS = 5  # pairs of a draft check's informative timing


def public_seeds(harness: Harness) -> list[int]:
    """The oracle seeds a draft check uses: the harness's `public_seeds`, else 1..oracle_seeds.
    Public by construction: the verdict's seeds are drawn fresh and secret for every evaluation."""
    return list(harness.public_seeds) or list(range(1, max(harness.oracle_seeds, 1) + 1))


def profile_digest(harness: Harness, tree: Path, work: Path, env: Env, **options) -> str:
    """The harness's profile digest of `tree`, built and profiled by the runner in `env` (runner
    mode profile: the candidate's processes in the sandbox), in `work`; `options` as
    run_evaluation takes them. Raises BuildFailed when the tree does not build, LabError when the
    profile run fails."""
    ev = run_evaluation(harness, tree, work, env=env, mode="profile", **options).evaluation
    if ev.candidate_build is not None and not ev.candidate_build.ok:
        raise BuildFailed(ev.candidate_build.error)
    if ev.status:
        raise LabError(f"the profile run ended {ev.status}: {ev.reason[-500:]}")
    return ev.profile


def _emptied(work: Path) -> Path:
    """`work`, without what an earlier use of the tool left there."""
    if work.exists():
        shutil.rmtree(work)
    return work


class Workbench:
    """The agent's check, compile and profile tools for one run (a Lab: lab/loop.py)."""

    def __init__(self, lab):
        self.lab = lab

    def _cpus(self) -> list[int] | None:
        """The cores no slot's runner uses (the lab's own); None: every core."""
        taken = {c for slot in self.lab.slots for c in slot.cpus or ()}
        spare = [c for c in allowed_cpus() if c not in taken] if taken else []
        return spare or None

    def _options(self, extra: dict) -> dict:
        """run_evaluation's options for a tool of this run: its GPU, the spare cores, the run in
        the fingerprint (with `extra`)."""
        lab = self.lab
        return {"gpu_index": lab.settings.gpu_index, "cpus": self._cpus(),
                "fingerprint_extra": {"run": lab.folder.meta["id"], **extra}}

    def _evaluate(self, tree: Path, work: Path, mode: str, extra: dict, **options) -> Outcome:
        """`tree` through the runner in the run's environment, in `work` (emptied first)."""
        lab = self.lab
        return run_evaluation(lab.harness, tree, _emptied(work), env=lab.env, mode=mode, **self._options(extra),
                              **options)

    def check(self, tree: Path, timing: bool = True) -> str:
        """The agent's `check` tool: its draft through the lab's own evaluation path (build, the
        oracle on the harness's public seeds, never secret ones; with timing, a few pairs against
        the incumbent), recorded as an event and in log.md, counted in the budget like any work."""
        lab = self.lab
        number = sum(1 for e in lab.folder.events() if e.get("kind") == "draft_check") + 1
        proposal = lab.state().proposed + 1
        timing = timing and not lab.settings.gpus  # in a parallel run the slots' GPUs are timing
        seeds = public_seeds(lab.harness)
        lab.say(f"draft check {number} for proposal #{proposal}" + (" with a quick timing" if timing else ""))
        start = lab.clock.now()
        outcome = self._evaluate(
            tree, lab.folder.path / "agent" / "checks" / f"{number:04d}", "evaluate" if timing else "check",
            {"draft_check": number}, incumbent_tree=lab.incumbent_dir if timing else None,
            delta=lab.state().delta, check_seeds=seeds, min_pairs=QUICK_PAIRS,
            max_seconds=max(lab.harness.min_timing_seconds, 1.0))
        passed, lines = _check_lines(outcome, seeds, timing)
        lab.folder.append("note", kind="draft_check", number=number, proposal=proposal, passed=passed,
                          seeds=seeds, seconds=round(lab.clock.now() - start, 2), record=lab._rel(outcome.record_path),
                          text=f"draft check {number} (for proposal #{proposal}): "
                               f"{'oracle PASS' if passed else 'oracle FAIL'}" + (f", {lines[-1]}" if timing and passed else ""))
        return "\n".join(lines)

    def compile(self, tree: Path) -> Build:
        """The agent's `compile` tool: the runner builds `tree` with the harness's own flags, in the
        run's environment (build only: no check, no timing)."""
        outcome = self._evaluate(tree, self.lab.folder.path / "agent" / "compile", "build", {"tool": "compile"})
        ev = outcome.evaluation
        return ev.candidate_build or Build(ok=False, source_hash="", error=ev.reason or outcome.verdict.reason)

    def profile(self) -> str:
        """The agent's `profile` tool: the harness's profile digest of the incumbent, built and
        profiled by the runner in the run's environment. Raises LabError when that run fails."""
        lab = self.lab
        incumbent = lab.folder.path / "agent" / "profile-incumbent"
        with lab.lock:  # another slot's keep restages the incumbent
            if incumbent.exists():
                shutil.rmtree(incumbent)
            stage_editable(lab.harness, lab.incumbent_dir, incumbent)
        try:
            return profile_digest(lab.harness, incumbent, _emptied(lab.folder.path / "agent" / "profile"), lab.env,
                                  **self._options({"tool": "profile"}))
        except BuildFailed as exc:  # the agent's answer, not a tool error
            return f"the incumbent does not build: {exc.error}"


def _check_lines(outcome: Outcome, seeds: list[int], timing: bool) -> tuple[bool, list[str]]:
    """Whether a draft passed the oracle, and what the agent reads of it."""
    ev, verdict = outcome.evaluation, outcome.verdict
    passed = bool(ev.check and ev.check.passed)
    why = ev.reason or verdict.reason
    lines = [f"oracle on public seeds {seeds}: {'PASS' if passed else 'FAIL'}"
             + (f" ({why[:1500]})" if not passed and why else "")]
    lines += (ev.check.lines if ev.check else [])[:40]
    if timing and passed and ev.pairs:
        ratios = stats.log_ratios(ev.pairs)
        if len(ratios):
            lines.append(f"quick timing, {len(ratios)} pairs (informative, not a verdict): "
                         f"{stats.speedup(float(statistics.median(ratios))):.4f}x the current best")
    return passed, lines
