"""The command agent: an external agent CLI (here small shell scripts) in a scratch copy."""

import os
import shutil
import time
from pathlib import Path

import pytest

from lab.agents import AgentContext, make_agent
from lab.agents.command import CommandAgent
from lab.errors import LabError
from lab.workspace import patch_paths

from conftest import git_apply_in_copy

CDOT = Path(__file__).resolve().parent.parent / "examples" / "cdot"


@pytest.fixture
def ctx(tmp_path):
    root = tmp_path / "harness"
    shutil.copytree(CDOT, root, ignore=shutil.ignore_patterns("__pycache__", "lock.json", "solutions"))
    run_dir = tmp_path / "run"
    return AgentContext(
        harness_name="cdot", harness_root=root, incumbent_tree=root, editable=("work.c",),
        program_md=(root / "program.md").read_text(), results_tsv="commit\tstatus\n", log_md="# log\n",
        recent_failures=[], run_dir=run_dir, scratch=run_dir / "agent" / "scratch")


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "agent.sh"
    path.write_text("#!/bin/sh\n" + body)
    return f"sh {path}"


def test_a_cli_that_edits_and_writes_a_hypothesis(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-" + "cli-SECRET-42")
    cmd = script(tmp_path, (
        "cat > seen-prompt.txt\n"  # the prompt arrives on stdin
        "test -f program.md || exit 9\n"
        "echo '/* two accumulators next */' >> work.c\n"
        "echo 'tampered' > harness.py\n"  # outside the surface: ignored
        "printf 'reassociate the sum\\nsecond line\\n' > HYPOTHESIS\n"
        "echo \"key is $ANTHROPIC_API_KEY\"\n"))
    proposal = CommandAgent(cmd, timeout_s=30).propose(ctx)
    assert proposal.failure == ""
    assert proposal.hypothesis == "reassociate the sum"
    assert patch_paths(proposal.patch) == ["work.c"]
    applied = git_apply_in_copy(ctx.incumbent_tree, proposal.patch, tmp_path)
    assert (applied / "work.c").read_text().endswith("/* two accumulators next */\n")
    assert (ctx.incumbent_tree / "work.c").read_text() == (CDOT / "work.c").read_text()
    seen = (ctx.scratch / "tree" / "seen-prompt.txt").read_text()
    assert "write ONE line to the file HYPOTHESIS" in seen and "`work.c`" in seen
    transcript = Path(proposal.transcript)
    assert transcript.exists()
    out = transcript.with_suffix(".stdout").read_text()
    assert "key is [redacted]" in out
    assert "SECRET-42" not in transcript.read_text()


def test_prompt_as_argument_and_hypothesis_from_stdout(ctx, tmp_path):
    cmd = "printf '%s' {prompt} > got.txt && echo '/* x */' >> work.c && echo '  unroll by two  ' && echo more"
    proposal = CommandAgent(cmd, timeout_s=30).propose(ctx)
    assert proposal.failure == ""
    assert proposal.hypothesis == "unroll by two"
    got = (ctx.scratch / "tree" / "got.txt").read_text()
    assert got.startswith("You are the proposal agent") and "HYPOTHESIS" in got


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists() and Path("/proc/self").exists():
        return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hanging_cli_is_killed_with_its_process_group(ctx, tmp_path):
    cmd = script(tmp_path, "sleep 60 &\necho $! > bg.pid\necho '/* x */' >> work.c\nsleep 60\n")
    start = time.monotonic()
    proposal = CommandAgent(cmd, timeout_s=1).propose(ctx)
    assert time.monotonic() - start < 15
    assert proposal.failure.startswith("command timed out after 1 s")
    assert proposal.patch == ""
    pid = int((ctx.scratch / "tree" / "bg.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_non_zero_exit_and_no_change_are_failures(ctx, tmp_path):
    failed = CommandAgent("echo '/* x */' >> work.c; echo 'rate limited' >&2; exit 3").propose(ctx)
    assert failed.failure == "command exited with status 3: rate limited"
    assert failed.patch == ""
    idle = CommandAgent("echo nothing to do; echo x > other.txt").propose(ctx)
    assert idle.failure.startswith("submitted no change")
    assert "other.txt" in idle.failure


def test_each_proposal_starts_from_the_incumbent(ctx):
    agent = CommandAgent("echo '/* once */' >> work.c")
    first, second = agent.propose(ctx), agent.propose(ctx)
    assert first.patch == second.patch and first.patch.count("/* once */") == 1
    assert first.transcript != second.transcript


def test_make_agent_command():
    agent = make_agent("command:claude -p --model x", timeout_s=12)
    assert isinstance(agent, CommandAgent) and agent.command == "claude -p --model x" and agent.timeout_s == 12
    with pytest.raises(LabError, match="needs a command"):
        make_agent("command:")
