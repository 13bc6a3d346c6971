import pytest

from lab.errors import PatchRejected
from lab.workspace import Workspace, git, guard_patch, patch_paths

from conftest import CDOT


def _patch(name):
    return (CDOT / "solutions" / name).read_text()


HARNESS_EDIT = """diff --git a/harness.py b/harness.py
--- a/harness.py
+++ b/harness.py
@@ -1,1 +1,1 @@
-\"\"\"cdot: a tiny CPU harness for the lab's own tests (a compiled C function whose speed a patch
+\"\"\"hacked
"""


def test_patch_paths():
    assert patch_paths(_patch("wrong/slower.patch")) == ["work.c"]
    assert patch_paths(HARNESS_EDIT) == ["harness.py"]


def test_guard_rejects_outside_surface_and_escapes(cdot):
    with pytest.raises(PatchRejected, match="outside the editable surface.*harness.py"):
        guard_patch(HARNESS_EDIT, cdot)
    with pytest.raises(PatchRejected, match="escapes"):
        guard_patch("--- a/../x.c\n+++ b/../x.c\n@@ -1 +1 @@\n-a\n+b\n", cdot)
    with pytest.raises(PatchRejected, match="empty"):
        guard_patch("  \n", cdot)
    with pytest.raises(PatchRejected, match="malformed"):
        guard_patch("just some text\n", cdot)


def test_apply_keep_discard_duplicate(cdot_repo, cdot, tmp_path):
    head_before = git(cdot_repo, "rev-parse", "HEAD")
    ws = Workspace.create(cdot, tmp_path / "wt", "lab/test-run")
    base = ws.head()
    commit, h1 = ws.apply(_patch("correct/two-accumulators.patch"), "lab #1: two chains", set())
    assert commit != base and "s0 + s1" in (ws.tree / "work.c").read_text()
    ws.reset(base)
    assert "s0" not in (ws.tree / "work.c").read_text()
    # the same resulting source again is a duplicate, and the worktree stays at the incumbent
    with pytest.raises(PatchRejected, match="duplicate"):
        ws.apply(_patch("correct/two-accumulators.patch"), "again", {h1})
    assert ws.head() == base and "s0" not in (ws.tree / "work.c").read_text()
    # keep: the commit stays, with the measured gain in its message
    ws.apply(_patch("correct/two-accumulators.patch"), "lab #2", set())
    kept = ws.keep("lab #2: two chains\n\nspeedup 1.5x")
    assert "speedup 1.5x" in git(ws.worktree, "log", "-1", "--format=%B", kept)
    assert git(ws.worktree, "rev-list", "--count", f"{base}..HEAD").strip() == "1"
    # the user's checkout is untouched
    assert git(cdot_repo, "rev-parse", "HEAD") == head_before
    assert "s0" not in (cdot_repo / "harnesses" / "cdot" / "work.c").read_text()
    assert not git(cdot_repo, "status", "--porcelain").strip()


def test_patch_that_does_not_apply(cdot, tmp_path):
    ws = Workspace.create(cdot, tmp_path / "wt", "lab/t2")
    bad = _patch("wrong/slower.patch").replace("double s = 0.0;", "double q = 1.0;")
    with pytest.raises(PatchRejected, match="does not apply"):
        ws.apply(bad, "x", set())
    assert not git(ws.worktree, "status", "--porcelain").strip()
