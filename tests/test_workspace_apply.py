"""One patch routine for try, the loop, the slots and reproduce: it never depends on where the
user stands, never honours a tree's own git configuration, and the editable surface is regular
files only (issue 17.1, issue 16.5)."""

import json
import os
import subprocess

import pytest

from lab.agents import Proposal
from lab.envs import get
from lab.errors import HarnessContractError, PatchRejected
from lab.harness import stage_editable
from lab.loop import Lab, Settings
from lab.workspace import Workspace, apply_patch, git, guard_patch

from conftest import CDOT, lab_cli, new_try_run

TWO = (CDOT / "solutions" / "correct" / "two-accumulators.patch").read_text()

SYMLINK_NEW = ("diff --git a/evil.c b/evil.c\nnew file mode 120000\nindex 0000000..1111111\n"
               "--- /dev/null\n+++ b/evil.c\n@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n")
SYMLINK_AS_WORK = ("diff --git a/work.c b/work.c\ndeleted file mode 100644\nindex 1111111..0000000\n"
                   "--- a/work.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n"
                   "diff --git a/work.c b/work.c\nnew file mode 120000\nindex 0000000..2222222\n"
                   "--- /dev/null\n+++ b/work.c\n@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n")
MODE_CHANGE = "diff --git a/work.c b/work.c\nold mode 100644\nnew mode 100755\n"
SUBMODULE = ("diff --git a/work.c b/work.c\nnew file mode 160000\nindex 0000000..3333333\n"
             "--- /dev/null\n+++ b/work.c\n@@ -0,0 +1 @@\n+Subproject commit 3333333333333333333333333333333333333333\n")
BINARY = ("diff --git a/work.c b/work.c\nindex 1111111..2222222 100644\nGIT binary patch\nliteral 3\n"
          "KcmZ?wWB>pF01yBG\n\nliteral 0\nHcmV?d00001\n\n")
REFUSED = {"symlink": [SYMLINK_NEW, SYMLINK_AS_WORK], "mode change": [MODE_CHANGE],
           "submodule": [SUBMODULE], "binary patch": [BINARY]}


def _tree(path, text=None):
    path.mkdir(parents=True)
    (path / "work.c").write_text(text if text is not None else (CDOT / "work.c").read_text())
    return path


def test_a_stage_inside_a_git_checkout_gets_the_patch(cdot, cdot_repo):
    """The default `runs/` lies in the user's checkout; `git apply` run there skips every path
    outside that subfolder and exits 0. The lab's routine applies it all, or refuses."""
    tree = _tree(cdot_repo / "runs" / "records" / "x-reproduce" / "candidate")
    plain = subprocess.run(["git", "apply", "-"], cwd=tree, input=TWO, text=True, capture_output=True)
    assert plain.returncode == 0 and "s0 + s1" not in (tree / "work.c").read_text(), \
        "the trap this guards against: git apply in a subfolder of a repository is a silent no-op"
    assert apply_patch(TWO, tree, cdot) == ["work.c"]
    assert "s0 + s1" in (tree / "work.c").read_text()
    assert not git(cdot_repo, "status", "--porcelain").strip()  # the checkout is untouched


def test_a_tree_with_its_own_git_config_and_attributes_is_not_honoured(cdot, tmp_path):
    tree = _tree(tmp_path / "base")
    marker = tmp_path / "MARKER"
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    with open(tree / ".git" / "config", "a") as f:
        f.write(f'[filter "evil"]\n\tclean = touch {marker}; cat\n\tsmudge = touch {marker}; cat\n'
                f'[core]\n\tattributesFile = {tree / "attrs"}\n\thooksPath = {tree}\n')
    (tree / ".gitattributes").write_text("* filter=evil\n*.c filter=evil\n")
    (tree / "attrs").write_text("* filter=evil\n")
    apply_patch(TWO, tree, cdot)
    assert "s0 + s1" in (tree / "work.c").read_text()
    assert not marker.exists(), "a command of the tree's git configuration ran"


def test_a_patch_that_changes_nothing_is_an_error(cdot, tmp_path):
    tree = _tree(tmp_path / "t", "int x;\n")
    same = "--- a/work.c\n+++ b/work.c\n@@ -1 +1 @@\n-int x;\n+int x;\n"
    with pytest.raises(PatchRejected, match="applies to nothing"):
        apply_patch(same, tree, cdot)
    with pytest.raises(PatchRejected, match="does not apply"):
        apply_patch(TWO, tree, cdot)
    assert (tree / "work.c").read_text() == "int x;\n"


