"""The colleague's path on the CPU (issue 17.6 and 17.8).

Bit for bit: cdot's source built in two different folders gives one artifact hash.
End to end: clone A (a git checkout of this repository in its own folder) runs `lab run` with a
replay agent to a KEEP and exports it; clone B (another checkout elsewhere, its own LAB_CACHE)
runs `lab reproduce`: the same artifact sha256, the same outputs, the speedup reproduced, exit 0.
Each clone runs its own copy of the lab (PYTHONPATH is the clone), from the default `runs/`
inside its checkout, as a person would. scripts/colleague_check.sh does the same for wavegru on a GPU.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from lab.harness import load, stage_editable
from lab.runner import build_cached

from conftest import CDOT, git, snapshot_repo



def test_one_source_built_in_two_folders_gives_one_artifact(tmp_path):
    harness = load(CDOT)
    hashes = []
    for i, where in enumerate((tmp_path / "a", tmp_path / "deeper" / "folder" / "b")):
        stage_editable(harness, CDOT, where / "stage")
        out = where / "out"
        out.mkdir()
        build = harness.build(where / "stage", out)
        assert build.ok, build.error
        hashes.append(build.artifact_sha256)
        cached = build_cached(harness, where / "stage", tmp_path / f"cache{i}")  # the runner's path, two caches
        assert cached.ok and not cached.cached
        hashes.append(cached.artifact_sha256)
    assert len(set(hashes)) == 1, hashes


def _lab(clone: Path, cache: Path, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(clone), "LAB_CACHE": str(cache), "ANTHROPIC_API_KEY": ""}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_colleague_reproduces_a_kept_result_from_another_checkout(tmp_path):
    origin = snapshot_repo(tmp_path / "origin")
    alice, bob = tmp_path / "alice" / "lab", tmp_path / "bob" / "src" / "lab"
    for clone in (alice, bob):
        git(tmp_path, "clone", "-q", str(origin), str(clone))
        git(clone, "config", "user.email", "t@t")
        git(clone, "config", "user.name", "t")
    ran = _lab(alice, tmp_path / "alice" / "cache", "run", "examples/cdot",
               "--agent", "replay:examples/cdot/solutions/correct",
               "--budget", "15m", "--max-experiments", "1", "--delta", "0.02", "--quiet")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    run_dir = next((alice / "runs").glob("cdot-*"))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["number"] for e in events if e["type"] == "kept"] == [1], ran.stdout[-2000:]
    exported = _lab(alice, tmp_path / "alice" / "cache", "export", str(run_dir.relative_to(alice)))
    assert exported.returncode == 0, exported.stderr
    bundle = alice / exported.stdout.split("wrote ", 1)[1].strip()

    shared = tmp_path / "bob" / "inbox" / bundle.name
    shared.parent.mkdir(parents=True)
    shutil.copy(bundle, shared)
    out = _lab(bob, tmp_path / "bob" / "cache", "reproduce", str(shared), "--harness", "examples/cdot", "--json")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    with tarfile.open(shared) as tar:
        recorded = json.load(tar.extractfile("bundle.json"))
    assert report["artifact_now"] == recorded["artifact_sha256"] and report["artifact_identical"]
    assert report["base_artifact_identical"] and report["outputs_identical"] and report["correct"]
    assert report["speedup_consistent"] and report["verdict_now"] == "KEEP" and report["ok"]
    assert (tmp_path / "bob" / "cache" / "builds").is_dir(), "Bob built it himself, in his own cache"
    assert not git(bob, "status", "--porcelain", "--untracked-files=no").strip(), "Bob's checkout is untouched"
