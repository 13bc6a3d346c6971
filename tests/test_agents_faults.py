"""The anthropic agent under faults, one point at a time (issue 21; 16.6): total tools, private
paths, bounded reads, a profiler that hangs, truncated and refused answers, a busy API (529,
429 with retry-after and rate-limit resets, errors mid-stream, stalls, a server that is down),
what never clears (stops at once), the model settings sent, the caps, the draft check, the
history, and the notes a submit carries."""

import datetime
import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest

pytest.importorskip("anthropic")

from fake_anthropic import (FakeAnthropic, error, reply, stall, stream_error, text,  # noqa: E402
                            thinking, tool_use)
from test_agents import CDOT, KEY, CompileStub, agent, tool_results  # noqa: E402

from lab.agents import AgentContext, AgentFatal  # noqa: E402
from lab.agents import clock as agent_clock  # noqa: E402
from lab.agents.anthropic_agent import validate_input, EDITOR_TOOL  # noqa: E402
from lab.agents.tools import ToolError, Workbench, stage_scratch  # noqa: E402
from lab.store import RunFolder  # noqa: E402


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("LAB_PRICES", raising=False)


@pytest.fixture
def harness(tmp_path):
    import shutil

    root = tmp_path / "harness"
    shutil.copytree(CDOT, root, ignore=shutil.ignore_patterns("__pycache__", "lock.json"))
    (root / "references").mkdir()
    (root / "references" / "notes.md").write_text("Independent accumulators hide the FP add latency.\n")
    (root / "secret-notes").mkdir()
    (root / "secret-notes" / "answer.txt").write_text("THE ANSWER\n")
    os.symlink(root / "solutions" / "correct" / "two-accumulators.patch", root / "hint.patch")
    os.symlink("/etc/hostname", root / "outside.txt")
    return root


class Reports(list):
    def __call__(self, type_, **payload):
        self.append({"type": type_, **payload})

    def kinds(self, type_):
        return [r.get("kind") for r in self if r["type"] == type_]


@pytest.fixture
def ctx(tmp_path, harness):
    run_dir = tmp_path / "run"
    folder = RunFolder.create(tmp_path, "run", {"harness": "cdot"})
    assert folder.path == run_dir
    checks = []

    def check(tree, timing):
        checks.append((Path(tree), timing))
        return "oracle on public seeds [1, 2]: PASS"

    c = AgentContext(
        harness_name="cdot", harness_root=harness, incumbent_tree=harness, editable=("work.c",),
        program_md=(harness / "program.md").read_text(), results_tsv="", log_md="# run\n",
        recent_failures=[], run_dir=run_dir, scratch=run_dir / "agent" / "scratch", compile=CompileStub(),
        profile=lambda: "profile digest", private=("secret-notes",), check=check, report=Reports())
    c.checks = checks
    return c


def bench(ctx):
    return Workbench(ctx, stage_scratch(ctx))


# --- 16.6: total tools, bounded reads, private paths -------------------------------------------
@pytest.mark.parametrize("args", [
    {"command": "view", "path": 123}, {"command": "view", "path": None}, {"command": "view"},
    {"command": "view", "path": "work.c\0.txt"}, {"command": "view", "path": "a" * 100_000},
    {"command": "view", "path": "\udcff\udcfe"}, {"command": "view", "path": ["work.c"]},
    {"command": "view", "path": "work.c", "view_range": ["a", None]},
    {"command": "view", "path": "work.c", "view_range": [5]}, {"command": "view", "path": "work.c", "view_range": 7},
    {"command": "insert", "path": "work.c", "insert_line": 0, "insert_text": None},
    {"command": "insert", "path": "work.c", "insert_line": "3", "insert_text": "x"},
    {"command": "insert", "path": "work.c", "insert_line": True, "insert_text": "x"},
    {"command": "create", "path": "work.c", "file_text": {"a": 1}},
    {"command": "str_replace", "path": "work.c", "old_str": 5, "new_str": "x"},
    {"command": 7, "path": "work.c"}, {"command": "view", "path": "/etc/passwd"},
    {"command": "view", "path": "../../etc/passwd"}, {"command": "view", "path": "\\..\\..\\etc"},
    "not a dict", None, [],
])
def test_the_editor_is_total(ctx, args):
    with pytest.raises(ToolError):
        bench(ctx).edit(args)


def test_private_files_and_escaping_symlinks_are_never_opened(ctx):
    wb = bench(ctx)
    for path in ("solutions/correct/two-accumulators.patch", "solutions", "./solutions/wrong/..",
                 "hint.patch", "outside.txt", "secret-notes/answer.txt", "secret-notes"):
        with pytest.raises(ToolError):
            wb.edit({"command": "view", "path": path})
    listing = wb.edit({"command": "view", "path": "."})
    assert "work.c" in listing and "references/notes.md" in listing
    for hidden in ("solutions", "hint.patch", "outside.txt", "secret-notes"):
        assert hidden not in listing


