"""The night, compressed: `lab run cdot --agent anthropic --budget 8h` against the fake Messages API
with every fault it injects (minutes of 529, 429 with retry-after and rate-limit resets, errors
mid-stream, malformed tool inputs, truncated and refused answers, slow streams, reads of the
answers), through hundreds of episodes. Time is compressed (lab.agents.clock): the API's waits
and the model's latency move a fake clock, evaluations run for real on a quick copy of cdot.

Asserts the run is alive at the end (stopped by its budget), every fault served is in the
events, and nothing is lost (every proposal has its ledger entry, transcript and outcome)."""

import json
import random
import re
import time

import pytest
from click.testing import CliRunner

pytest.importorskip("anthropic")

from fake_anthropic import (FakeAnthropic, FakeClock, error, reply, stream_error, text, thinking,  # noqa: E402
                            tool_use)
from lab.agents import clock as agent_clock  # noqa: E402
from lab.cli import cli  # noqa: E402
from lab.harness import load, write_lock  # noqa: E402
from lab.store import RunFolder  # noqa: E402
from lab.workspace import git  # noqa: E402

KEY = "sk-ant-" + "test-SOAKsecret0123456789abcd"
SLOW = "    volatile double s = 0.0;\n"
FAST = "    double s = 0.0;\n"
SQUARE = "        s += x[i] * x[i];\n"
LATENCY_S = 22.0  # fake seconds per request: the model's time to answer
EPISODES_WANTED = 200


def submit(h, **notes):
    return tool_use("submit", {"hypothesis": h, **notes})


def comment(n):
    return tool_use("editor", {"command": "insert", "path": "work.c", "insert_line": 0,
                               "insert_text": f"/* soak idea {n} */"})


