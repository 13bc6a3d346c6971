"""The CLI as a user meets it: one clear line and a non-zero exit for bad input."""

import json
import sys

from conftest import CDOT, HAS_GPU, REPO, git, lab_cli


def test_help_on_every_command():
    out = lab_cli("--help")
    assert out.returncode == 0
    for command in ("harnesses", "check", "bench", "try", "run", "log", "status", "noise", "lock", "profile"):
        assert command in out.stdout
        sub = lab_cli(command, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout, command


def test_unknown_harness_is_one_clear_line():
    out = lab_cli("check", "no-such-harness")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no harness named 'no-such-harness'")


def test_harnesses_lists_the_shipped_ones_as_json():
    out = lab_cli("harnesses", "--json", env={"LAB_HARNESS_PATH": str(CDOT.parent)})
    assert out.returncode == 0, out.stderr
    names = {h["name"] for h in json.loads(out.stdout)}
    assert "cdot" in names


def test_check_and_try_through_the_cli(cdot, cdot_repo):
    out = lab_cli("check", str(cdot.root), "--json", cwd=cdot_repo)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verdict"]["status"] == "PASS"

    patch = CDOT / "solutions" / "wrong" / "skip-half.patch"
    out = lab_cli("try", str(cdot.root), str(patch), "-m", "skip half", "--json", cwd=cdot_repo)
    assert out.returncode == 1, out.stderr  # measured, not kept
    data = json.loads(out.stdout)
    assert data["event"]["verdict"]["status"] == "FAIL" and data["exit"] == 1

    status = lab_cli("status", "--json", cwd=cdot_repo)
    runs = json.loads(status.stdout)
    assert len(runs) == 1 and runs[0]["verdicts"] == {"FAIL": 1} and runs[0]["state"] == "stopped"


def test_patch_outside_the_surface_is_refused(cdot, cdot_repo, tmp_path):
    bad = tmp_path / "bad.patch"
    bad.write_text("--- a/harness.py\n+++ b/harness.py\n@@ -1 +1 @@\n-x\n+y\n")
    out = lab_cli("try", str(cdot.root), str(bad), "--json", cwd=cdot_repo)
    assert out.returncode == 2, out.stderr  # refused
    event = json.loads(out.stdout)["event"]
    assert event["type"] == "rejected" and event["reason"] == "outside the editable surface"


def test_main_job_without_gpu_or_key_stops_at_once_with_what_works_instead():
    """README command 1 where it cannot run: one line naming everything missing and the exact
    command that works on this machine instead (the README's own test runs that command)."""
    out = lab_cli("run", "wavegru", "--budget", "1m", cwd=REPO, env={"ANTHROPIC_API_KEY": ""})
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "ANTHROPIC_API_KEY" in out.stderr
    instead = out.stderr.split("What works on this machine instead", 1)[1]
    program = f"{sys.executable} -m lab.cli"
    if HAS_GPU:
        assert f"`{program} check wavegru`" in instead, out.stderr
    else:
        assert "GPU" in out.stderr or "nvcc" in out.stderr
        assert f"`{program} run cdot --agent replay:examples/cdot/replay.jsonl --budget 10m`" in instead, out.stderr


def test_main_job_with_a_gpu_but_no_key_names_the_check_and_the_recorded_patches():
    """The other branch of README command 1 (a GPU, no key), which this machine cannot reach by
    running: where the harness can run here, what works instead is its check and a run over its
    recorded patches, commands that exist and need no key."""
    from lab.cli import _command, _what_works_instead
    from lab.harness import load

    wavegru = load("wavegru")
    instead = _what_works_instead("wavegru", wavegru, harness_runs=True)
    assert f"`{_command('check', 'wavegru')}` (build and oracle)" in instead, instead
    replay = "harnesses/wavegru/solutions/correct"
    assert f"`{_command('run', 'wavegru', '--agent', f'replay:{replay}', '--budget', '1h')}`" in instead, instead
    assert sorted((REPO / replay).glob("*.patch")), "the recorded patches it names must exist"


def test_bad_budget():
    out = lab_cli("run", str(CDOT), "--budget", "soon")
    assert out.returncode != 0 and "not a duration" in out.stderr


def test_bench_against_a_record_from_another_machine_refuses(cdot, cdot_repo, tmp_path):
    out = lab_cli("check", str(cdot.root), "--json", cwd=cdot_repo)
    record_path = json.loads(out.stdout)["record"]
    record = json.loads((cdot_repo / record_path).read_text() if not record_path.startswith("/")
                        else open(record_path).read())
    record["fingerprint"]["cpu"]["model"] = "Some Other CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(record))
    refused = lab_cli("bench", str(cdot.root), "--against-record", str(other), cwd=cdot_repo)
    assert refused.returncode == 2 and "cpu.model" in refused.stderr and "never compared" in refused.stderr


def _verdict_line(out) -> str:
    """lab try's line of the experiment (after any progress lines)."""
    return next((line for line in out.stdout.splitlines() if line.startswith("#")), "")


def test_try_checks_the_patch_before_it_measures_anything(cdot, cdot_repo, tmp_path):
    stale = tmp_path / "stale.patch"  # made against another version of work.c
    stale.write_text((CDOT / "solutions" / "wrong" / "slower.patch").read_text().replace("double s = 0.0;", "double t;"))
    out = lab_cli("try", "cdot", str(stale), cwd=cdot_repo)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout.startswith("refused (patch rejected: does not apply"), out.stdout
    assert out.stdout.rstrip().endswith("no run was made"), out.stdout
    # refused before anything exists: no run folder, no branch, no worktree, nothing measured
    assert not list((cdot_repo / "runs").glob("cdot-*"))
    assert not git(cdot_repo, "branch", "--list", "lab/*").strip()
    assert len(git(cdot_repo, "worktree", "list").splitlines()) == 1



def test_try_keeps_a_real_speedup_in_its_standing_run_and_exits_by_verdict(cdot, cdot_repo):
    """KEEP exits 0 and says it was confirmed; the next try goes on in the same run (the noise
    floor measured once) against the kept incumbent; --new-run starts from the checkout."""
    solutions = CDOT / "solutions"
    kept = lab_cli("try", "cdot", str(solutions / "correct" / "two-accumulators.patch"), cwd=cdot_repo)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    first = _verdict_line(kept)
    assert first.startswith("#1 KEEP ") and "confirmed in a fresh process on fresh seeds" in first, kept.stdout
    assert "review the diff and confirm" not in kept.stdout and "confirm in a fresh process" not in kept.stdout

    stale = lab_cli("try", "cdot", str(solutions / "wrong" / "slower.patch"), cwd=cdot_repo)
    assert stale.returncode == 2, stale.stdout + stale.stderr
    assert _verdict_line(stale).startswith("#2 refused (does not apply)") and "--new-run" in stale.stdout, stale.stdout
    (run,) = (cdot_repo / "runs").glob("cdot-*")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "noise_floor" for e in events) == 1

    worse = lab_cli("try", "cdot", str(solutions / "wrong" / "slower.patch"), "--new-run", cwd=cdot_repo)
    assert worse.returncode == 1, worse.stdout + worse.stderr  # measured, not kept
    assert _verdict_line(worse).startswith("#1 WORSE "), worse.stdout
    assert len(list((cdot_repo / "runs").glob("cdot-*"))) == 2
