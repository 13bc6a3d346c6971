"""The whole loop with the real `anthropic` SDK talking to a local Messages API on loopback that
replays scripted tool-use turns: research, a keep, a malformed edit, a 529 then a discard, a 401
that stops the run cleanly; cost totals checked against the scripted usage."""

import json

import pytest

pytest.importorskip("anthropic")

from fake_anthropic import FakeAnthropic, error, reply, text, tool_use  # noqa: E402
from lab.agents.anthropic_agent import AnthropicAgent  # noqa: E402
from lab.envs import get  # noqa: E402
from lab.loop import Lab, Settings  # noqa: E402
from lab.workspace import git  # noqa: E402

KEY = "sk-ant-" + "test-LOOPsecret0123456789abcd"  # fake; split so no tracked line looks like a key
SLOW = "    volatile double s = 0.0;\n"
FAST = "    double s = 0.0;\n"
USAGE = {"input_tokens": 1000, "output_tokens": 100, "cache_creation_input_tokens": 2000,
         "cache_read_input_tokens": 3000}
PRICE = {"input": 2.0, "output": 10.0, "cache_write": 2.5, "cache_read": 0.2}  # $ per million


def edit(old, new):
    return tool_use("editor", {"command": "str_replace", "path": "work.c", "old_str": old, "new_str": new})


def submit(h):
    return tool_use("submit", {"hypothesis": h})


def test_loop_with_the_anthropic_agent(cdot, cdot_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"test-model": PRICE}))
    monkeypatch.setenv("LAB_PRICES", str(prices))
    work = cdot.root / "work.c"
    work.write_text(work.read_text().replace(FAST, SLOW))
    git(cdot_repo, "commit", "-qam", "slow incumbent")

    script = [
        reply(text("1. drop the volatile accumulator\n2. two chains"), usage=USAGE),     # research
        reply(edit(SLOW, FAST), usage=USAGE), reply(submit("drop volatile"), usage=USAGE),  # keep
        reply(edit("no such text\n", "x"), usage=USAGE), reply(submit("nothing"), usage=USAGE),  # malformed
        error(529, "Overloaded"),
        reply(edit(FAST, "    volatile double s = 0.0; /* again */\n"), usage=USAGE),
        reply(submit("volatile again"), usage=USAGE),                                    # discard
        error(401, f"invalid x-api-key {KEY}"),                                          # fatal
    ]
    with FakeAnthropic(script) as api:
        agent = AnthropicAgent(model="test-model", base_url=api.url, api_key=KEY, max_retries=1)
        lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings(delta=0.02, canary_every=0))
        reason = lab.loop(agent)
        sent = api.bodies

    assert "cannot go on" in reason and ("401" in reason or "authentic" in reason.lower()), reason
    events = lab.folder.events()
    evaluated = [e for e in events if e["type"] == "evaluated"]
    assert [(e["description"], e["verdict"]["status"]) for e in evaluated] == [
        ("drop volatile", "KEEP"), ("volatile again", "WORSE")], [e["verdict"] for e in evaluated]
    failed = [e for e in events if e["type"] == "agent_failed"]
    assert failed[0]["reason"] == "submitted no change" and failed[-1].get("fatal")
    assert any(e["type"] == "research" and "volatile" in e["text"] for e in events)
    # the branch holds the keep only, with its gain
    assert "volatile" not in (lab.workspace.tree / "work.c").read_text()
    assert "speedup" in git(lab.workspace.worktree, "log", "-1", "--format=%B")
    # cost: 7 paid replies at the scripted usage (errors cost nothing)
    one = (USAGE["input_tokens"] * PRICE["input"] + USAGE["output_tokens"] * PRICE["output"]
           + USAGE["cache_creation_input_tokens"] * PRICE["cache_write"]
           + USAGE["cache_read_input_tokens"] * PRICE["cache_read"]) / 1e6
    assert lab.state().spent_usd == pytest.approx(7 * one)
    assert lab.summary()["spent_usd"] == pytest.approx(round(7 * one, 4))
    # prompt caching on the stable prefix
    assert any("cache_control" in json.dumps(b.get("system", "")) for b in sent)
    # the key is in no file of the run folder
    for path in lab.folder.path.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert KEY not in path.read_text(errors="replace"), path
