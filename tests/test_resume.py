"""Resume resumes (issue 17.5) and one process owns a run folder (issue 17.7)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from lab.cli import _given_settings, _typed_settings, run
from lab.envs import get
from lab.errors import LabError, RunFolderBusy
from lab.loop import Lab, Settings
from lab.runs import resumed_settings
from lab.store import RunFolder, active_seconds

from conftest import CDOT, lab_cli
from test_workspace_apply import SYMLINK_AS_WORK


def _ctx(*args):
    return run.make_context("run", list(args))


def _resumed(ctx, folder):
    """What `lab run` with this command line (`ctx`) goes on with in `folder`."""
    return resumed_settings(folder, _given_settings(ctx), _typed_settings(ctx))


def _folder_with_sessions(tmp_path, settings, sessions):
    """A run folder whose processes ran the given (start, end) spans, in seconds from noon."""
    folder = RunFolder.create(tmp_path / "runs", "cdot-x", {"harness": "cdot", "base_commit": "0" * 40,
                                                            "settings": settings})
    lines = []
    for i, (a, b) in enumerate(sessions):
        for t, kind in ((a, "run_started" if i == 0 else "resumed"), (b, "run_stopped")):
            stamp = f"2026-01-01T{12 + t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}+00:00"
            lines.append(json.dumps({"seq": len(lines), "time": stamp, "type": kind}))
    folder.events_path.write_text("\n".join(lines) + "\n")
    return folder


def test_a_resumed_run_keeps_its_settings_unless_given_again(tmp_path):
    recorded = {**Settings().__dict__, "budget_s": 3600.0, "max_experiments": 7, "max_usd": 2.5, "delta": 0.03,
                "env": "docker", "agent": "replay:/x.jsonl", "model": None, "gpus": [0, 1], "web_search": True}
    folder = _folder_with_sessions(tmp_path, recorded, [(0, 600), (1000, 1600)])
    assert active_seconds(folder.events()) == 1200

    ctx = _ctx("--resume", str(folder.path))
    values, total = _resumed(ctx, folder)
    assert {k: values[k] for k in ("max_experiments", "max_usd", "delta", "env", "agent", "gpus", "web_search")} == {
        "max_experiments": 7, "max_usd": 2.5, "delta": 0.03, "env": "docker", "agent": "replay:/x.jsonl",
        "gpus": [0, 1], "web_search": True}
    assert values["budget_s"] == 2400 and total == 3600, "the rest of the original budget"

    ctx = _ctx("--resume", str(folder.path), "--max-usd", "9", "--budget", "30m", "--agent", "replay:/y.jsonl")
    values, total = _resumed(ctx, folder)
    assert values["max_usd"] == 9 and values["agent"] == "replay:/y.jsonl" and values["max_experiments"] == 7
    assert values["budget_s"] == 1800 and total == 1200 + 1800, "--budget again: that much more from now"


def test_a_spent_budget_is_refused_unless_extended(tmp_path):
    folder = _folder_with_sessions(tmp_path, {"budget_s": 600.0, "agent": "replay:/x"}, [(0, 700)])
    ctx = _ctx("--resume", str(folder.path))
    with pytest.raises(LabError, match="spent its budget"):
        _resumed(ctx, folder)


def test_resume_through_the_cli_keeps_agent_limits_and_budget(cdot, cdot_repo, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(json.dumps({"patch": (CDOT / "solutions" / p).read_text(), "hypothesis": h})
                                for p, h in [("wrong/skip-half.patch", "skip half"),
                                             ("wrong/no-compile.patch", "broken")]) + "\n")
    first = lab_cli("run", str(cdot.root), "--agent", f"replay:{replay}", "--budget", "20m", "--max-experiments", "1",
                    "--max-usd", "3", "--delta", "0.05", "--quiet", cwd=cdot_repo)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = next((cdot_repo / "runs").glob("cdot-*"))
    # no --agent (the default would be anthropic, which has no key here), no --delta, no --budget
    again = lab_cli("run", "--resume", str(run_dir), "--max-experiments", "2", "--quiet", cwd=cdot_repo,
                    env={"ANTHROPIC_API_KEY": ""})
    assert again.returncode == 0, again.stdout + again.stderr
    meta = json.loads((run_dir / "run.json").read_text())["settings"]
    assert meta["agent"] == f"replay:{replay}" and meta["max_usd"] == 3 and meta["delta"] == 0.05
    assert meta["max_experiments"] == 2 and meta["budget_s"] == 1200
    events = RunFolder.open(run_dir).events()
    assert [e["number"] for e in events if e["type"] == "evaluated"] == [1, 2]


def test_a_change_of_environment_is_refused_like_a_change_of_model(cdot, cdot_repo):
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings())

    class Elsewhere(type(get("native"))):
        def reference(self):
            return "registry.example/cdot@sha256:" + "1" * 64

    with pytest.raises(LabError, match="cannot change its environment"):
        Lab.resume(lab.folder.path, cdot, Elsewhere(), Settings())


def test_a_second_owner_is_refused_with_the_first_ones_pid(cdot, cdot_repo, tmp_path):
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings())  # this process owns it now
    patch = tmp_path / "s.patch"
    patch.write_text(SYMLINK_AS_WORK)
    for args in (["try", str(cdot.root), str(patch), "--run", str(lab.folder.path)],
                 ["run", "--resume", str(lab.folder.path), "--agent", "replay:" + str(patch), "--quiet"]):
        out = lab_cli(*args, cwd=cdot_repo)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"process {os.getpid()}" in out.stderr and "in use" in out.stderr, out.stderr
    assert not any(e["type"] == "resumed" for e in lab.folder.events())


def test_the_lock_dies_with_its_process(tmp_path):
    folder = RunFolder(tmp_path / "runs" / "cdot-z")
    folder.path.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lab.store import RunFolder; "
                               "RunFolder(sys.argv[1]).hold(); print('held', flush=True); time.sleep(60)",
                               str(folder.path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid}"):
            folder.hold()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup of its own: the kernel drops the lock
        holder.wait(10)
    folder.hold()


@pytest.mark.parametrize("schema", [1, 2])
def test_the_state_of_a_schema_1_run_reads_as_the_same_as_today(schema):
    """Schema 1 spelled an evaluated event's status keep/discard/fail/crash; a resumed old run
    rebuilds the same state (a keep still to commit, the failure streak) as one written today."""
    from lab.loop import RunState

    spelled = {1: {"KEEP": "keep", "SAME": "discard", "FAIL": "fail", "TIMEOUT": "crash"},
               2: {s: s for s in ("KEEP", "SAME", "FAIL", "TIMEOUT")}}[schema]
    events = []
    for number, verdict in enumerate(["SAME", "FAIL", "TIMEOUT", "KEEP"], start=1):
        events += [{"seq": len(events), "type": "proposed", "number": number},
                   {"seq": len(events) + 1, "type": "evaluated", "number": number, "status": spelled[verdict],
                    "verdict": {"status": verdict}, "seconds": 1.0}]
    state = RunState.from_events(events, {"base_commit": "0" * 40})
    assert state.pending_keep is not None and state.pending_keep["number"] == 4
    assert state.verdicts == {"SAME": 1, "FAIL": 1, "TIMEOUT": 1, "KEEP": 1}
    assert state.consecutive_failures == 0 and state.since_keep == 0
    state = RunState.from_events(events[:-2], {"base_commit": "0" * 40})
    assert state.pending_keep is None and state.consecutive_failures == 2 and state.since_keep == 3
