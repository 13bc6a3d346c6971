"""Token sizes of one proposal episode on the real wavegru brief (program.md, kernel.cu), measured
on the fake API (4 characters a token; shared prefixes read from the cache). docs/agent.md quotes
these figures and lab/agents/prices.py's TYPICAL_EPISODE is built from them: if the brief grows,
this test says by how much."""

import json
from pathlib import Path

import pytest

pytest.importorskip("anthropic")

from fake_anthropic import FakeAnthropic, reply, text, thinking, tool_use  # noqa: E402

from lab.agents import AgentContext  # noqa: E402
from lab.agents.anthropic_agent import AnthropicAgent  # noqa: E402
from lab.agents.prices import TYPICAL_EPISODE  # noqa: E402
from lab.records import Build  # noqa: E402

WAVEGRU = Path(__file__).resolve().parent.parent / "harnesses" / "wavegru"
KEY = "sk-ant-" + "test-TOKENSkey0123456789"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("LAB_PRICES", raising=False)


def episode_script(kernel: str) -> list[dict]:
    """A typical proposal of 11 turns: think, read, edit a few lines, compile, check, read the
    profile and a past experiment, fix, compile, check again, submit."""
    line = next(x for x in kernel.splitlines() if x.strip() and not x.startswith(("//", "#")))
    think = thinking("The recurrence is latency bound; the gate loads can be hoisted. " * 20)
    return [
        reply(think, text("Hoisting the gate loads."),
              tool_use("editor", {"command": "str_replace", "path": "kernel.cu", "old_str": line + "\n",
                                  "new_str": line + "\n// hoisted\n"})),
        reply(think, tool_use("compile", {})),
        reply(think, tool_use("check", {"timing": True})),
        reply(think, tool_use("editor", {"command": "view", "path": "kernel.cu", "view_range": [1, 60]})),
        reply(think, tool_use("profile", {})),
        reply(think, tool_use("editor", {"command": "view", "path": "wavegru.h"})),
        reply(think, tool_use("editor", {"command": "view", "path": "kernel.cu", "view_range": [60, 160]})),
        reply(think, tool_use("editor", {"command": "str_replace", "path": "kernel.cu", "old_str": "// hoisted\n",
                                         "new_str": "// hoisted (twice)\n"})),
        reply(think, tool_use("compile", {})),
        reply(think, tool_use("check", {"timing": False})),
        reply(think, tool_use("submit", {"hypothesis": "hoist the gate loads out of the step loop",
                                         "learned": "the step loop is latency bound",
                                         "next_idea": "split the matvec over two warps"})),
    ]


def test_token_sizes_of_a_wavegru_episode(tmp_path):
    kernel = (WAVEGRU / "kernel.cu").read_text()
    run_dir = tmp_path / "run"
    ctx = AgentContext(
        harness_name="wavegru", harness_root=WAVEGRU, incumbent_tree=WAVEGRU, editable=("kernel.cu",),
        program_md=(WAVEGRU / "program.md").read_text(),
        results_tsv="commit\tmetric\tunit_seconds\tcorrectness\tstatus\tdescription\n" + "abc1234\t1\t1\tpass\tkeep\tx\n" * 30,
        log_md="# run\n" + "- 01:00:00 #1 **SAME** speedup 1.0010x: an idea\n" * 60,
        recent_failures=["#7 FAIL: vectorised loads — oracle: max abs err 3e-2 > 1e-3"] * 5,
        run_dir=run_dir, scratch=run_dir / "agent" / "scratch",
        compile=lambda tree: Build(ok=True, source_hash="h", report="ptxas info: 64 registers, 0 bytes spill"),
        check=lambda tree, timing: "oracle on public seeds [1, 2]: PASS\nquick timing, 5 pairs: 1.0100x",
        profile=lambda: "ncu digest: Duration 1.2 ms", memory="## Run memory\n" + "- #3 SAME: an idea — learned: x\n" * 60,
        seconds_left=6 * 3600, usd_left=60.0, spent_usd=40.0)
    with FakeAnthropic(episode_script(kernel)) as api:
        agent = AnthropicAgent(base_url=api.url, api_key=KEY)
        proposal = agent.propose(ctx)
        usages = api.usages
    assert proposal.failure == "" and proposal.learned == "the step loop is latency bound"
    total = {k: sum(u[k] for u in usages) for k in usages[0]}
    first_prompt = usages[0]["cache_creation_input_tokens"] + usages[0]["cache_read_input_tokens"]
    last_prompt = usages[-1]["cache_creation_input_tokens"] + usages[-1]["cache_read_input_tokens"]
    print("\nrequests", len(usages), "first prompt", first_prompt, "last prompt", last_prompt,
          "totals", json.dumps(total))
    # the figures docs/agent.md quotes (measured 2026-12-02), within 15 %
    assert len(usages) == 11
    assert first_prompt == pytest.approx(8_700, rel=0.15)
    assert total["cache_read_input_tokens"] == pytest.approx(TYPICAL_EPISODE["cache_read_input_tokens"], rel=0.15)
    assert total["cache_creation_input_tokens"] == pytest.approx(TYPICAL_EPISODE["cache_creation_input_tokens"], rel=0.3)
    reads = total["cache_read_input_tokens"] / (total["cache_read_input_tokens"] + total["cache_creation_input_tokens"]
                                                + total["input_tokens"])
    assert reads > 0.75  # the conversation is read from the cache, turn after turn