class Night:
    """The fake API's side: research answers, and for each proposal episode a plan (a list of
    entries, one a request) chosen in a fixed random order, with faults among them."""

    MALFORMED = [
        {"command": "view", "path": 123},
        {"command": "insert", "path": "work.c", "insert_line": 0, "insert_text": None},
        {"command": "view", "path": "work.c\u0000.patch"},
        {"command": "view", "path": "x" * 5000},
        {"command": "create", "path": ["work.c"], "file_text": "int x;"},
        {"command": "str_replace", "path": "work.c", "old_str": "a", "new_str": "b", "bogus": 1},
        {"command": "explode", "path": "work.c"},
        {"command": "view", "path": "work.c", "view_range": ["a", None]},
        {"command": "view", "path": "\udcff\udcfe"},
        "not an object",
    ]
    PRIVATE = ["solutions/correct/two-accumulators.patch", "solutions", "./solutions/../solutions/wrong",
               "lock.json/../solutions/correct/two-accumulators.patch"]

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.rng = random.Random(21)
        self.plan: list = []
        self.pos = 0
        self.last_error = False
        self.episodes = 0
        self.research = 0
        self.malformed_sent = 0
        self.private_sent = 0
        self.outage_until = 0.0
        self.fail_streak_left = 0
        self.kinds: list[str] = []

    def __call__(self, body: dict, index: int) -> dict:
        system = json.dumps(body.get("system", ""))
        if "research agent" in system:
            return self._research()
        if self.clock.now() < self.outage_until:  # minutes of 529, whatever is asked
            self.last_error = True
            return error(529, "Overloaded", retry_after=None)
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if turn == 0 and not self.last_error:
            self._new_episode()
        entry = self.plan[self.pos] if self.pos < len(self.plan) else reply(submit("(plan ran out)"))
        self.pos += 1
        if entry == "OUTAGE":
            self.outage_until = self.clock.now() + self.rng.choice([180, 600, 1500, 2400])
            self.last_error = True
            return error(529, "Overloaded", retry_after=None)
        self.last_error = entry["kind"] != "message"
        return entry

    def _research(self):
        self.research += 1
        if self.research % 3 == 2:
            self.last_error = True
            return error(429, "rate limited", retry_after=30)
        return reply(tool_use("finish_research", {"hypotheses": f"1. idea set {self.research}\n2. more"}))

    def _new_episode(self):
        self.episodes += 1
        self.pos = 0
        n = self.episodes
        if n == 1:  # the one real speedup of the night
            kind = "keep"
        elif self.fail_streak_left:
            kind = "fail"
            self.fail_streak_left -= 1
        elif n == 40:  # a streak of wrong ideas: a canary and a change of approach follow
            kind, self.fail_streak_left = "fail", 7
        else:
            kind = self.rng.choices(
                ["outage", "rate_limited", "stream_error", "malformed", "truncated", "truncated3", "refusal",
                 "slow", "duplicate", "nochange", "private", "same", "check", "server_error"],
                weights=[6, 8, 6, 10, 8, 2, 4, 6, 16, 8, 6, 1, 1, 4])[0]
        self.kinds.append(kind)
        think = thinking("Considering the loop. " * 5)
        done = reply(submit(f"dup idea {n % 2}", learned="comments change nothing",
                            next_idea="unroll by four"))
        # most episodes end without a proposal (no change submitted): the lab's evaluations are
        # real, and the soak is about the agent's side; a third submit a duplicate (rejected)
        edit = (tool_use("editor", {"command": "insert", "path": "work.c", "insert_line": 0,
                                    "insert_text": f"/* soak dup {n % 2} */"}) if self.rng.random() < 0.25 else
                tool_use("editor", {"command": "view", "path": "work.c", "view_range": [1, 3]}))
        dup = [reply(think, edit), done]
        if kind == "keep":
            plan = [reply(think, text("The accumulator is volatile."),
                          tool_use("editor", {"command": "str_replace", "path": "work.c", "old_str": SLOW,
                                              "new_str": FAST})),
                    reply(submit("drop the volatile accumulator", learned="volatile forces a store per add",
                                 next_idea="two accumulators"))]
        elif kind == "fail":
            plan = [reply(think, comment(n), tool_use("editor", {"command": "str_replace", "path": "work.c",
                                                                 "old_str": SQUARE, "new_str": "        s += x[i];\n"})),
                    reply(submit(f"skip the multiply {n}", learned="wrong on purpose"))]
        elif kind == "outage":
            plan = ["OUTAGE"] + dup
        elif kind == "rate_limited":
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.wall() + 45))
            plan = [error(429, "rate limited", retry_after=self.rng.choice([5, 30, 90])),
                    error(429, "rate limited", retry_after=None,
                          headers={"anthropic-ratelimit-tokens-remaining": "0",
                                   "anthropic-ratelimit-tokens-reset": reset})] + dup
        elif kind == "stream_error":
            plan = [dup[0], stream_error("overloaded_error"), dup[1]]
        elif kind == "server_error":
            plan = [error(500, "internal", retry_after=None), error(503, "unavailable", retry_after=2)] + dup
        elif kind == "malformed":
            bad = self.rng.sample(self.MALFORMED, 3)
            self.malformed_sent += 3
            plan = [reply(think, *(tool_use("editor", b) for b in bad)), *dup]
        elif kind == "private":
            self.private_sent += 1
            plan = [reply(tool_use("editor", {"command": "view", "path": self.rng.choice(self.PRIVATE)})), *dup]
        elif kind == "truncated":
            cut = reply(think, tool_use("editor", {"command": "create", "path": "work.c", "file_text": "x"}),
                        stop_reason="max_tokens", partial_json='{"command": "create", "path": "work.c", "file_te')
            plan = [cut, *dup]
        elif kind == "truncated3":
            cut = reply(text("A long answer"), stop_reason="max_tokens")
            plan = [cut, cut, cut]
        elif kind == "refusal":
            plan = [reply(text("I can't help with that."), stop_reason="refusal")]
        elif kind == "slow":
            plan = [reply(think, dup[0]["content"][0], slow_s=20.0), reply(*done["content"], slow_s=20.0)]
        elif kind == "duplicate":
            plan = dup
        elif kind == "nochange":
            plan = [reply(tool_use("editor", {"command": "view", "path": "work.c"})), done]
        elif kind == "same":
            plan = [reply(comment(n)), reply(submit(f"a comment {n}"))]
        else:  # check: a draft check on the public seeds, then submit
            plan = [reply(comment(n)), reply(tool_use("check", {"timing": n % 2 == 0})),
                    reply(submit(f"checked comment {n}"))]
        self.plan = plan


def quick_cdot(repo):
    """The test harness with short timings (the lab's loop is under test, not the statistics)."""
    path = repo / "harnesses" / "cdot" / "harness.py"
    text_ = path.read_text()
    for old, new in (("N = 1 << 18", "N = 1 << 15"), ("min_timing_seconds = 0.3", "min_timing_seconds = 0.05"),
                     ("max_timing_seconds = 3.0", "max_timing_seconds = 1.0")):
        assert old in text_
        text_ = text_.replace(old, new)
    path.write_text(text_)
    work = repo / "harnesses" / "cdot" / "work.c"
    work.write_text(work.read_text().replace(FAST, SLOW))
    write_lock(load(repo / "harnesses" / "cdot"))
    git(repo, "commit", "-qam", "quick, slow cdot")


