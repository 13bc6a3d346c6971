"""Parallel experiments on one host (lab/slots.py, lab/executors.py, lab/scheduler.py, lab/loop.py):
slots, verdicts, stale keeps, resume."""

import difflib
import json
import os
import time
from types import SimpleNamespace

import pytest

from lab.agents import Proposal
from lab.envs import get
from lab.errors import LabError
from lab.executors import LocalExecutor
from lab.loop import Lab, Settings
from lab.records import KEEP
from lab.slots import check_gpus, parse_gpus, plan_slots
from lab.store import RunFolder
from lab.workspace import git

from conftest import lab_cli
from test_loop import OUTSIDE, ListAgent, kill_9_when_evaluating, sol

# An incumbent with two independent slow halves: fixing either one is a KEEP, and the two
# fixes touch lines far enough apart that each still applies after the other was kept.
TWO_SLOW = """/* The editable surface of the cdot test harness: the sum of squares of x[0..n). */
static double half_a(const double *x, long n)
{
    volatile double s = 0.0;
    for (long i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}

/* (spacer) */

static double half_b(const double *x, long n)
{
    volatile double s = 0.0;
    for (long i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}

double work(const double *x, long n)
{
    return half_a(x, n / 2) + half_b(x + n / 2, n - n / 2);
}
"""
FIX_A = ("--- a/work.c\n+++ b/work.c\n@@ -3,3 +3,3 @@\n {\n-    volatile double s = 0.0;\n"
         "+    double s = 0.0;\n     for (long i = 0; i < n; i++)\n")
FIX_B = ("--- a/work.c\n+++ b/work.c\n@@ -13,3 +13,3 @@\n {\n-    volatile double s = 0.0;\n"
         "+    double s = 0.0;\n     for (long i = 0; i < n; i++)\n")


def parallel_lab(cdot, repo, settings, slots=2):
    lab = Lab.start(cdot, repo / "runs", get("native"), settings)
    return lab.attach(LocalExecutor(cdot, get("native")), plan_slots(list(range(slots)), allowed=[0, 1]))


def by_number(events, type_):
    return {e["number"]: e for e in events if e["type"] == type_}


# --- slots and bad input ------------------------------------------------------------------------
def test_slots_get_disjoint_cpu_sets_and_leave_a_core_to_the_lab():
    slots = plan_slots([0, 1], allowed=[0, 1, 2, 3, 4])
    assert [s.gpu for s in slots] == [0, 1]
    assert slots[0].cpus == [3, 4] and slots[1].cpus == [1, 2]
    assert all(0 not in s.cpus for s in slots)  # the lab, the agent and its compiles keep core 0
    two = plan_slots([0, 1], allowed=[0, 1])
    assert two[0].cpus == [1] and two[1].cpus == [0]


def test_slots_prefer_the_gpus_numa_node(tmp_path):
    for node, cpus in ((0, "0-3"), (1, "4-7")):
        d = tmp_path / f"sys/devices/system/node/node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    slots = plan_slots([0, 1], nodes={0: 1, 1: 0}, allowed=list(range(8)), root=tmp_path)
    assert set(slots[0].cpus) <= {4, 5, 6, 7} and set(slots[1].cpus) <= {0, 1, 2, 3}


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, count, busy=(), pid=4242):
        self.count, self.busy, self.pid = count, set(busy), pid

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=self.pid)] if h in self.busy else []


def test_bad_gpus_are_refused_with_one_clear_line():
    gpu = SimpleNamespace(environment=SimpleNamespace(needs_gpu=True))
    with pytest.raises(LabError, match="GPU 2 does not exist: this machine has GPUs 0-1"):
        check_gpus(gpu, [0, 2], nvml=FakeNvml(2))
    with pytest.raises(LabError, match="GPU 1 is busy: process 4242"):
        check_gpus(gpu, [0, 1], nvml=FakeNvml(2, busy=[1]))
    check_gpus(gpu, [0, 1], nvml=FakeNvml(2))
    check_gpus(gpu, [0, 1], nvml=FakeNvml(2, busy=[0], pid=os.getpid()))  # the lab's own process
    check_gpus(SimpleNamespace(environment=SimpleNamespace(needs_gpu=False)), [7, 9])  # virtual GPUs
    for text in ("0,x", "0,0", "-1"):
        with pytest.raises(LabError, match="--gpus"):
            parse_gpus(text)


