"""The loop's rules for a long unattended run (issue 21): failure streaks and plateaus inform
(a canary, research again, an instruction to change approach) and never stop the run; a canary
that finds the incumbent failing stops it; an API outage is not the agent's failure; the brief
carries the run memory, the time and money left; the draft check goes through the lab's own
evaluation path on public seeds and is recorded."""

import pytest

from test_loop_soak import quick_cdot

from lab.agents import Agent, AgentFatal, Proposal
from lab.envs import get
from lab.evaluate import Outcome
from lab.harness import load
from lab.loop import Lab, Settings
from lab.records import FAIL, Evaluation, Verdict

SQUARE = "        s += x[i] * x[i];\n"


def wrong(n: int) -> str:
    """A patch that builds and fails the oracle (and differs from every other one by its comment)."""
    return (f"diff --git a/work.c b/work.c\n--- a/work.c\n+++ b/work.c\n@@ -1,3 +1,4 @@\n"
            f"+/* wrong {n} */\n /* The editable surface of the cdot test harness: the sum of squares of x[0..n). */\n"
            " double work(const double *x, long n)\n {\n@@ -4,5 +5,5 @@\n"
            "     volatile double s = 0.0;\n     for (long i = 0; i < n; i++)\n-        s += x[i] * x[i];\n"
            "+        s += x[i];\n     return s;\n }\n")


OUTSIDE = "--- a/harness.py\n+++ b/harness.py\n@@ -1,1 +1,1 @@\n-x\n+y\n"


class Scripted(Agent):
    """Proposals from a list (Proposal objects); records every context it was given."""

    name = "scripted"

    def __init__(self, items):
        self.items = list(items)
        self.exhausted = False
        self.contexts = []
        self.researched = 0

    def research(self, ctx):
        self.researched += 1
        self.contexts.append(("research", ctx))
        return f"research list {self.researched}"

    def propose(self, ctx):
        self.contexts.append(("propose", ctx))
        if not self.items:
            self.exhausted = True
            return Proposal(failure="no more")
        item = self.items.pop(0)
        return item(ctx) if callable(item) else item


@pytest.fixture
def quick(cdot_repo):
    quick_cdot(cdot_repo)
    return load(cdot_repo / "harnesses" / "cdot")


def types(lab):
    return [e["type"] for e in lab.folder.events()]


def test_a_failure_streak_informs_and_never_stops(quick, cdot_repo):
    agent = Scripted([Proposal(patch=wrong(i), hypothesis=f"wrong idea {i}", learned=f"lesson {i}") for i in range(6)])
    lab = Lab.start(quick, cdot_repo / "runs", get("native"),
                    Settings(delta=0.05, canary_every=0, max_consecutive_failures=3, plateau_after=0))
    reason = lab.loop(agent)
    events = lab.folder.events()
    assert reason == "the agent has no more proposals"
    assert [e["verdict"]["status"] for e in events if e["type"] == "evaluated"] == ["FAIL"] * 6
    # at 3 and 6 in a row: a canary (the incumbent passes), research again, a change of approach
    assert [e.get("kind") or e["type"] for e in events
            if e["type"] in ("canary", "research") or e.get("kind") == "change_approach"] == [
        "research", "canary", "change_approach", "research", "canary", "change_approach", "research"]
    assert "change of approach: 3 evaluations in a row failed" in (lab.folder.path / "log.md").read_text()
    assert agent.researched == 3
    proposes = [c for kind, c in agent.contexts if kind == "propose"]
    assert proposes[2].direction == "" and "structurally different" in proposes[3].direction
    # failures come back with their outcome, oracle reason and lesson, in the memory too
    assert "wrong idea 2" in proposes[3].recent_failures[-1] and "oracle" in proposes[3].recent_failures[-1]
    assert "#3 FAIL" in proposes[3].memory and "lesson 2" in proposes[3].memory
    assert "research list 2" in proposes[3].memory


def test_a_canary_that_finds_the_incumbent_failing_stops_the_run(quick, cdot_repo, monkeypatch):
    real = Lab._evaluate

    def broken_machine(self, number, mode, delta):
        if str(number).startswith("canary"):
            ev = Evaluation(harness="cdot", status=FAIL, reason="oracle: got nan")
            return Outcome(ev, Verdict(status=FAIL, reason="oracle: got nan"), self.folder.path / "x.json")
        return real(self, number, mode, delta)

    monkeypatch.setattr(Lab, "_evaluate", broken_machine)
    agent = Scripted([Proposal(patch=OUTSIDE, hypothesis=f"outside {i}") for i in range(10)])
    lab = Lab.start(quick, cdot_repo / "runs", get("native"), Settings(delta=0.05, canary_every=3))
    reason = lab.loop(agent)
    assert reason.startswith("the incumbent stopped passing") and "got nan" in reason
    assert lab.state().proposed == 3 and types(lab).count("canary") == 1


