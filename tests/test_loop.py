"""The experiment loop end to end on the cdot harness: keeps, discards, rejections, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.agents import Agent, Proposal
from lab.envs import get
from lab.loop import Lab, Settings
from lab.store import RunFolder
from lab.workspace import git

from conftest import CDOT, lab_cli

OUTSIDE = """--- a/harness.py
+++ b/harness.py
@@ -1,1 +1,1 @@
-\"\"\"cdot: a tiny CPU harness for the lab's own tests (a compiled C function whose speed a patch
+\"\"\"hacked
"""


class ListAgent(Agent):
    name = "list"

    def __init__(self, items):
        self.items = list(items)
        self.exhausted = False

    def propose(self, ctx):
        if not self.items:
            self.exhausted = True
            return Proposal(failure="no more")
        patch, hypothesis = self.items.pop(0)
        return Proposal(patch=patch, hypothesis=hypothesis, cost_usd=0.01)


def sol(name):
    return (CDOT / "solutions" / name).read_text()


def test_loop_records_every_verdict_and_the_branch_holds_only_keeps(cdot, cdot_repo):
    settings = Settings(budget_s=600, delta=0.02, canary_every=0)
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), settings)
    agent = ListAgent([
        (sol("wrong/slower.patch"), "volatile accumulator"),
        (sol("wrong/skip-half.patch"), "skip half"),
        (OUTSIDE, "edit the harness"),
        (sol("wrong/slower.patch"), "volatile accumulator again"),
    ])
    reason = lab.loop(agent)
    assert reason == "the agent has no more proposals"
    events = lab.folder.events()
    evaluated = [e for e in events if e["type"] == "evaluated"]
    rejected = [e for e in events if e["type"] == "rejected"]
    assert [e["verdict"]["status"] for e in evaluated] == ["WORSE", "FAIL"]
    assert [e["reason"] for e in rejected] == ["outside the editable surface", "duplicate"]
    assert evaluated[0]["seeds"], "seeds are revealed after the verdict"
    base = lab.folder.meta["base_commit"]
    assert lab.workspace.head() == base  # nothing kept: the branch did not move
    assert "volatile" not in (lab.workspace.tree / "work.c").read_text()
    # ledger has every candidate, kept or not
    assert len(list(lab.folder.ledger.glob("*.patch"))) == 4
    summary = lab.summary()
    assert summary["proposals"] == 4 and summary["spent_usd"] == pytest.approx(0.04)
    tsv = (lab.folder.path / "results.tsv").read_text().splitlines()
    assert len(tsv) == 3 and "WORSE" in tsv[1] and "fail" in tsv[2]


def test_a_faster_candidate_is_kept_after_confirmation(cdot, cdot_repo):
    """Make the incumbent slow first (a person's commit), then offer the fast version."""
    work = cdot.root / "work.c"
    slow_src = work.read_text().replace("double s = 0.0;", "volatile double s = 0.0;")
    work.write_text(slow_src)
    git(cdot_repo, "commit", "-qam", "slow incumbent")
    fast = ("--- a/work.c\n+++ b/work.c\n@@ -3,3 +3,3 @@\n {\n-    volatile double s = 0.0;\n"
            "+    double s = 0.0;\n     for (long i = 0; i < n; i++)\n")
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings(delta=0.02, canary_every=0))
    lab.measure_noise()
    event = lab.experiment(Proposal(patch=fast, hypothesis="drop volatile"))
    assert event["verdict"]["status"] == "KEEP", event["verdict"]
    assert event["confirmation"]["status"] == "KEEP"
    msg = git(lab.workspace.worktree, "log", "-1", "--format=%B")
    # lab/fmt.py's rounding: 2 decimals (3 near 1x), the delta in %, never four decimals
    assert re.search(r"^speedup over the incumbent \d+\.\d{2,3}x \(99% CI \d+\.\d{2,3}-\d+\.\d{2,3}x, "
                     r"\d+ pairs, delta \d+(\.\d+)?%\); cumulative \d+\.\d{2,3}x$", msg, re.M), msg
    kept = [e for e in lab.folder.events() if e["type"] == "kept"]
    assert kept and kept[0]["commit"] == lab.workspace.head()
    assert "volatile" not in (lab.folder.path / "incumbent" / "work.c").read_text()


