"""The anthropic agent against a local fake of the Messages API, through the real SDK."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("anthropic")

from fake_anthropic import FakeAnthropic, error, reply, text, tool_use  # noqa: E402

from lab.agents import AgentContext, AgentFatal, make_agent  # noqa: E402
from lab.agents.anthropic_agent import AnthropicAgent  # noqa: E402
from lab.agents.prices import DEFAULT_MODEL, PRICES, cost_usd, price_for  # noqa: E402
from lab.errors import LabError  # noqa: E402
from lab.records import Build  # noqa: E402
from lab.workspace import patch_paths  # noqa: E402

CDOT = Path(__file__).resolve().parent.parent / "examples" / "cdot"
KEY = "sk-ant-" + "test-Zq7SECRETkey0123456789"  # fake; split so no tracked line looks like a key
OLD = "    double s = 0.0;\n    for (long i = 0; i < n; i++)\n        s += x[i] * x[i];\n    return s;\n"
NEW = ("    double s0 = 0.0, s1 = 0.0;\n    long i = 0;\n    for (; i + 1 < n; i += 2) {\n"
       "        s0 += x[i] * x[i];\n        s1 += x[i + 1] * x[i + 1];\n    }\n"
       "    for (; i < n; i++)\n        s0 += x[i] * x[i];\n    return s0 + s1;\n")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("LAB_PRICES", raising=False)


class CompileStub:
    """ctx.compile: records the trees it built; a source containing BROKEN does not build."""

    def __init__(self):
        self.trees = []

    def __call__(self, tree: Path) -> Build:
        self.trees.append(Path(tree))
        if "BROKEN" in (Path(tree) / "work.c").read_text():
            return Build(ok=False, source_hash="", error="work.c:4:5: error: unknown type name 'BROKEN'")
        return Build(ok=True, source_hash="h", report="work.c: 0 warnings", seconds=0.25)


@pytest.fixture
def harness(tmp_path):
    root = tmp_path / "harness"
    shutil.copytree(CDOT, root, ignore=shutil.ignore_patterns("__pycache__", "lock.json", "solutions"))
    (root / "references").mkdir()
    (root / "references" / "notes.md").write_text("Independent accumulators hide the FP add latency.\n")
    return root


@pytest.fixture
def ctx(tmp_path, harness):
    run_dir = tmp_path / "run"
    return AgentContext(
        harness_name="cdot", harness_root=harness, incumbent_tree=harness, editable=("work.c",),
        program_md=(harness / "program.md").read_text(), results_tsv="commit\tcalls_per_s\tstatus\n",
        log_md="# cdot run\n", recent_failures=["#1 FAIL: skip half of x — got 12.0, want 24.0"],
        run_dir=run_dir, scratch=run_dir / "agent" / "scratch", compile=CompileStub(),
        profile=lambda: "98% of the time in the loop of work()", tried_hypotheses=["skip half of x"])


def agent(api, **kw) -> AnthropicAgent:
    kw.setdefault("model", DEFAULT_MODEL)
    return AnthropicAgent(base_url=api.url, api_key=KEY, **kw)


def apply_check(tree: Path, patch: str, tmp_path: Path) -> Path:
    """`git apply --check` then apply `patch` on a git copy of `tree`; returns the copy."""
    copy = tmp_path / "applied"
    shutil.copytree(tree, copy)
    run = lambda *a, **k: subprocess.run(["git", *a], cwd=copy, check=True, capture_output=True, text=True, **k)  # noqa: E731
    run("init", "-q")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    (tmp_path / "p.patch").write_text(patch)
    run("apply", "--check", str(tmp_path / "p.patch"))
    run("apply", str(tmp_path / "p.patch"))
    return copy


def tool_results(body: dict) -> list[dict]:
    return [b for b in body["messages"][-1]["content"] if b.get("type") == "tool_result"]


def edit(old=OLD, new=NEW, path="work.c"):
    return tool_use("editor", {"command": "str_replace", "path": path, "old_str": old, "new_str": new})


def submit(h="two accumulators hide the add latency"):
    return tool_use("submit", {"hypothesis": h})


def test_full_episode_gives_a_patch_git_applies(ctx, harness, tmp_path):
    script = [reply(text("Reading the kernel."), tool_use("editor", {"command": "view", "path": "work.c"})),
              reply(edit()), reply(tool_use("compile", {})),
              reply(submit("two accumulators hide the add latency\nand more words"))]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure == ""
    assert proposal.hypothesis == "two accumulators hide the add latency"
    applied = apply_check(harness, proposal.patch, tmp_path)
    assert (applied / "work.c").read_text() == (CDOT / "work.c").read_text().replace(OLD, NEW)
    assert (harness / "work.c").read_text() == (CDOT / "work.c").read_text()  # incumbent untouched
    assert patch_paths(proposal.patch) == ["work.c"]
    # the compile tool built the scratch copy, not the incumbent
    assert len(ctx.compile.trees) == 1 and ctx.scratch in ctx.compile.trees[0].parents
    bodies = api.bodies
    assert len(bodies) == 4
    first = bodies[0]
    assert first["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cdot: make `work` faster" in first["system"][-1]["text"]  # program.md
    assert [t["name"] for t in first["tools"]] == ["editor", "compile", "check", "profile", "history", "submit"]
    brief = first["messages"][0]["content"][0]["text"]
    assert "s += x[i] * x[i];" in brief and "skip half of x" in brief and "# cdot run" in brief
    for body in bodies:
        assert body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
        assert sum("cache_control" in b for m in body["messages"] for b in m["content"]) == 1
    assert "     4\t    double s = 0.0;" in tool_results(bodies[1])[0]["content"]
    assert tool_results(bodies[3])[0]["content"].startswith("build ok")
    assert tool_results(bodies[3])[0]["is_error"] is False
    # the key goes in the header only: never in a request body, a transcript or the proposal
    assert all(KEY in r["headers"].get("x-api-key", "") + r["headers"].get("authorization", "")
               for r in api.requests)  # SDK 2.x sends it as a bearer token, older ones as x-api-key
    assert not any(KEY in json.dumps(b) for b in bodies)
    transcript = Path(proposal.transcript)
    assert transcript.parent == ctx.run_dir / "agent"
    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert lines[0]["type"] == "episode" and lines[-1]["type"] == "end"
    assert sum(1 for rec in lines if rec.get("role") == "assistant") == 4
    assert KEY not in transcript.read_text() and KEY not in proposal.to_json()


def test_edits_outside_the_surface_are_refused_and_the_episode_goes_on(ctx, harness, tmp_path):
    script = [reply(tool_use("editor", {"command": "str_replace", "path": "harness.py",
                                        "old_str": "CALLS = 8", "new_str": "CALLS = 1"})),
              reply(tool_use("editor", {"command": "create", "path": "../evil.c", "file_text": "x"})),
              reply(tool_use("editor", {"command": "create", "path": "notes.txt", "file_text": "x"})),
              reply(edit()), reply(submit())]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
    results = [tool_results(b)[0] for b in api.bodies[1:4]]
    assert all(r["is_error"] for r in results)
    assert "not part of the editable surface" in results[0]["content"]
    assert "without '..'" in results[1]["content"]
    assert "not part of the editable surface" in results[2]["content"]
    assert proposal.failure == ""
    assert patch_paths(proposal.patch) == ["work.c"]
    assert (harness / "harness.py").read_text() == (CDOT / "harness.py").read_text()
    assert not (tmp_path / "evil.c").exists() and not (ctx.scratch / "evil.c").exists()


def test_a_malformed_edit_returns_an_error_and_the_model_recovers(ctx, harness, tmp_path):
    script = [reply(edit(old="    double sum = 0.0;\n")), reply(edit()), reply(submit())]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
    result = tool_results(api.bodies[1])[0]
    assert result["is_error"] is True and "was not found" in result["content"]
    assert proposal.failure == ""
    apply_check(harness, proposal.patch, tmp_path)


def test_an_edit_and_a_submit_in_one_turn(ctx):
    with FakeAnthropic([reply(text("Done in one go."), edit(), submit())]) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure == "" and "+    return s0 + s1;" in proposal.patch
    assert len(api.requests) == 1


def test_compiler_errors_go_back_to_the_model(ctx):
    script = [reply(edit(new="    BROKEN s;\n")), reply(tool_use("compile", {})),
              reply(edit(old="    BROKEN s;\n", new=NEW)), reply(tool_use("compile", {})), reply(submit())]
    with FakeAnthropic(script) as api:
        proposal = agent(api).propose(ctx)
    failed = tool_results(api.bodies[2])[0]
    assert failed["is_error"] is True and "unknown type name 'BROKEN'" in failed["content"]
    assert tool_results(api.bodies[4])[0]["content"].startswith("build ok")
    assert proposal.failure == "" and "BROKEN" not in proposal.patch


def test_overloaded_then_success_is_waited_out(ctx, clock):
    with FakeAnthropic([error(529, "Overloaded", retry_after=None), reply(edit()), reply(submit())]) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure == ""
    assert len(api.requests) == 3
    assert api.bodies[0] == api.bodies[1]  # the same request, sent again
    assert 2.5 <= clock.slept <= 5.0  # the first back-off, jittered, on the compressed clock


def test_overloaded_past_the_wait_limit_fails_the_proposal_only(ctx, clock):
    with FakeAnthropic([error(529, "Overloaded", retry_after=None)] * 20) as api:
        proposal = agent(api, max_api_wait_s=60).propose(ctx)
    assert proposal.failure.startswith("api unavailable for") and "529" in proposal.failure
    assert proposal.api_unavailable
    assert 3 <= len(api.requests) <= 6 and clock.slept <= 60


def test_bad_request_stops_at_once_with_a_clear_message(ctx):
    with FakeAnthropic([error(400, "messages: text content blocks must be non-empty")]) as api:
        with pytest.raises(AgentFatal, match="malformed.*non-empty"):
            agent(api).propose(ctx)
    assert len(api.requests) == 1


def test_a_conversation_grown_too_long_fails_the_proposal_only(ctx):
    with FakeAnthropic([error(400, "prompt is too long: 210000 tokens > 200000 maximum")]) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure.startswith("api error: 400") and "too long" in proposal.failure
    assert not proposal.api_unavailable and len(api.requests) == 1
    assert Path(proposal.transcript).exists()


def test_authentication_error_is_fatal_and_never_shows_the_key(ctx):
    with FakeAnthropic([error(401, f"invalid x-api-key {KEY}")]) as api:
        a = agent(api)
        with pytest.raises(AgentFatal) as info:
            a.propose(ctx)
    assert "401" in str(info.value) and "ANTHROPIC_API_KEY" in str(info.value)
    assert KEY not in str(info.value)
    assert len(api.requests) == 1
    for path in (ctx.run_dir / "agent").glob("*.jsonl"):
        assert KEY not in path.read_text()


@pytest.mark.parametrize("entry,words", [
    (error(404, "model: claude-nope"), "not found"),
    (error(403, "this key may not use the model"), "403"),
    (error(400, "Your credit balance is too low to access the Anthropic API."), "may not spend more"),
])
def test_errors_no_retry_can_fix_stop_the_run(ctx, entry, words):
    with FakeAnthropic([entry]) as api:
        with pytest.raises(AgentFatal, match=words):
            agent(api, model="claude-sonnet-5-5").propose(ctx)
    assert len(api.requests) == 1


def test_no_submit_within_the_turn_cap_is_a_failure(ctx):
    view = tool_use("editor", {"command": "view", "path": "work.c"})
    with FakeAnthropic([reply(view), reply(text("thinking aloud")), reply(view)]) as api:
        proposal = agent(api, max_turns=3).propose(ctx)
    assert proposal.failure == "no submit within 3 turns"
    assert proposal.patch == ""
    assert len(api.requests) == 3
    last = api.bodies[2]["messages"][-1]["content"]
    assert any("turn left" in b.get("text", "") for b in last)  # warned before the end


def test_the_token_cap_ends_an_episode(ctx):
    view = tool_use("editor", {"command": "view", "path": "work.c"})
    with FakeAnthropic([reply(view, usage={"input_tokens": 900, "cache_read_input_tokens": 200})]) as api:
        proposal = agent(api, max_episode_tokens=1000).propose(ctx)
    assert proposal.failure.startswith("token cap of 1000 reached")
    assert len(api.requests) == 1


def test_submitting_no_change_is_a_failure(ctx):
    with FakeAnthropic([reply(submit())]) as api:
        proposal = agent(api).propose(ctx)
    assert proposal.failure == "submitted no change" and proposal.patch == ""


def test_cost_is_the_usage_at_the_price_table(ctx, tmp_path, monkeypatch):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"test-model": {"input": 1, "output": 10, "cache_write": 2, "cache_read": 0.5}}))
    monkeypatch.setenv("LAB_PRICES", str(prices))
    u1 = {"input_tokens": 1000, "output_tokens": 200, "cache_creation_input_tokens": 5000, "cache_read_input_tokens": 0}
    u2 = {"input_tokens": 300, "output_tokens": 100, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5000}
    with FakeAnthropic([reply(edit(), usage=u1), reply(submit(), usage=u2), reply(submit(), usage=u1)]) as api:
        a = agent(api, model="test-model")
        first = a.propose(ctx)
        second = a.propose(ctx)  # submits no change: still paid for
    expected1 = (1000 * 1 + 200 * 10 + 5000 * 2) / 1e6 + (300 * 1 + 100 * 10 + 5000 * 0.5) / 1e6
    assert first.cost_usd == pytest.approx(expected1)
    assert first.usage["input_tokens"] == 1300 and first.usage["output_tokens"] == 300
    assert first.usage["cache_creation_input_tokens"] == 5000 and first.usage["cache_read_input_tokens"] == 5000
    assert second.failure == "submitted no change"
    assert second.cost_usd == pytest.approx(13_000 / 1e6)
    assert a.spent_usd == pytest.approx(expected1 + 13_000 / 1e6)
    assert Path(first.transcript) != Path(second.transcript)


def test_price_table():
    assert DEFAULT_MODEL in PRICES
    p = price_for("claude-haiku-4-5-20251001", PRICES)  # a dated snapshot falls back to its alias
    assert p == PRICES["claude-haiku-4-5"]
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000, "cache_creation_input_tokens": 1_000_000,
             "cache_read_input_tokens": 1_000_000, "web_search_requests": 3}
    assert cost_usd(usage, PRICES["claude-opus-5-5"]) == pytest.approx(4 + 20 + 5 + 0.2 + 0.03)
    short = {"input_tokens": 50_000, "output_tokens": 1000}
    long = {"input_tokens": 50_000, "output_tokens": 1000, "cache_read_input_tokens": 60_000}
    haiku = PRICES["claude-haiku-5-5"]
    assert cost_usd(short, haiku) == pytest.approx((50_000 * 0.10 + 1000 * 0.50) / 1e6)
    assert cost_usd(long, haiku) == pytest.approx((50_000 * 0.50 + 1000 * 2.50 + 60_000 * 0.05) / 1e6)
    with pytest.raises(LabError, match="no price is known"):
        price_for("claude-unknown-9", PRICES)


def test_an_unpriced_model_is_refused_at_construction():
    with pytest.raises(LabError, match="LAB_PRICES"):
        AnthropicAgent(model="claude-unknown-9", api_key=KEY)


def test_missing_key_stops_before_anything_starts(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AgentFatal, match="set ANTHROPIC_API_KEY"):
        make_agent("anthropic")


def test_research_returns_the_ranked_hypotheses(ctx):
    ranked = "1. two accumulators (add latency bound)\n2. unroll by 4"
    script = [reply(tool_use("editor", {"command": "view", "path": "references/notes.md"})),
              reply(edit()),  # research is read-only
              reply(tool_use("finish_research", {"hypotheses": ranked}))]
    with FakeAnthropic(script) as api:
        a = agent(api, web_search=True)
        assert a.research(ctx) == ranked
    first = api.bodies[0]
    assert {"type": "web_search_20250305", "name": "web_search"}.items() <= first["tools"][-1].items()
    brief = first["messages"][0]["content"][0]["text"]
    assert "Independent accumulators hide" in brief  # references/
    assert "98% of the time in the loop" in brief  # the profile digest
    assert "cdot: make `work` faster" in first["system"][-1]["text"]
    assert "Independent accumulators" in tool_results(api.bodies[1])[0]["content"]
    assert "read-only" in tool_results(api.bodies[2])[0]["content"]
    assert a.research_cost_usd > 0 and a.spent_usd == pytest.approx(a.research_cost_usd)


def test_research_may_end_with_plain_text_and_fails_loudly(ctx):
    with FakeAnthropic([reply(text("1. unroll\n2. vectorise"))]) as api:
        a = agent(api)
        assert a.research(ctx) == "1. unroll\n2. vectorise"
        assert all(t["name"] != "web_search" for t in api.bodies[0]["tools"])
    with FakeAnthropic([error(400, "prompt is too long")]) as api:
        with pytest.raises(LabError, match="research: api error: 400"):
            agent(api).research(ctx)


def test_make_agent_anthropic_with_a_model(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    a = make_agent("anthropic:claude-sonnet-5-5", max_turns=7)
    assert isinstance(a, AnthropicAgent) and a.model == "claude-sonnet-5-5" and a.max_turns == 7
    assert make_agent("anthropic").model == DEFAULT_MODEL
    assert KEY not in repr(a)
    with pytest.raises(LabError, match="two models"):
        make_agent("anthropic:claude-sonnet-5-5", model="claude-opus-5-5")