# --- the parallel loop on cdot --------------------------------------------------------------------
@pytest.mark.slow
def test_two_slots_give_the_sequential_verdicts_and_the_branch_holds_only_keeps(cdot, cdot_repo):
    items = [(sol("wrong/slower.patch"), "volatile accumulator"), (sol("wrong/skip-half.patch"), "skip half"),
             (OUTSIDE, "edit the harness")]
    settings = Settings(budget_s=600, delta=0.02, canary_every=0)
    seq = Lab.start(cdot, cdot_repo / "runs", get("native"), settings)
    assert seq.loop(ListAgent(items)) == "the agent has no more proposals"
    par = parallel_lab(cdot, cdot_repo, settings)
    assert par.loop(ListAgent(items)) == "the agent has no more proposals"

    def verdicts(lab):
        events = lab.folder.events()
        return ({n: e["verdict"]["status"] for n, e in by_number(events, "evaluated").items()},
                {n: e["reason"] for n, e in by_number(events, "rejected").items()})

    assert verdicts(par) == verdicts(seq) == ({1: "WORSE", 2: "FAIL"}, {3: "outside the editable surface"})
    events = par.folder.events()
    evaluated = [e for e in events if e["type"] == "evaluated"]
    assert {e["slot"] for e in evaluated} == {0, 1}, "both slots evaluated"
    assert all(e["worker"]["executor"] == "local" and e["fingerprint"] for e in evaluated)
    assert par.workspace.head() == par.folder.meta["base_commit"]
    assert par.state().open_proposals == {}


@pytest.mark.slow
def test_a_second_winner_against_an_old_incumbent_is_retimed_against_the_new_one(cdot, cdot_repo):
    (cdot.root / "work.c").write_text(TWO_SLOW)
    git(cdot_repo, "commit", "-qam", "two slow halves")
    lab = parallel_lab(cdot, cdot_repo, Settings(budget_s=600, delta=0.02, canary_every=0))
    lab.loop(ListAgent([(FIX_A, "fast half a"), (FIX_B, "fast half b")]))
    events = lab.folder.events()
    evaluated = by_number(events, "evaluated")
    assert [evaluated[n]["status"] for n in (1, 2)] == [KEEP, KEEP], [e["verdict"] for e in evaluated.values()]
    stale = [e for e in events if e["type"] == "stale_keep"]
    assert len(stale) == 1, "exactly one of the two won against an incumbent that had moved on"
    second = stale[0]["number"]
    first = 3 - second
    kept = [e for e in events if e["type"] == "kept"]
    assert [e["number"] for e in kept] == [first, second]
    assert evaluated[second]["measured_against"] == kept[0]["commit"]  # re-timed against the new one
    assert evaluated[second]["record"].endswith("retime1/record.json")
    log = git(lab.workspace.worktree, "log", "--format=%s", f"{lab.folder.meta['base_commit']}..HEAD")
    assert len(log.splitlines()) == 2  # the branch holds the two keeps and nothing else
    assert "volatile" not in (lab.folder.path / "incumbent" / "work.c").read_text()


def test_a_winner_that_no_longer_applies_is_rejected_as_stale(cdot, cdot_repo):
    """Drive the decision directly: a KEEP measured against an incumbent that has moved on, whose
    patch conflicts with the new incumbent, is rejected 'stale' and nothing reaches the branch."""
    lab = parallel_lab(cdot, cdot_repo, Settings(delta=0.02, canary_every=0))
    slot = lab.slots[0]
    conflicting = sol("correct/two-accumulators.patch")
    # Someone else's keep lands while this candidate is timed: simulate with the executor.
    real = lab.executor.evaluate

    def evaluate_then_land_another_keep(s, req, on_lost=None):
        result = real(s, req, on_lost)
        from lab.records import KEEP, Verdict

        result.outcome.verdict = Verdict(KEEP, median=-0.5, ci_low=-0.6, ci_high=-0.4, delta=0.02, pairs=20)
        if not any(e["type"] == "kept" for e in lab.folder.events()):
            with lab.lock:
                state = lab.state()
                other = sol("wrong/slower.patch")
                commit, h = lab.workspace.apply(other, "lab #0: other", set())
                lab._commit_keep({"number": 0, "description": "other", "source_hash": h,
                                  "verdict": {"median": -0.1, "ci_low": -0.2, "ci_high": -0.05,
                                              "pairs": 20, "delta": 0.02}}, state)
        return result

    lab.executor.evaluate = evaluate_then_land_another_keep
    lab.folder.append("proposed", number=1, hypothesis="two chains", ledger="0001", cost_usd=0)
    assert lab.experiment_on(slot, Proposal(patch=conflicting, hypothesis="two chains"), 1)["type"] == "rejected"
    events = lab.folder.events()
    assert [e["type"] for e in events if e["type"] in ("stale_keep", "rejected")] == ["stale_keep", "rejected"]
    rejected = [e for e in events if e["type"] == "rejected"][0]
    assert rejected["reason"] == "stale" and "does not apply" in rejected["detail"]
    assert [e["number"] for e in events if e["type"] == "kept"] == [0]


