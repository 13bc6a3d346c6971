"""The git worktree of a run: apply a candidate through the guard, commit, keep or reset.

Every patch, wherever it comes from (`lab try`, the loop, a parallel slot, a bundle), goes through
one routine, `apply_patch`: the guard first (editable regular files only: no symlink, mode
change, submodule, binary diff or git metadata), then `git apply` in a scratch repository the lab
creates for that one patch (its own root, no user or system git configuration, no attributes, no
hooks), holding copies of exactly the files the patch names; the result is written back as
regular files. Where the user stands (a run folder inside a git checkout, a bundle's own `.git`)
cannot change what is applied, and a patch that changes nothing it names is an error.

A run gets its own worktree and branch `lab/<run-id>` of the repository that holds the harness
(the user's checkout is never modified: only git's worktree metadata and the new branch are
added). Patches are relative to the harness folder, so a ledger entry or a bundle applies to any
checkout of the same harness. The branch only ever holds kept commits: a candidate is committed
while it is judged, and reset away unless it is kept.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from .errors import LabError, PatchRejected
from .harness import Harness, tree_hash
from .scrub import scrub

_HEADER = re.compile(r"^(?:--- |\+\+\+ |rename from |rename to |copy from |copy to )(.*)$")
# Git header lines that give a file a mode other than a regular file's (symlink 120000, submodule
# 160000, executable 100755) or change one: the editable surface is regular files only.
_MODE = re.compile(r"^(old mode|new mode|new file mode|deleted file mode|index [0-9a-f]+\.\.[0-9a-f]+) (\d+)\s*$")
REGULAR_MODE = "100644"


def git(cwd: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    """git in `cwd` (a run's worktree, or the repository holding the harness): the user's GIT_DIR,
    GIT_WORK_TREE, GIT_INDEX_FILE and the like never redirect it elsewhere."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, input=input, env=git_env(),
    )
    if check and proc.returncode != 0:
        raise LabError(f"git {' '.join(args[:2])} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def git_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


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
        raise PatchRejected("empty patch", "it holds no diff; make one with `git diff > idea.patch` in the harness folder")
    if "\0" in patch:
        raise PatchRejected("binary patch", "the patch holds a NUL byte")
    for line in patch.splitlines():
        if line.startswith(("GIT binary patch", "Binary files ")):
            raise PatchRejected("binary patch", "candidates are text edits of the editable surface")
        if line.startswith("Subproject commit "):
            raise PatchRejected("submodule", "the editable surface holds regular files only")
        m = _MODE.match(line)
        if m:
            kind, mode = m.group(1), m.group(2)
            if kind in ("old mode", "new mode"):
                raise PatchRejected("mode change", f"{line.strip()}: the editable surface holds regular files only")
            if mode == "120000":
                raise PatchRejected("symlink", f"{line.strip()}: the editable surface holds regular files only")
            if mode == "160000":
                raise PatchRejected("submodule", f"{line.strip()}: the editable surface holds regular files only")
            if mode != REGULAR_MODE and not (kind == "deleted file mode" and mode == "100755"):
                raise PatchRejected("mode change", f"{line.strip()}: files are created with mode {REGULAR_MODE}")
    paths = patch_paths(patch)
    if not paths:
        raise PatchRejected("malformed patch", "no file headers (--- a/FILE, +++ b/FILE) found")
    for p in paths:
        pure = PurePosixPath(p)
        if pure.is_absolute() or ".." in pure.parts or not p.strip():
            raise PatchRejected("path escapes the harness", p)
        if any(part.lower().startswith(".git") for part in pure.parts):
            raise PatchRejected("git metadata", f"{p}: a candidate never writes git's files or attributes")
    outside = [p for p in paths if not harness.is_editable(p)]
    if outside:
        raise PatchRejected(
            "outside the editable surface",
            f"{', '.join(outside)} (editable: {', '.join(harness.editable)})",
        )
    return paths


def clean_git_env(home: Path) -> dict:
    """An environment for git that reads no user or system configuration: only what the lab sets."""
    return {**git_env(), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_ATTR_NOSYSTEM": "1",
            "HOME": str(home), "XDG_CONFIG_HOME": str(home)}


def apply_patch(patch: str, tree: Path, harness: Harness) -> list[str]:
    """Apply `patch` (relative to the harness folder) to the editable files under `tree`; returns
    the paths it changed. The one way the lab applies a candidate (see the module's docstring).

    Raises PatchRejected, leaving `tree` as it was, when the guard refuses the patch, when it does
    not apply, or when a file it names comes out unchanged (a patch never silently applies to
    nothing)."""
    paths, after, modes = _patched(patch, tree, harness)
    for rel in paths:
        dest = Path(tree) / rel
        if os.path.lexists(dest):
            dest.unlink()
        if after[rel] is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(after[rel])
            if rel in modes:
                dest.chmod(modes[rel])
    return paths


def check_patch(patch: str, tree: Path, harness: Harness) -> list[str]:
    """What apply_patch would do to `tree`, without doing it: the paths it would change, or
    PatchRejected. `lab try` asks this before it measures anything."""
    return _patched(patch, tree, harness)[0]


def _patched(patch: str, tree: Path, harness: Harness) -> tuple[list[str], dict, dict]:
    """`patch` guarded and applied in a scratch repository to copies of the files of `tree` it
    names: (paths, their bytes after it or None where it deletes them, their modes before)."""
    paths = guard_patch(patch, harness)
    tree = Path(tree)
    root = tree.resolve()
    with tempfile.TemporaryDirectory(prefix="lab-apply-") as tmp:
        scratch, home, template = Path(tmp) / "tree", Path(tmp) / "home", Path(tmp) / "template"
        for d in (scratch, home, template):
            d.mkdir()
        env = {**clean_git_env(home), "GIT_DIR": str(scratch / ".git"), "GIT_WORK_TREE": str(scratch)}
        before: dict[str, bytes | None] = {}
        modes: dict[str, int] = {}
        for rel in paths:
            src = tree / rel
            if os.path.lexists(src) and not stat.S_ISREG(os.lstat(src).st_mode):
                raise PatchRejected("not a regular file", f"{rel} in {tree} is not a regular file")
            if not src.resolve().is_relative_to(root):
                raise PatchRejected("path escapes the harness", f"{rel} (through a symlinked folder)")
            if os.path.lexists(src):
                before[rel] = src.read_bytes()
                modes[rel] = stat.S_IMODE(os.lstat(src).st_mode)
                (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
                (scratch / rel).write_bytes(before[rel])
            else:
                before[rel] = None
        patch_file = Path(tmp) / "candidate.patch"
        patch_file.write_text(patch if patch.endswith("\n") else patch + "\n")
        base = ["git", "-c", "core.attributesFile=" + os.devnull, "-c", "core.hooksPath=" + os.devnull]
        subprocess.run([*base, "init", "-q", f"--template={template}"], cwd=scratch, env=env,
                       capture_output=True, check=True)
        applied = subprocess.run([*base, "apply", "--whitespace=nowarn", str(patch_file)], cwd=scratch, env=env,
                                 capture_output=True, text=True)
        if applied.returncode != 0:
            first = (applied.stderr.strip() or applied.stdout.strip()).splitlines()
            raise PatchRejected("does not apply", first[0] if first else f"git apply exited {applied.returncode}")
        written = [p for p in _files_under(scratch) if p not in before]
        if written:
            raise PatchRejected("outside the editable surface", f"the patch wrote {', '.join(written[:5])}")
        after: dict[str, bytes | None] = {}
        for rel in paths:
            out = scratch / rel
            if os.path.lexists(out) and not stat.S_ISREG(os.lstat(out).st_mode):
                raise PatchRejected("not a regular file", f"the patch makes {rel} something else than a regular file")
            after[rel] = out.read_bytes() if out.is_file() else None
        unchanged = [rel for rel in paths if after[rel] == before[rel]]
        if unchanged:
            raise PatchRejected("applies to nothing", f"{', '.join(unchanged)} unchanged by the patch")
    return paths, after, modes


def _files_under(tree: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == tree and d == ".git")]
        out += [Path(dirpath, f).relative_to(tree).as_posix() for f in filenames]
    return out


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
        incumbent = self.head()
        apply_patch(patch, self.tree, self.harness)
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
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=tree, capture_output=True, text=True,
                          env=git_env())
    if proc.returncode != 0:
        raise LabError(
            f"{tree} is not inside a git repository; a run needs one for its "
            "worktree: run `git init && git add -A && git commit -m base` there"
        )
    repo = Path(proc.stdout.strip()).resolve()
    prefix = tree.relative_to(repo).as_posix()
    return repo, "" if prefix == "." else prefix
