"""The git worktree of a run: apply a candidate through the guard, commit, keep or reset.

A run gets its own worktree and branch `lab/<run-id>` of the repository that holds the harness
(the user's checkout is never modified: only git's worktree metadata and the new branch are
added). Patches are relative to the harness folder, so a ledger entry or a bundle applies to any
checkout of the same harness. The branch only ever holds kept commits: a candidate is committed
while it is judged, and reset away unless it is kept.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from .errors import LabError, PatchRejected
from .harness import Harness, tree_hash
from .scrub import scrub

_HEADER = re.compile(r"^(?:--- |\+\+\+ |rename from |rename to |copy from |copy to )(.*)$")


def git(cwd: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, input=input,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
    )
    if check and proc.returncode != 0:
        raise LabError(f"git {' '.join(args[:2])} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def patch_paths(patch: str) -> list[str]:
    """Every path a unified/git diff touches, without its a/ b/ prefix."""
    paths = []
    for line in patch.splitlines():
        if line.startswith("diff --git "):
            parts = line.split()
            if len(parts) >= 4:
                paths += [_strip_prefix(parts[2]), _strip_prefix(parts[3])]
            continue
        m = _HEADER.match(line)
        if m:
            raw = m.group(1).split("\t")[0].strip()
            if raw != "/dev/null":
                paths.append(_strip_prefix(raw) if line.startswith(("--- ", "+++ ")) else raw)
    return sorted(set(paths))


def _strip_prefix(p: str) -> str:
    return p[2:] if p.startswith(("a/", "b/")) else p


def guard_patch(patch: str, harness: Harness) -> list[str]:
    """Reject what no candidate may do; returns the touched paths (relative to the harness)."""
    if not patch.strip():
        raise PatchRejected("empty patch")
    if "GIT binary patch" in patch or "Binary files " in patch:
        raise PatchRejected("binary patch", "candidates are text edits of the editable surface")
    paths = patch_paths(patch)
    if not paths:
        raise PatchRejected("malformed patch", "no file headers (--- a/FILE, +++ b/FILE) found")
    for p in paths:
        pure = PurePosixPath(p)
        if pure.is_absolute() or ".." in pure.parts:
            raise PatchRejected("path escapes the harness", p)
    outside = [p for p in paths if not harness.is_editable(p)]
    if outside:
        raise PatchRejected(
            "outside the editable surface",
            f"{', '.join(outside)} (editable: {', '.join(harness.editable)})",
        )
    return paths


class Workspace:
    """A run's worktree. `prefix` is the harness folder relative to the repository root."""

    def __init__(self, worktree: Path, prefix: str, harness: Harness):
        self.worktree = Path(worktree)
        self.prefix = prefix
        self.harness = harness

    @property
    def tree(self) -> Path:
        """The harness folder inside the worktree: the tree the agent sees and edits."""
        return self.worktree / self.prefix if self.prefix else self.worktree

    # --- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, harness: Harness, worktree: Path, branch: str, base: str = "HEAD") -> "Workspace":
        repo, prefix = source_repo(harness)
        base_commit = git(repo, "rev-parse", "--verify", base + "^{commit}").strip()
        git(repo, "worktree", "add", "-q", "-b", branch, str(worktree), base_commit)
        return cls(worktree, prefix, harness)

    @classmethod
    def attach(cls, harness: Harness, worktree: Path) -> "Workspace":
        if not (worktree / ".git").exists():
            raise LabError(f"{worktree} is not a git worktree; the run folder is incomplete")
        _, prefix = source_repo(harness)
        return cls(worktree, prefix, harness)

    def head(self) -> str:
        return git(self.worktree, "rev-parse", "HEAD").strip()

    def editable_hash(self) -> str:
        return tree_hash(self.tree, self.harness.editable_files(self.tree))

    # --- candidates -------------------------------------------------------------------------
    def apply(self, patch: str, message: str, tried_hashes: set[str]) -> tuple[str, str]:
        """Guard, apply and commit a candidate; returns (commit, editable tree hash).

        Raises PatchRejected, leaving the worktree at the incumbent, when the patch touches
        anything outside the editable surface, does not apply, changes nothing, or yields a
        source identical to one already tried in this run."""
        patch, message = scrub(patch), scrub(message)  # no secret reaches the candidate, the worktree or a commit
        guard_patch(patch, self.harness)
        incumbent = self.head()
        with tempfile.NamedTemporaryFile("w", suffix=".patch", delete=False) as f:
            f.write(patch if patch.endswith("\n") else patch + "\n")
            patch_file = f.name
        directory = ["--directory", self.prefix] if self.prefix else []
        check = subprocess.run(
            ["git", "apply", "--check", "--whitespace=nowarn", *directory, patch_file],
            cwd=self.worktree, capture_output=True, text=True,
        )
        if check.returncode != 0:
            Path(patch_file).unlink()
            raise PatchRejected("does not apply", check.stderr.strip().splitlines()[0] if check.stderr else "")
        git(self.worktree, "apply", "--whitespace=nowarn", *directory, patch_file)
        Path(patch_file).unlink()
        try:
            source_hash = self.editable_hash()
            if source_hash in tried_hashes:
                raise PatchRejected("duplicate", "the resulting source is identical to one already tried")
            git(self.worktree, "add", "-A", "--", self.prefix or ".")
            if not git(self.worktree, "status", "--porcelain").strip():
                raise PatchRejected("no change", "the patch leaves the source as it was")
            git(self.worktree, "-c", "user.name=lab", "-c", "user.email=lab@localhost",
                "commit", "-q", "--no-verify", "-m", message)
        except PatchRejected:
            self.reset(incumbent)
            raise
        return self.head(), source_hash

    def keep(self, message: str) -> str:
        """The candidate stays; its message is rewritten to carry the measured gain."""
        git(self.worktree, "-c", "user.name=lab", "-c", "user.email=lab@localhost",
            "commit", "-q", "--amend", "--no-verify", "-m", message)
        return self.head()

    def reset(self, commit: str) -> None:
        git(self.worktree, "reset", "-q", "--hard", commit)
        git(self.worktree, "clean", "-q", "-fd", "--", self.prefix or ".")

    def diff_stat(self, base: str) -> str:
        return git(self.worktree, "diff", "--stat", base, "HEAD", "--", self.prefix or ".").strip()

    def diff(self, base: str, head: str = "HEAD") -> str:
        """The patch from `base` to `head`, relative to the harness folder."""
        rel = ["--relative=" + self.prefix] if self.prefix else []
        return git(self.worktree, "diff", *rel, base, head)


def source_repo(harness: Harness) -> tuple[Path, str]:
    """(repository root, source tree relative to it) for the repository holding the harness's
    source tree (see Harness.source_tree)."""
    tree = harness.source_tree().resolve()
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(
            f"{tree} is not inside a git repository; a run needs one for its "
            "worktree: run `git init && git add -A && git commit -m base` there"
        )
    repo = Path(proc.stdout.strip()).resolve()
    prefix = tree.relative_to(repo).as_posix()
    return repo, "" if prefix == "." else prefix