@pytest.mark.slow
def test_kill_9_of_a_parallel_run_then_resume_loses_nothing_and_runs_nothing_twice(cdot, cdot_repo, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(json.dumps({"patch": sol(p), "hypothesis": h}) for p, h in [
        ("wrong/slower.patch", "volatile accumulator"),
        ("wrong/skip-half.patch", "skip half"),
        ("correct/two-accumulators.patch", "two chains"),
    ]) + "\n")
    run_dir = kill_9_when_evaluating(cdot, cdot_repo, replay, 2, "--gpus", "0,1")
    folder = RunFolder.open(run_dir)
    from lab.loop import RunState

    before = RunState.from_events(folder.events(), folder.meta)
    assert len(before.open_proposals) >= 2, "two proposals were in flight"

    resumed = lab_cli("run", "--resume", str(run_dir), "--agent", f"replay:{replay}", "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    events = folder.events()
    finished = [e["number"] for e in events if e["type"] in ("evaluated", "rejected")]
    assert sorted(finished) == [1, 2, 3], "every proposal finished exactly once"
    assert sorted(e["number"] for e in events if e["type"] == "proposed") == [1, 2, 3]
    assert RunState.from_events(events, folder.meta).open_proposals == {}
    assert [len(e["slots"]) for e in events if e["type"] == "workers"] == [2, 2], "the resume kept --gpus 0,1"


def test_skypilot_writes_a_task_that_starts_ray_workers_in_the_harness_image(cdot, tmp_path):
    out = tmp_path / "cdot.sky.yaml"
    shown = lab_cli("skypilot", str(cdot.root), "--image", "registry.example/cdot@sha256:" + "0" * 64,
                    "--nodes", "3", "-o", str(out))
    assert shown.returncode == 0, shown.stderr
    text = out.read_text()
    assert "num_nodes: 3" in text and "image_id: docker:registry.example/cdot@sha256:" in text
    assert "ray start --head --port=6379" in text and 'ray start --address="$head:6379"' in text
    assert '\\"lab_slot\\": 1' in text  # a CPU harness: its workers declare their slots
    missing = lab_cli("skypilot", str(cdot.root), "-o", str(tmp_path / "x.yaml"))
    assert missing.returncode == 2 and "no published image" in missing.stderr


@pytest.mark.slow
def test_a_canary_runs_on_one_slot_while_the_other_goes_on(cdot, cdot_repo, monkeypatch):
    """Run under the agent lock, a canary stalled every slot (the two-H200 run lost ~35 s to one):
    while the first canary runs, the other slot must still get a proposal."""
    lab = parallel_lab(cdot, cdot_repo, Settings(budget_s=600, delta=0.02, canary_every=2))
    seen = []
    plain_canary = lab.canary

    def proposals():
        return sum(e["type"] == "proposed" for e in lab.folder.events())

    def watched_canary(at=None):
        before, deadline = proposals(), time.monotonic() + 30
        while proposals() == before and time.monotonic() < deadline:
            time.sleep(0.1)
        seen.append((at, proposals() - before))
        plain_canary(at=at)

    monkeypatch.setattr(lab, "canary", watched_canary)
    original = (cdot.root / "work.c").read_text()
    items = [("".join(difflib.unified_diff(original.splitlines(True),
                                          (original + f"// comment {i}\n").splitlines(True),
                                          "a/work.c", "b/work.c")), f"comment {i}") for i in range(5)]
    lab.loop(ListAgent(items))
    assert seen and seen[0] == (2, 1), f"the other slot waited for the canary: {seen}"
    assert [e["at"] for e in lab.folder.events() if e["type"] == "canary"] == [at for at, _ in seen]