def test_a_huge_file_is_viewed_in_bounded_memory(ctx, harness):
    big = harness / "big.log"
    with open(big, "w") as f:
        line = "x" * 99 + "\n"
        for _ in range(300_000):  # 30 MB
            f.write(line)
        f.write("y" * 5_000_000)  # and one 5 MB line without an end
    tracemalloc.start()
    out = bench(ctx).view("big.log", [299_990, -1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4_000_000, peak
    assert "300000\t" in out and "(line cut)" in out


def test_the_agent_turns_bad_inputs_and_crashing_tools_into_tool_errors(ctx):
    def boom(args):
        raise RuntimeError("the tool broke")

    bad = [tool_use("editor", {"command": "view", "path": 123}),
           tool_use("editor", {"command": "insert", "path": "work.c", "insert_line": 0, "insert_text": None}),
           tool_use("editor", {"command": "view", "path": "work.c", "extra": 1}),
           tool_use("editor", "not an object"), tool_use("nonexistent", {}), tool_use("submit", {"hypothesis": 5}),
           tool_use("profile", {})]
    with FakeAnthropic([reply(*bad), reply(tool_use("editor", {"command": "str_replace", "path": "work.c",
                                                               "old_str": "s += x[i] * x[i];", "new_str": "s += x[i]*x[i];"})),
                        reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        ctx.profile = lambda: (_ for _ in ()).throw(subprocess.TimeoutExpired("ncu", 600))
        proposal = agent(api).propose(ctx)
        results = tool_results(api.bodies[1])
    assert proposal.failure == "" and proposal.patch
    assert len(results) == len(bad) and all(r["is_error"] for r in results)
    assert "'path' must be a string" in results[0]["content"] and "'insert_text' is required" in results[1]["content"]
    assert "unknown argument" in results[2]["content"] and "must be an object" in results[3]["content"]
    assert "no tool 'nonexistent'" in results[4]["content"] and "must be a string" in results[5]["content"]
    assert "TimeoutExpired" in results[6]["content"]
    # the schema's faults are reported; a missing argument of one command is the editor's own error
    assert ctx.report.kinds("agent_fault").count("bad_tool_input") == 5


def test_a_profiler_that_hangs_is_a_tool_error_remembered(ctx):
    calls = []

    def hang():
        calls.append(1)
        raise subprocess.TimeoutExpired("ncu", 600)

    ctx.profile = hang
    script = [reply(tool_use("profile", {})), reply(tool_use("profile", {})),
              reply(tool_use("editor", {"command": "create", "path": "work.c", "file_text": "double work(const double *x, long n) { return 0; }\n"})),
              reply(tool_use("submit", {"hypothesis": "h"}))]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure == "" and len(calls) == 1  # not re-run within the same incumbent


def test_validate_input_on_the_editor_schema():
    schema = EDITOR_TOOL["input_schema"]
    assert validate_input(schema, {"command": "view", "path": "work.c", "view_range": [1, -1]}) == ""
    assert "one of" in validate_input(schema, {"command": "delete", "path": "x"})
    assert "2 items" in validate_input(schema, {"command": "view", "path": "x", "view_range": [1, 2, 3]})
    assert "integer" in validate_input(schema, {"command": "insert", "path": "x", "insert_line": 1.5, "insert_text": ""})


# --- truncated and refused answers ---------------------------------------------------------------
def test_a_truncated_answer_is_discarded_never_executed(ctx):
    cut = reply(thinking("long thoughts"), text("Rewriting the file."),
                tool_use("editor", {"command": "create", "path": "work.c", "file_text": "x"}),
                stop_reason="max_tokens", partial_json='{"command": "create", "path": "work.c", "file_te')
    fix = reply(tool_use("editor", {"command": "str_replace", "path": "work.c", "old_str": "s += x[i] * x[i];",
                                    "new_str": "s += x[i]*x[i];"}))
    with FakeAnthropic([cut, fix, reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        proposal = agent(api).propose(ctx)
        second = api.bodies[1]["messages"]
    assert proposal.failure == "" and "x[i]*x[i]" in proposal.patch and "+x\n" not in proposal.patch
    assert [b["type"] for b in second[1]["content"]] == ["text"]  # the cut tool call is gone
    assert "output limit" in second[2]["content"][0]["text"]
    assert ctx.report.kinds("agent_fault") == ["truncated"]


def test_three_truncated_answers_end_the_episode(ctx):
    cut = reply(text("..."), stop_reason="max_tokens")
    with FakeAnthropic([cut, cut, cut]) as api:
        proposal = agent(api).propose(ctx)
    assert "3 responses cut at max_tokens" in proposal.failure and not proposal.api_unavailable


def test_a_refusal_fails_the_proposal_and_is_reported(ctx):
    with FakeAnthropic([reply(text("no"), stop_reason="refusal")]) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure == "the model refused to continue"
    assert ctx.report.kinds("agent_fault") == ["refusal"]


# --- a busy API ----------------------------------------------------------------------------------
def test_429_honours_retry_after_and_reports_the_wait(ctx, clock):
    with FakeAnthropic([error(429, "slow down", retry_after=30), reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        agent(api).propose(ctx)
    assert 30 <= clock.slept <= 33.5
    waits = [r for r in ctx.report if r["type"] == "api_wait"]
    assert len(waits) == 1 and waits[0]["kind"] == "rate_limited" and waits[0]["status"] == 429
    assert waits[0]["hint_s"] == 30 and "waiting" in waits[0]["text"]
    assert any(r["type"] == "api_recovered" for r in ctx.report)


def test_429_without_retry_after_waits_for_the_rate_limit_reset(ctx, clock):
    reset = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=90)).isoformat()
    entry = error(429, "rate limited", retry_after=None, headers={
        "anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": reset,
        "anthropic-ratelimit-requests-remaining": "10"})
    with FakeAnthropic([entry, reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        agent(api).propose(ctx)
    assert 85 <= clock.slept <= 100


def test_minutes_of_529_are_waited_out_and_an_error_mid_stream_too(ctx, clock):
    script = [error(529, "Overloaded", retry_after=None)] * 6 + [stream_error("overloaded_error"),
                                                                 reply(tool_use("submit", {"hypothesis": "h"}))]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
        assert len(api.requests) == 8
    assert proposal.failure == "submitted no change"  # the episode itself went on to its end
    assert clock.slept > 120  # 5, 10, 20, 40, 80 s ... jittered
    assert [r["kind"] for r in ctx.report if r["type"] == "api_wait"] == ["overloaded"] * 7


def test_a_stalled_stream_times_out_and_is_retried(ctx, clock):
    with FakeAnthropic([stall(3.0), reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        a = agent(api, request_timeout_s=0.5)
        proposal = a.propose(ctx)
    assert proposal.failure == "submitted no change"
    assert [r["kind"] for r in ctx.report if r["type"] == "api_wait"] == ["timeout"]


def test_a_server_that_is_down_fails_the_proposal_as_unavailable(ctx, clock):
    class Down:
        url = "http://127.0.0.1:9"  # discard port: connection refused

    proposal = agent(Down, max_api_wait_s=300).propose(ctx)
    assert proposal.api_unavailable and proposal.failure.startswith("api unavailable")
    waits = [r for r in ctx.report if r["type"] == "api_wait"]
    assert waits[-1].get("gave_up") and {w["kind"] for w in waits} == {"connection"}
    assert clock.slept <= 300


@pytest.mark.parametrize("entry,words", [
    (error(401, "invalid x-api-key"), "refused the key"),
    (error(402, "payment required"), "may not spend more"),
    (error(400, "Your credit balance is too low"), "may not spend more"),
    (error(400, "thinking: unknown type"), "malformed"),
])
def test_what_never_clears_stops_at_once(ctx, clock, entry, words):
    with FakeAnthropic([entry]) as api:
        with pytest.raises(AgentFatal, match=words):
            agent(api).propose(ctx)
        assert len(api.requests) == 1
    assert clock.slept == 0


# --- model settings and caps ----------------------------------------------------------------------
def test_requests_stream_with_thinking_and_effort_per_phase(ctx):
    with FakeAnthropic([reply(tool_use("finish_research", {"hypotheses": "1. x"})),
                        reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        a = agent(api)
        a.research(ctx)
        a.propose(ctx)
        research, propose = api.bodies
    for body in (research, propose):
        assert body["stream"] is True and body["max_tokens"] == 32_000
        assert body["thinking"] == {"type": "adaptive"}
    assert research["output_config"] == {"effort": "high"} and propose["output_config"] == {"effort": "medium"}


def test_effort_and_thinking_can_be_turned_off(ctx, monkeypatch):
    from lab.agents import make_agent

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeAnthropic([reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        a = make_agent("anthropic", effort="off", thinking=False, base_url=api.url, max_tokens=16_000)
        a.propose(ctx)
        body = api.bodies[0]
    assert "thinking" not in body and "output_config" not in body and body["max_tokens"] == 16_000


def test_the_dollar_cap_ends_an_episode(ctx):
    view = tool_use("editor", {"command": "view", "path": "work.c"})
    usage = {"input_tokens": 0, "output_tokens": 200_000}  # $4 at $20 per million
    with FakeAnthropic([reply(view, usage=usage), reply(view, usage=usage)]) as api:
        proposal = agent(api, max_episode_usd=5.0).propose(ctx)
        assert len(api.requests) == 2
    assert proposal.failure.startswith("episode cost cap of $5.00")


# --- draft check, history, notes --------------------------------------------------------------------
def test_the_check_tool_runs_on_the_draft_and_is_capped(ctx):
    edit = tool_use("editor", {"command": "str_replace", "path": "work.c", "old_str": "s += x[i] * x[i];",
                               "new_str": "s += x[i]*x[i];"})
    calls = [tool_use("check", {}), tool_use("check", {"timing": False}), tool_use("check", {}), tool_use("check", {})]
    with FakeAnthropic([reply(edit), reply(*calls), reply(tool_use("submit", {"hypothesis": "h"}))]) as api:
        agent(api).propose(ctx)
        results = tool_results(api.bodies[2])
    assert [r["is_error"] for r in results] == [False, False, False, True]
    assert "PASS" in results[0]["content"] and "3 checks" in results[3]["content"]
    assert [t for _, t in ctx.checks] == [True, False, True]
    assert all("x[i]*x[i]" in (tree / "work.c").read_text() for tree, _ in ctx.checks)  # the draft


def test_submit_carries_what_was_learned_and_history_opens_the_past(ctx):
    folder = RunFolder(ctx.run_dir)
    folder.write_ledger(1, "diff --git a/work.c b/work.c\n+old idea\n", {})
    folder.append("proposed", number=1, hypothesis="old idea", ledger="0001", learned="it was wrong")
    folder.append("evaluated", number=1, status="fail", verdict={"status": "FAIL", "reason": "oracle: mismatch"},
                  check_lines=["seed 1: FAIL got 3 want 4"], description="old idea")
    script = [reply(tool_use("history", {"number": 1})), reply(tool_use("history", {"number": 7, "part": "check"})),
              reply(tool_use("editor", {"command": "str_replace", "path": "work.c", "old_str": "s += x[i] * x[i];",
                                        "new_str": "s += x[i]*x[i];"})),
              reply(tool_use("submit", {"hypothesis": "new idea", "learned": "the oracle wants exact sums",
                                        "next_idea": "two accumulators"}))]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
        first, second = tool_results(api.bodies[1])[0], tool_results(api.bodies[2])[0]
    assert "+old idea" in first["content"] and "seed 1: FAIL got 3 want 4" in first["content"]
    assert "learned: it was wrong" in first["content"] and "FAIL" in first["content"]
    assert "no experiment #7" in second["content"]
    assert proposal.learned == "the oracle wants exact sums" and proposal.next_idea == "two accumulators"


def test_ctrl_c_stops_a_wait_for_the_api_at_once(ctx):
    import threading
    import time

    with FakeAnthropic([error(529, "Overloaded", retry_after=600)] * 3) as api:
        a = agent(api)
        timer = threading.Timer(0.3, agent_clock.stop_waiting.set)  # what the loop's first Ctrl-C does
        timer.start()
        started = time.monotonic()
        try:
            proposal = a.propose(ctx)
        finally:
            timer.cancel()
            agent_clock.stop_waiting.clear()
    assert time.monotonic() - started < 10  # not 600 s
    assert proposal.failure.startswith("waiting for the API was interrupted") and proposal.api_unavailable


def test_the_brief_of_a_long_run_stays_bounded(ctx):
    from lab.agents.tools import run_brief

    rows = ["commit\tmetric\tunit_seconds\tcorrectness\tstatus\tdescription"]
    rows += [f"c{i:06d}\t1\t1\tpass\t{'KEEP' if i == 3 else 'SAME'}\tidea {i}" for i in range(300)]
    ctx.results_tsv = "\n".join(rows) + "\n"
    ctx.log_md = "- a line of the log\n" * 5000
    ctx.seconds_left, ctx.usd_left, ctx.spent_usd = 5400, 42.5, 57.5
    brief = run_brief(ctx)
    assert "idea 3\n" in brief + "\n" and "idea 299" in brief and "idea 200\n" not in brief
    assert "259 earlier rows not shown" in brief
    assert "1.5 h of the time budget left" in brief and "$42.50 of the spend limit left ($57.50 spent)" in brief
    assert len(brief) < 40_000
