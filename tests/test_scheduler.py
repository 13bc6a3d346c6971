"""One scheduler (lab/scheduler.py, lab/loop.py): a sequential run is one local slot dispatched on
the calling thread, a run of several slots the same loop with a thread per further slot, and the
decision rules (a KEEP confirmed in a fresh process, else SAME) exist once for both. The executor
here is a script of verdicts, so the rules are checked without timing anything."""

import threading
import time
from pathlib import Path

import pytest

from lab.agents import Proposal
from lab.envs import get
from lab.evaluate import Outcome
from lab.executors import LocalExecutor, Result
from lab.loop import Lab, Settings
from lab.records import KEEP, SAME, WORSE, Evaluation, Verdict
from lab.slots import Slot, sequential_slot

from test_loop import ListAgent, sol



def variant(k: int) -> str:
    """A patch that changes the source (not the speed) of work.c: a new candidate each k."""
    return ("--- a/work.c\n+++ b/work.c\n@@ -3,3 +3,3 @@\n {\n-    double s = 0.0;\n"
            f"+    double s = 0.0 * {k};\n     for (long i = 0; i < n; i++)\n")


class ScriptedExecutor:
    """Verdicts from a list, in order; records the label, slot and thread of every evaluation."""

    name = "scripted"

    def __init__(self, verdicts, fingerprints=None, seconds=0.0):
        self.verdicts, self.fingerprints, self.seconds = list(verdicts), list(fingerprints or []), seconds
        self.calls = []

    def evaluate(self, slot, req, on_lost=None):
        self.calls.append((req.label, slot.index, threading.current_thread().name))
        time.sleep(self.seconds)
        status = self.verdicts.pop(0)
        fingerprint = self.fingerprints.pop(0) if self.fingerprints else {"cpu": {"model": "x"}}
        median = {KEEP: -0.5, SAME: 0.0, WORSE: 0.5}[status]
        verdict = Verdict(status, median=median, ci_low=median - 0.1, ci_high=median + 0.1, delta=0.02, pairs=20)
        record = Path(req.work) / "record.json"
        return Result(Outcome(Evaluation(harness="cdot", fingerprint=fingerprint), verdict, record),
                      {"executor": self.name, "thread": threading.current_thread().name, **slot.describe()})


def scripted_lab(cdot, cdot_repo, executor, slots=None, **settings):
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings(canary_every=0, delta=0.02, **settings))
    lab.folder.append("noise_floor", noise_floor=0.01, delta=0.02, pairs=20, report={}, label="baseline")
    lab.folder.append("baseline", metric=1.0)  # the loop measures nothing itself
    return lab.attach(executor, slots or [sequential_slot()])


def test_a_new_lab_is_the_sequential_runs_one_local_slot(cdot, cdot_repo):
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings(gpu_index=3))
    assert isinstance(lab.executor, LocalExecutor) and lab.slots == [Slot(0, 3, None, own_gpu=False)]


@pytest.mark.parametrize("slots", [1, 2])
def test_a_keep_stands_only_when_its_confirmation_says_keep_on_the_same_machine(cdot, cdot_repo, slots):
    plan = [Slot(i, i, None) for i in range(slots)]
    other = {"cpu": {"model": "another machine"}}
    lab = scripted_lab(cdot, cdot_repo, ScriptedExecutor([KEEP, SAME, KEEP, KEEP, KEEP, KEEP],
                                                         [None, None, None, other, None, None]), plan)
    for n, text in enumerate(("said SAME", "another machine", "kept"), start=1):
        lab.folder.append("proposed", number=n, hypothesis=text, ledger=f"{n:04d}", cost_usd=0)
        event = lab.experiment_on(plan[-1], Proposal(patch=variant(n), hypothesis=text), n)
        if text == "kept":
            assert event["verdict"]["status"] == KEEP and event["status"] == KEEP
        else:
            assert event["verdict"]["status"] == SAME and event["status"] == SAME
            assert event["verdict"]["reason"].startswith("not confirmed: the confirming run")
            assert text.split()[-1] in event["verdict"]["reason"]
            assert lab.workspace.head() == lab.folder.meta["base_commit"], "nothing reached the branch"
    assert [e["number"] for e in lab.folder.events() if e["type"] == "kept"] == [3]
    assert "0.0 * 3" in (lab.folder.path / "incumbent" / "work.c").read_text()
    assert [label for label, _, _ in lab.executor.calls] == ["0001", "0001-confirm", "0002", "0002-confirm",
                                                            "0003", "0003-confirm"]


def test_the_sequential_loop_runs_on_the_calling_thread(cdot, cdot_repo):
    executor = ScriptedExecutor([WORSE, WORSE])
    lab = scripted_lab(cdot, cdot_repo, executor)
    agent = ListAgent([(sol("wrong/slower.patch"), "volatile"), (sol("wrong/skip-half.patch"), "skip half")])
    assert lab.loop(agent) == "the agent has no more proposals"
    assert {thread for _, _, thread in executor.calls} == {threading.current_thread().name}
    events = lab.folder.events()
    assert [len(e["slots"]) for e in events if e["type"] == "workers"] == [1]
    assert [(e["slot"], e["worker"]["executor"]) for e in events if e["type"] == "evaluated"] == [(0, "scripted")] * 2


def test_further_slots_get_threads_of_their_own(cdot, cdot_repo):
    executor = ScriptedExecutor([WORSE, WORSE], seconds=1.0)  # both slots busy at once
    lab = scripted_lab(cdot, cdot_repo, executor, [Slot(0, 0), Slot(1, 1)])
    agent = ListAgent([(sol("wrong/slower.patch"), "volatile"), (sol("wrong/skip-half.patch"), "skip half")])
    assert lab.loop(agent) == "the agent has no more proposals"
    assert {(slot, thread) for _, slot, thread in executor.calls} == {
        (0, threading.current_thread().name), (1, "lab-slot-1")}
    assert lab.state().open_proposals == {} and lab.workspace.head() == lab.folder.meta["base_commit"]