def test_api_outages_are_not_the_agents_failures_and_a_failing_agent_is_paused(quick, cdot_repo, clock):
    outage = [Proposal(failure="api unavailable for 30 min", api_unavailable=True)] * 5

    def crash(ctx):
        raise OSError("disk full")

    lame = [Proposal(failure="submitted no change")] * 2
    agent = Scripted(outage + [crash] + lame)
    lab = Lab.start(quick, cdot_repo / "runs", get("native"),
                    Settings(delta=0.05, canary_every=0, max_consecutive_failures=3))
    slept = clock.slept
    reason = lab.loop(agent)
    events = lab.folder.events()
    assert reason == "the agent has no more proposals"
    failed = [e for e in events if e["type"] == "agent_failed"]
    assert [e["api_unavailable"] for e in failed] == [True] * 5 + [False] * 4
    changes = [e for e in events if e.get("kind") == "change_approach"]
    assert len(changes) == 1 and "3 proposals in a row failed" in changes[0]["why"]
    assert clock.slept - slept == pytest.approx(60.0)  # paused once, on the compressed clock
    assert failed[5]["reason"] == "the agent crashed: OSError: disk full"  # a crash is a failed proposal
    assert [e["kind"] for e in events if e["type"] == "agent_fault"] == ["agent_crash"]


def test_the_live_view_shows_the_agents_side():
    from lab.display import agent_rows

    events = [{"type": "proposed"}, {"type": "api_wait", "text": "API overloaded (529): waiting 40 s"},
              {"type": "agent_fault", "kind": "truncated"}, {"type": "agent_fault", "kind": "truncated"},
              {"type": "note", "kind": "draft_check", "passed": True}, {"type": "note", "kind": "change_approach"},
              {"type": "api_wait", "text": "API overloaded (529): waiting 80 s, 1 min into this outage"}]
    rows = dict(agent_rows(events))
    assert rows["api"] == "now: API overloaded (529): waiting 80 s, 1 min into this outage; 2 wait(s) so far"
    assert rows["faults"] == "truncated 2" and "1 draft check(s) (1 passed)" in rows["agent"]
    assert "1 change(s) of approach" in rows["agent"]
    rows = dict(agent_rows(events + [{"type": "api_recovered"}]))
    assert rows["api"] == "2 wait(s) so far"


def test_the_brief_carries_memory_time_money_and_a_recorded_draft_check(quick, cdot_repo, clock):
    seen = {}

    def second(ctx):
        seen["ctx"] = ctx
        tree = ctx.scratch / "draft"
        tree.mkdir(parents=True)
        (tree / "work.c").write_text((ctx.incumbent_tree / "work.c").read_text().replace(SQUARE, "        s += x[i];\n"))
        seen["failing"] = ctx.check(tree, False)
        (tree / "work.c").write_text((ctx.incumbent_tree / "work.c").read_text())
        seen["passing"] = ctx.check(tree, True)
        return Proposal(failure="done checking")

    agent = Scripted([Proposal(patch=wrong(1), hypothesis="wrong idea", next_idea="try unrolling", cost_usd=1.5),
                      second])
    lab = Lab.start(quick, cdot_repo / "runs", get("native"),
                    Settings(delta=0.05, canary_every=0, budget_s=3600, max_usd=10))
    lab.loop(agent)
    ctx = seen["ctx"]
    assert 0 < ctx.seconds_left < 3600 and ctx.usd_left == pytest.approx(8.5) and ctx.spent_usd == pytest.approx(1.5)
    assert "#1 FAIL" in ctx.memory and "try unrolling" in ctx.memory
    assert seen["failing"].startswith("oracle on public seeds [1, 2]: FAIL")
    assert seen["passing"].startswith("oracle on public seeds [1, 2]: PASS") and "quick timing" in seen["passing"]
    checks = [e for e in lab.folder.events() if e.get("kind") == "draft_check"]
    assert [c["passed"] for c in checks] == [False, True] and checks[0]["seeds"] == [1, 2]
    assert "draft check 2" in (lab.folder.path / "log.md").read_text()


def test_a_fatal_error_in_research_stops_the_run_cleanly(quick, cdot_repo):
    class NoCredit(Scripted):
        def research(self, ctx):
            raise AgentFatal("the Anthropic account may not spend more")

    lab = Lab.start(quick, cdot_repo / "runs", get("native"), Settings(delta=0.05, canary_every=0))
    reason = lab.loop(NoCredit([]))
    assert reason == "the agent cannot go on: the Anthropic account may not spend more"
    assert types(lab)[-2:] == ["agent_failed", "run_stopped"]
