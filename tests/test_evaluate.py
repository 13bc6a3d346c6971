"""The runner and the lab's side of one evaluation, on the real cdot harness (compiled C)."""

import os
import shutil
import subprocess

import pytest

from lab.envs import get
from lab.evaluate import run_evaluation

from conftest import CDOT


def _tree(cdot, tmp_path, patch=None, name="cand"):
    tree = tmp_path / name
    shutil.copytree(cdot.root, tree, ignore=shutil.ignore_patterns("__pycache__"))
    if patch:
        subprocess.run(["git", "apply", str(CDOT / "solutions" / patch)], cwd=tree, check=True)
    return tree


def _eval(cdot, tmp_path, patch=None, mode="evaluate", **kw):
    cand = _tree(cdot, tmp_path, patch)
    return run_evaluation(cdot, cand, tmp_path / "work", env=get("native"), mode=mode,
                          incumbent_tree=cdot.root, **kw)


def test_check_of_the_pristine_tree_passes(cdot, tmp_path):
    out = _eval(cdot, tmp_path, mode="check")
    assert out.verdict.status == "PASS", out.verdict
    assert out.evaluation.check.lines == ["correctness: pass"]
    assert out.evaluation.candidate_build.artifact_sha256


def test_slower_candidate_is_worse(cdot, tmp_path):
    out = _eval(cdot, tmp_path, "wrong/slower.patch")
    assert out.verdict.status == "WORSE", out.verdict
    assert out.verdict.pairs >= 20
    assert {p.order for p in out.evaluation.pairs} == {"AB", "BA"}  # random order within pairs
    assert out.evaluation.fingerprint.get("candidate_source")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) > 1:  # timing pinned to one core, never to every core
        assert len(out.evaluation.timing_cpus) == 1 and out.evaluation.timing_cpus[0] in allowed


def test_wrong_result_fails_the_oracle(cdot, tmp_path):
    out = _eval(cdot, tmp_path, "wrong/skip-half.patch")
    assert out.verdict.status == "FAIL"
    assert "oracle" in out.evaluation.reason and not out.evaluation.pairs


def test_compile_error_is_a_fail_with_the_compiler_message(cdot, tmp_path):
    out = _eval(cdot, tmp_path, "wrong/no-compile.patch")
    assert out.verdict.status == "FAIL"
    assert "build failed" in out.evaluation.reason and "error" in out.evaluation.reason


def test_hang_is_killed_at_the_timeout(cdot, tmp_path):
    out = _eval(cdot, tmp_path, "wrong/hang.patch", timeout_s=8)
    assert out.verdict.status == "TIMEOUT"
    # nothing of the runner survives: no process still runs the staged library
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "work") not in ps


def test_a_a_is_never_keep_and_builds_are_cached(cdot, tmp_path):
    first = _eval(cdot, tmp_path, mode="aa")
    assert first.verdict.status != "KEEP"
    second = run_evaluation(cdot, cdot.root, tmp_path / "work2", env=get("native"), mode="check")
    assert second.evaluation.candidate_build.cached


def test_locked_file_change_refused_before_running(cdot, tmp_path):
    from lab.errors import LockedFileChanged

    (cdot.root / "harness.py").write_text((cdot.root / "harness.py").read_text() + "\n# edited\n")
    with pytest.raises(LockedFileChanged, match="harness.py"):
        _eval(cdot, tmp_path, mode="check")