def test_a_night_of_faults_compressed(cdot_repo, tmp_path, monkeypatch):
    started = time.monotonic()
    quick_cdot(cdot_repo)
    clock = FakeClock()
    night = Night(clock)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    previous = agent_clock.use(clock)
    try:
        with FakeAnthropic(night, clock=clock, latency_s=LATENCY_S) as api:
            monkeypatch.setenv("ANTHROPIC_BASE_URL", api.url)
            result = CliRunner().invoke(cli, ["run", str(cdot_repo / "harnesses" / "cdot"), "--agent", "anthropic",
                                              "--budget", "8h", "--runs", str(cdot_repo / "runs")],
                                        catch_exceptions=False)
    finally:
        agent_clock.use(previous)
    seconds = time.monotonic() - started
    out = result.output
    assert result.exit_code == 0, out[-3000:]
    assert "estimated agent cost" in out and "spend limit $100.00" in out
    folder = RunFolder(re.search(r"run folder: (\S+)", out).group(1))
    events = folder.events()
    assert "estimated agent cost" in (folder.path / "log.md").read_text()
    stopped = [e for e in events if e["type"] == "run_stopped"]

    # alive at the end: the budget ended the night, nothing else
    assert len(stopped) == 1 and stopped[0]["reason"] == "the time budget cannot fit another evaluation", stopped
    assert clock.offset > 7.5 * 3600
    episodes = sorted(folder.path.glob("agent/episode-*.jsonl"))
    assert night.episodes >= EPISODES_WANTED and len(episodes) >= night.episodes - 1

    # every fault served is recorded: each HTTP error or error mid-stream is a wait (or a give-up)
    served = sum(n for k, n in api.faults.items() if k.startswith("http_")) + api.faults["stream_error"]
    waits = [e for e in events if e["type"] == "api_wait"]
    # (a connection dropped by a loaded machine would be a wait of its own kind, recorded too)
    assert len([w for w in waits if w["kind"] not in ("connection", "timeout")]) == served > 0
    assert {w["kind"] for w in waits} >= {"overloaded", "rate_limited", "server_error"}
    assert any(w.get("gave_up") for w in waits)  # a 40-minute outage outlasted the 30-minute wait
    assert any(e["type"] == "api_recovered" for e in events)
    faults = [e for e in events if e["type"] == "agent_fault"]
    by_kind = {k: sum(1 for f in faults if f["kind"] == k) for k in ("truncated", "refusal", "bad_tool_input")}
    assert by_kind["truncated"] == api.faults["max_tokens"] > 0
    assert by_kind["refusal"] == api.faults["refusal"] > 0
    assert by_kind["bad_tool_input"] + sum(1 for f in faults if f["kind"] == "tool_crash") >= night.malformed_sent * 0.5
    assert not any(f["kind"] == "tool_crash" for f in faults), [f for f in faults if f["kind"] == "tool_crash"]
    # the API's outages are not the agent's failures
    unavailable = [e for e in events if e["type"] == "agent_failed" and e.get("api_unavailable")]
    assert unavailable

    # nothing lost: every proposal has its ledger entry and an outcome; views match the events
    proposed = [e for e in events if e["type"] == "proposed"]
    outcome = {e["number"] for e in events if e["type"] in ("evaluated", "rejected")}
    assert [e["number"] for e in proposed] == list(range(1, len(proposed) + 1))
    assert {e["number"] for e in proposed} == outcome
    for e in proposed:
        assert (folder.ledger / f"{e['ledger']}.patch").read_text()
    assert [e["seq"] for e in events] == list(range(len(events)))
    evaluated = [e for e in events if e["type"] == "evaluated"]
    assert len((folder.path / "results.tsv").read_text().splitlines()) == len(evaluated) + 1
    assert [e["verdict"]["status"] for e in evaluated][0] == "KEEP"
    assert sum(1 for e in evaluated if e["verdict"]["status"] == "FAIL") >= 8
    # the failure streak informed: a canary, research again, a change of approach; no stop
    assert any(e.get("kind") == "change_approach" for e in events) and sum(1 for e in events if e["type"] == "research") >= 2
    assert not any(e.get("incumbent_failed") for e in events if e["type"] == "canary")
    assert any(e.get("kind") == "draft_check" for e in events)
    # the answers were never shown: every private view was an error result
    shown = [line for path in episodes for line in path.read_text().splitlines()
             if "two independent chains" in line or "s1 += x[i + 1]" in line]
    assert night.private_sent and not shown
    assert KEY not in "".join(p.read_text() for p in folder.path.rglob("*.jsonl"))
    print(f"\nsoak: {night.episodes} episodes, {len(proposed)} proposals, {len(evaluated)} evaluations, "
          f"{len(waits)} API waits, {len(faults)} agent faults, {clock.offset / 3600:.1f} h compressed "
          f"into {seconds:.0f} s; faults served {dict(api.faults)}")
    assert seconds < 120
