"""Runs by name and their hygiene (lab/runs.py): the resolver, a run's state from its owner lock
and its events, `lab status` in 80 columns, lab try's standing run, `lab clean`, and the command
that resumes a run."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from lab.errors import RunFolderError
from lab.records import SCHEMA_VERSION
from lab.runs import format_duration, resolve, resume_command, status_of
from lab.store import RunFolder

from conftest import git, lab_cli, new_try_run


def _folder(runs: Path, name: str, *events: str, **meta) -> RunFolder:
    """A run folder that no process owns, holding events of the given types."""
    folder = RunFolder(runs / name)
    folder.ledger.mkdir(parents=True)
    (folder.path / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "id": name,
                                                      "harness": name.split("-")[0], **meta}))
    folder.events_path.touch()
    for type_ in events:
        folder.append(type_, reason="test")
    return folder


@contextmanager
def held(path: Path):
    """Another live process owning the run folder at `path`: its pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from lab.store import RunFolder; "
                             "RunFolder(sys.argv[1]).hold(); print('held', flush=True); time.sleep(120)", str(path)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def test_a_run_is_found_by_path_name_or_the_start_of_one_name(tmp_path):
    runs = tmp_path / "runs"
    a = _folder(runs, "cdot-20260101-000000-aaaa").path
    _folder(runs, "cdot-20260102-000000-bbbb")
    _folder(runs, "mlx-20260101-000000-cccc")
    assert resolve(a, runs) == a and resolve(str(a), tmp_path / "elsewhere") == a
    assert resolve("cdot-20260101-000000-aaaa", runs) == a
    assert resolve("cdot-20260101", runs) == a and resolve("mlx", runs).name == "mlx-20260101-000000-cccc"
    with pytest.raises(RunFolderError, match="start of 2 runs"):
        resolve("cdot", runs)
    with pytest.raises(RunFolderError, match="no run named 'nope' under"):
        resolve("nope", runs)


def test_the_state_comes_from_the_owner_lock_and_the_events(tmp_path):
    runs = tmp_path / "runs"
    stopped = _folder(runs, "cdot-1", "run_started", "run_stopped")
    died = _folder(runs, "cdot-2", "run_started", "run_stopped", "resumed", "evaluating")  # its last session said nothing
    assert status_of(stopped).state == "stopped" and status_of(died).state == "died"
    with held(died.path) as pid:
        status = status_of(died)
        assert (status.state, status.pid) == ("running", pid) and str(status) == f"running {pid}"
    assert status_of(died).state == "died"  # the lock died with its process


def test_status_shows_the_state_and_fits_80_columns(tmp_path):
    runs = tmp_path / "runs"
    names = ["llamacpp-20261202-141508-c8ce", "wavegru-20261202-141508-c8ce", "cdot-20261202-141508-c8ce"]
    _folder(runs, names[0], "run_started", "run_stopped")
    _folder(runs, names[1], "run_started")
    running = _folder(runs, names[2], "run_started")
    with held(running.path) as pid:
        out = lab_cli("status", cwd=tmp_path, env={"COLUMNS": "80"})
        data = json.loads(lab_cli("status", "--json", cwd=tmp_path).stdout)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, out.stdout
    row = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in names}
    assert set(row) == set(names), out.stdout  # every name whole
    assert row[names[0]][0] == "stopped" and row[names[1]][0] == "died"
    assert row[names[2]][:2] == ["running", str(pid)]
    assert {r["run"]: (r["state"], r["pid"]) for r in data}[names[2]] == ("running", pid)


def test_the_resume_command_asks_for_what_the_run_spent(tmp_path):
    runs = tmp_path / "elsewhere"
    folder = _folder(runs, "cdot-1", settings={"budget_s": 3600, "max_experiments": 2, "max_usd": 5})
    folder.append("run_started")
    assert resume_command(folder, runs) == ["run", "--resume", "cdot-1", "--runs", str(runs)]
    assert resume_command(folder) == ["run", "--resume", str(folder.path)]  # not under runs/: its path
    for n in (1, 2):
        folder.append("proposed", number=n, cost_usd=3.0)
    assert resume_command(folder, runs, no_sandbox=True) == ["run", "--resume", "cdot-1", "--runs", str(runs),
                                                             "--max-experiments", "4", "--max-usd", "11",
                                                             "--no-sandbox"]
    spent = _folder(runs, "cdot-2", settings={"budget_s": 60})
    spent.append("run_started")
    assert resume_command(spent, runs)[-2:] == ["--budget", "1m"]
    assert [format_duration(s) for s in (8 * 3600, 45 * 60, 5400, 90, 0.2)] == ["8h", "45m", "1h30m", "1m30s", "1s"]


def _try(cdot_repo, patch, *args):
    out = lab_cli("try", "cdot", str(patch), *args, "--json", cwd=cdot_repo)
    data = json.loads(out.stdout) if out.stdout.strip() else {}
    return out, data


