"""The pinned llama.cpp tree: fetched once into the cache, kept as a git repository.

In real use one would clone llama.cpp at the pinned commit; our machines reach PyPI but not
GitHub, so the tree comes from the sdist of llama-cpp-python 0.3.36, which vendors llama.cpp at
commit 0c1e57098 under vendor/llama.cpp. The sdist is pinned by sha256 and the unpacked tree by
its git tree hash, so every machine builds the same bytes. The repository is what runs get a
worktree of (Harness.source_tree); builds take their pristine files from its pinned commit with
`git archive`, never from a checkout someone could have edited.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lab.errors import EnvironmentUnavailable

COMMIT = "0c1e57098"  # llama.cpp, 2026-10-01, as vendored by llama-cpp-python 0.3.36
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
# git's tree hash of the unpacked vendor/llama.cpp (its submodule pointer `.git` removed).
TREE_HASH = "b2da53584951ec8aa40680229509a6646a637560"

# A fixed identity and date make the repository's commit the same on every machine.
_GIT_ENV = {"GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@localhost",
            "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@localhost",
            "GIT_AUTHOR_DATE": "2026-10-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-10-01T00:00:00Z",
            "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def _git(cwd: Path, *args: str, stdout=subprocess.PIPE) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                          env={**os.environ, **_GIT_ENV})
    if proc.returncode != 0:
        raise EnvironmentUnavailable(f"git {' '.join(args[:2])} failed in {cwd}: {proc.stderr.decode().strip()}")
    return proc.stdout.decode() if stdout == subprocess.PIPE else ""


def sha256_of(path: Path) -> str:
    from lab.harness import sha256_file

    return sha256_file(path)


def fetch_sdist(home: Path) -> Path:
    """The pinned sdist, downloaded once with pip (PyPI only, no build, no dependencies)."""
    target = home / "sdist" / SDIST
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 SDIST_REQUIREMENT, "-d", tmp], capture_output=True, text=True)
            got = Path(tmp) / SDIST
            if proc.returncode != 0 or not got.exists():
                raise EnvironmentUnavailable(
                    f"could not download the llama.cpp source ({SDIST_REQUIREMENT} sdist from PyPI): "
                    f"{(proc.stderr or proc.stdout).strip()[-400:]}; put {SDIST} into {target.parent} by hand")
            os.replace(got, target)
    digest = sha256_of(target)
    if digest != SDIST_SHA256:
        raise EnvironmentUnavailable(f"{target} has sha256 {digest}, not the pinned {SDIST_SHA256}; delete it "
                                     "and let the harness download it again")
    return target


def prepare_tree(home: Path) -> Path:
    """The git repository holding the pristine tree at `home/tree/COMMIT` (made once)."""
    repo = home / "tree" / COMMIT
    if (repo / ".git").is_dir() and _has_tree(repo):
        return repo
    sdist = fetch_sdist(home)
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{COMMIT}-", dir=repo.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDORED) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(VENDORED):]
            members = [m for m in members if m.name and m.name != ".git"]
            tar.extractall(staging, members=members, filter="tar")
        _git(staging, "init", "-q", "-b", "main", ".")
        _git(staging, "add", "-A", "-f")
        _git(staging, "commit", "-q", "--no-verify", "-m", f"llama.cpp {COMMIT} (vendor/llama.cpp of {SDIST})")
        tree = _git(staging, "rev-parse", "HEAD^{tree}").strip()
        if tree != TREE_HASH:
            raise EnvironmentUnavailable(f"the unpacked llama.cpp tree hashes to {tree}, not the pinned {TREE_HASH}")
        if repo.exists():
            shutil.rmtree(repo)
        os.replace(staging, repo)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return repo


def _has_tree(repo: Path) -> bool:
    return subprocess.run(["git", "cat-file", "-e", TREE_HASH + "^{tree}"], cwd=repo,
                          capture_output=True).returncode == 0


def export_pristine(repo: Path, dest: Path, paths: tuple[str, ...] = ()) -> None:
    """Write the pinned tree's files (or those under `paths`) into `dest`, from git's objects by
    the pinned tree hash: whatever a checkout or a branch of the repository holds now, these are
    the pinned bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", TREE_HASH, "--", *paths], cwd=repo,
                               stdout=subprocess.PIPE,
                               env={**os.environ, **_GIT_ENV})
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(dest, filter="tar")
    if archive.wait() != 0:
        raise EnvironmentUnavailable(f"git archive failed in {repo}")


def pristine_blobs(repo: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """path -> git blob hash of the pinned tree's files under `paths`."""
    out = _git(repo, "ls-tree", "-r", "--full-tree", TREE_HASH, "--", *paths)
    blobs = {}
    for line in out.splitlines():
        meta, _, path = line.partition("\t")
        kind, blob = meta.split()[1:3]
        if kind == "blob":
            blobs[path] = blob
    return blobs


def blob_hash(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