def kill_9_when_evaluating(cdot, cdot_repo, replay, evaluating: int, *extra) -> Path:
    """Start `lab run` on cdot with the replay, SIGKILL it once `evaluating` evaluations have
    started (none finished in between is the caller's to check): the run folder."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.cli", "run", str(cdot.root), *extra, "--agent", f"replay:{replay}",
         "--budget", "10m", "--quiet", "--runs", str(cdot_repo / "runs")],
        cwd=cdot_repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    run_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((cdot_repo / "runs").glob("cdot-*/events.jsonl"))
        if found:
            run_dir = found[0].parent
            if found[0].read_text().count('"type":"evaluating"') >= evaluating:
                break
        time.sleep(0.05)
    assert run_dir is not None and proc.poll() is None, \
        proc.communicate(timeout=5)[0] if proc.poll() is not None else "no run folder"
    os.kill(proc.pid, signal.SIGKILL)  # the lab itself, mid-evaluation
    proc.wait(10)
    return run_dir


def test_kill_9_mid_evaluation_then_resume(cdot, cdot_repo, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(json.dumps({"patch": sol(p), "hypothesis": h}) for p, h in [
        ("wrong/slower.patch", "volatile accumulator"),
        ("correct/two-accumulators.patch", "two chains"),
    ]) + "\n")
    run_dir = kill_9_when_evaluating(cdot, cdot_repo, replay, evaluating=1)

    shown = lab_cli("log", run_dir.name, cwd=cdot_repo)  # by name, under the default runs/
    assert shown.returncode == 0, shown.stderr
    folder = RunFolder.open(run_dir)
    events = folder.events()
    assert events[-1]["type"] == "evaluating" and not any(e["type"] == "evaluated" for e in events)
    assert _state(cdot_repo) == "died"

    resumed = lab_cli("run", "--resume", run_dir.name, "--agent", f"replay:{replay}", "--quiet", cwd=cdot_repo)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _state(cdot_repo) == "stopped"
    events = folder.events()
    numbers = [e["number"] for e in events if e["type"] == "evaluated"]
    assert numbers.count(1) == 1, "the interrupted experiment is finished exactly once"
    assert len([e for e in events if e["type"] == "proposed" and e["number"] == 1]) == 1


def _state(cdot_repo) -> str:
    out = lab_cli("status", "--json", cwd=cdot_repo)
    assert out.returncode == 0, out.stderr
    (run,) = json.loads(out.stdout)
    return run["state"]


class Lines:
    """A process's stderr, line by line, each with the time it arrived."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float) -> float:
        """When a line holding `text` arrived (waiting up to `timeout` s for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if text in line:
                    return at
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} within {timeout} s: {[x for _, x in self.lines]}")

    def text(self) -> str:
        self._thread.join(10)
        return "\n".join(x for _, x in self.lines)


def _stdout(proc, timeout: float) -> str:
    """The process's stdout once it ended (its stderr is Lines's alone: communicate would read it too)."""
    proc.wait(timeout)
    return proc.stdout.read()


def _run_until_evaluating(cdot, cdot_repo, patches):
    """`lab run` of cdot over `patches` (solution names), started as a person would start it
    (quiet, its own session so that only it gets our SIGINT); returns once #1 is evaluating."""
    replay = cdot_repo.parent / "replay.jsonl"
    replay.write_text("".join(json.dumps({"patch_file": str(CDOT / "solutions" / p)}) + "\n" for p in patches))
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", "cdot", "--agent", f"replay:{replay}",
                             "--budget", "10m", "--delta", "0.05", "--quiet"],
                            cwd=cdot_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err = Lines(proc.stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((cdot_repo / "runs").glob("cdot-*/events.jsonl"))
        if found and '"type":"evaluating"' in found[0].read_text():
            return proc, err, found[0].parent
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no evaluation started: {proc.communicate()[0][-2000:]} {err.text()[-2000:]}")


def test_ctrl_c_is_answered_at_once_and_the_evaluation_in_flight_is_finished(cdot, cdot_repo):
    proc, err, run_dir = _run_until_evaluating(cdot, cdot_repo, ["wrong/slower.patch", "correct/two-accumulators.patch"])
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    answered = err.wait_for("stopping after the evaluation in flight; Ctrl-C again to abandon it", 10)
    assert answered - sent < 2.0, f"answered after {answered - sent:.1f} s"
    out = _stdout(proc, timeout=300)
    assert proc.returncode == 0, out + err.text()
    events = RunFolder.open(run_dir).events()
    assert [e["number"] for e in events if e["type"] == "evaluated"] == [1], "#1 finished, #2 never asked for"
    assert events[-1]["type"] == "run_stopped" and events[-1]["reason"] == "stopped by Ctrl-C"
    assert f"resume: {sys.executable} -m lab.cli run --resume {run_dir.name}\n" in out, out
    assert _state(cdot_repo) == "stopped"


def test_a_second_ctrl_c_abandons_the_evaluation_and_says_how_to_resume(cdot, cdot_repo):
    proc, err, run_dir = _run_until_evaluating(cdot, cdot_repo, ["wrong/hang.patch"])  # would take 60 s
    os.kill(proc.pid, signal.SIGINT)
    err.wait_for("Ctrl-C again to abandon it", 10)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    out = _stdout(proc, timeout=30)
    assert time.monotonic() - sent < 15, "the evaluation in flight was abandoned, not waited for"
    assert proc.returncode == 130, out + err.text()
    text = err.text()
    assert "abandoning the evaluation in flight" in text and "aborted" not in text, text
    assert f"resume: {sys.executable} -m lab.cli run --resume {run_dir.name}" in text, text
    events = RunFolder.open(run_dir).events()
    assert not any(e["type"] == "evaluated" for e in events)
    assert events[-1]["type"] == "run_stopped" and "second Ctrl-C" in events[-1]["reason"]
    assert _state(cdot_repo) == "stopped"