def _branches(repo):
    return sorted(b.strip(" *+") for b in git(repo, "branch", "--list", "lab/*").splitlines())


def test_try_goes_on_with_one_standing_run_and_clean_removes_finished_ones(cdot_repo, tmp_path):
    empty = tmp_path / "empty.patch"
    empty.write_text("\n")
    first, data = _try(cdot_repo, empty)
    assert first.returncode == 2, first.stderr  # refused before any run exists: none is made
    assert data["run"] is None and "empty patch" in data["refused"] and not _branches(cdot_repo)
    standing = new_try_run(cdot_repo)
    again = lab_cli("try", "cdot", str(empty), cwd=cdot_repo)
    assert again.returncode == 2 and "REJECTED" not in again.stdout
    line = next(line for line in again.stdout.splitlines() if line.startswith("#"))
    assert line.startswith("#1 refused (empty patch): it holds no diff; make one with `git diff"), again.stdout
    assert f"run: runs/{standing} (the standing try run" in again.stdout
    with_keep = new_try_run(cdot_repo)
    assert with_keep != standing
    kept = RunFolder.open(cdot_repo / "runs" / with_keep)
    kept.append("kept", number=1, commit=kept.meta["base_commit"], speedup=1.5)
    busy = new_try_run(cdot_repo)
    assert len(_branches(cdot_repo)) == 3

    with held(cdot_repo / "runs" / busy) as pid:
        assert "would remove worktree, branch" in lab_cli("clean", "-n", cwd=cdot_repo).stdout
        assert len(_branches(cdot_repo)) == 3  # a dry run removes nothing
        out = lab_cli("clean", cwd=cdot_repo)
        assert out.returncode == 0, out.stderr
        said = dict(line.split(": ", 1) for line in out.stdout.splitlines())
        assert said == {standing: "removed worktree, branch (stopped)",
                        with_keep: f"left alone: its branch holds 1 kept result(s); `lab export {with_keep}` "
                                   "first, then clean with --kept",
                        busy: f"left alone: running (pid {pid})"}
        assert _branches(cdot_repo) == sorted(f"lab/{n}" for n in (with_keep, busy))
        assert not (cdot_repo / "runs" / standing / "worktree").exists()
        assert (cdot_repo / "runs" / standing / "events.jsonl").exists()  # the folder stays
        assert lab_cli("log", standing, cwd=cdot_repo).returncode == 0
        resumed = lab_cli("run", "--resume", standing, "--agent", f"replay:{empty}", cwd=cdot_repo)
        assert resumed.returncode == 2 and "was cleaned" in resumed.stderr, resumed.stderr
        states = {r["run"]: r["state"] for r in json.loads(lab_cli("status", "--json", cwd=cdot_repo).stdout)}
        assert states == {standing: "cleaned", with_keep: "stopped", busy: "running"}

        _, fourth = _try(cdot_repo, empty)
        assert Path(fourth["run"]).name == with_keep  # the latest one neither cleaned nor running
        assert "removed worktree, branch (stopped)" in lab_cli("clean", "--kept", cwd=cdot_repo).stdout
        _, fifth = _try(cdot_repo, empty)  # every other one is cleaned or running: a new one, which
        assert fifth["run"] is None        # an empty patch does not get
        newest = new_try_run(cdot_repo)
        assert newest not in (standing, with_keep, busy)

        out = lab_cli("clean", "--folders", cwd=cdot_repo)
        assert out.returncode == 0, out.stderr
        said = dict(line.split(": ", 1) for line in out.stdout.splitlines())
        assert said == {standing: "removed folder (cleaned)", with_keep: "removed folder (cleaned)",
                        newest: "removed worktree, branch, folder (stopped)", busy: f"left alone: running (pid {pid})"}
        assert os.listdir(cdot_repo / "runs") == [busy] and _branches(cdot_repo) == [f"lab/{busy}"]
        worktrees = [line.split()[0] for line in git(cdot_repo, "worktree", "list").splitlines()]
        assert worktrees == [str(cdot_repo), str(cdot_repo / "runs" / busy / "worktree")]


def test_every_command_that_takes_a_run_takes_a_name(cdot_repo, tmp_path):
    patch = tmp_path / "p.patch"
    patch.write_text("\n")
    for args in (["log", "nope"], ["report", "nope"], ["export", "nope"], ["run", "--resume", "nope"],
                 ["try", "cdot", str(patch), "--run", "nope"]):
        out = lab_cli(*args, cwd=cdot_repo)
        assert out.returncode == 2 and "no run named 'nope' under runs/" in out.stderr, (args, out.stderr)
    name = "cdot-20260101-000000-aaaa"
    _folder(cdot_repo / "runs", name, "run_started", "run_stopped")
    for args in (["log", name], ["log", "cdot-2026"], ["log", str(cdot_repo / "runs" / name)]):
        out = lab_cli(*args, cwd=cdot_repo)
        assert out.returncode == 0 and f"# Run {name}" in out.stdout, (args, out.stderr)