def test_git_metadata_in_a_patch_is_refused(cdot):
    attrs = "--- /dev/null\n+++ b/.gitattributes\n@@ -0,0 +1 @@\n+* filter=evil\n"
    with pytest.raises(PatchRejected, match="git metadata"):
        guard_patch(attrs, cdot)


@pytest.mark.parametrize("reason", sorted(REFUSED))
def test_only_regular_files_guard(reason, cdot):
    for patch in REFUSED[reason]:
        with pytest.raises(PatchRejected) as info:
            guard_patch(patch, cdot)
        assert info.value.reason == reason, (patch, info.value)


def test_only_regular_files_in_the_workspace(cdot, tmp_path):
    ws = Workspace.create(cdot, tmp_path / "wt", "lab/t-regular")
    base = ws.head()
    for reason, patches in REFUSED.items():
        for patch in patches:
            with pytest.raises(PatchRejected, match=reason):
                ws.apply(patch, "x", set())
            assert ws.head() == base and not git(ws.worktree, "status", "--porcelain").strip()
            assert not os.path.islink(ws.tree / "work.c")


def test_only_regular_files_in_the_loop(cdot, cdot_repo):
    lab = Lab.start(cdot, cdot_repo / "runs", get("native"), Settings(canary_every=0))
    for reason, patches in REFUSED.items():
        for patch in patches:
            event = lab.experiment(Proposal(patch=patch, hypothesis=reason))
            assert event["type"] == "rejected" and event["reason"] == reason, event
    types = [e["type"] for e in lab.folder.events()]
    assert "evaluating" not in types and not (lab.folder.path / "evaluations").exists()


def test_only_regular_files_in_lab_try(cdot, cdot_repo, tmp_path):
    run = None
    for reason, patches in REFUSED.items():
        for i, text in enumerate(patches):
            patch = tmp_path / f"{reason.replace(' ', '_')}-{i}.patch"
            patch.write_text(text)
            out = lab_cli("try", str(cdot.root), str(patch), "--json", *(["--run", str(run)] if run else []),
                          cwd=cdot_repo)
            assert out.returncode == 2, out.stderr  # refused
            data = json.loads(out.stdout)
            assert data["event"]["type"] == "rejected" and data["event"]["reason"] == reason, data["event"]
            assert data["run"] is None  # refused before a run was made
    assert not (cdot_repo / "runs").exists() or not list((cdot_repo / "runs").glob("cdot*")), \
        "refused before anything ran (not even the noise floor)"
    # the same refusals inside a run that exists: each is that run's experiment, nothing measured
    run = cdot_repo / "runs" / new_try_run(cdot_repo)
    for reason, patches in REFUSED.items():
        for i, text in enumerate(patches):
            patch = tmp_path / f"{reason.replace(' ', '_')}-{i}.patch"
            out = lab_cli("try", str(cdot.root), str(patch), "--json", "--run", str(run), cwd=cdot_repo)
            assert out.returncode == 2, out.stderr
            event = json.loads(out.stdout)["event"]
            assert event["type"] == "rejected" and event["reason"] == reason and event["number"], event
    assert not (run / "evaluations").exists(), "refused before anything ran (not even the noise floor)"


def test_staging_refuses_a_symlink_in_place_of_an_editable_file(cdot, tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    (tmp_path / "secret").write_text("int work;\n")
    (tree / "work.c").symlink_to(tmp_path / "secret")
    with pytest.raises(HarnessContractError, match="regular file"):
        stage_editable(cdot, tree, tmp_path / "stage")
    with pytest.raises(PatchRejected, match="not a regular file"):
        apply_patch(TWO, tree, cdot)


def test_the_users_git_environment_does_not_redirect_the_lab(cdot, cdot_repo, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True)
    monkeypatch.setenv("GIT_DIR", str(elsewhere / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(elsewhere))
    ws = Workspace.create(cdot, tmp_path / "wt", "lab/t-env")
    commit, _ = ws.apply(TWO, "lab #1", set())
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    assert git(ws.worktree, "log", "-1", "--format=%H").strip() == commit
    assert subprocess.run(["git", "-C", str(elsewhere), "rev-parse", "HEAD"], capture_output=True).returncode != 0
