"""The pinned llama.cpp tree: fetched once into the cache, kept as a git repository.

Two ways to the same bytes, both checked against the pinned git tree hash of the tree:
- **git** (real use): clone llama.cpp (`$LAB_LLAMACPP_GIT_URL`, default GitHub) and take commit
  0c1e57098; its tree must hash to TREE_HASH, or the clone is refused with the hash it has.
- **sdist** (offline: our machines and CI reach PyPI, not GitHub): the sdist of llama-cpp-python
  0.3.36 vendors llama.cpp at that commit under vendor/llama.cpp; the sdist is pinned by sha256,
  the unpacked tree by TREE_HASH.
`$LAB_LLAMACPP_SOURCE` picks: `auto` (default: git, then the sdist where the clone fails),
`git` or `sdist`. The repository is what runs get a worktree of (Harness.source_tree); builds
take their pristine files from its pinned tree with `git archive`, never from a checkout someone
could have edited. Which way a tree came is written beside it (`<commit>.origin.json`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
from pathlib import Path

from lab.sdk import EnvironmentUnavailable, git, git_env, git_run, sha256_file

COMMIT = "0c1e57098"  # llama.cpp, 2026-10-01, as vendored by llama-cpp-python 0.3.36
UPSTREAM_URL = "https://github.com/ggml-org/llama.cpp"
ENV_SOURCE, ENV_GIT_URL = "LAB_LLAMACPP_SOURCE", "LAB_LLAMACPP_GIT_URL"
SOURCES = ("auto", "git", "sdist")
CLONE_TIMEOUT_S = 900
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
# git's tree hash of the unpacked vendor/llama.cpp (its submodule pointer `.git` removed).
TREE_HASH = "b2da53584951ec8aa40680229509a6646a637560"

# A fixed identity and date make the repository's commit the same on every machine.
_GIT_ENV = {"GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@localhost",
            "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@localhost",
            "GIT_AUTHOR_DATE": "2026-10-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-10-01T00:00:00Z"}


def _git(cwd: Path, *args: str, text: bool = True):
    return git(cwd, *args, text=text, environment=git_env(_GIT_ENV), error=EnvironmentUnavailable)


def sha256_of(path: Path) -> str:
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


def clone_tree(url: str, rev: str, tree_hash: str, dest: Path) -> None:
    """A clone of `url` in `dest` with `rev` checked out, whose tree must hash to `tree_hash`.
    Blobs come on demand (a partial clone where the server allows it): one commit's files, not
    the project's whole history."""
    _reachable(url)
    try:
        proc = git_run(dest.parent, "clone", "-q", "--filter=blob:none", "--no-checkout", url, str(dest),
                       environment=git_env(_GIT_ENV), timeout=CLONE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EnvironmentUnavailable(f"git clone {url} did not finish within {CLONE_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise EnvironmentUnavailable(f"git clone {url} failed: {proc.stderr.strip()[-300:]}")
    tree = _git(dest, "rev-parse", "--verify", "-q", f"{rev}^{{tree}}").strip()
    if tree != tree_hash:
        raise EnvironmentUnavailable(f"{url} at {rev} has the tree {tree}, not the pinned {tree_hash}")
    _git(dest, "checkout", "-q", "--detach", rev)


def _reachable(url: str, timeout: float = 5.0) -> None:
    """Fail fast on a network URL whose host does not answer: git would wait minutes for a
    firewall that drops packets. Local paths and file:// URLs pass."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "ssh", "git") or not parsed.hostname:
        return
    port = parsed.port or {"http": 80, "https": 443, "ssh": 22, "git": 9418}[parsed.scheme]
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise EnvironmentUnavailable(f"git clone {url}: {parsed.hostname}:{port} does not answer ({exc})") from None


def _unpack_sdist(sdist: Path, dest: Path) -> None:
    """The sdist's vendor/llama.cpp as a one-commit repository in `dest`, its tree checked."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(VENDORED) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(VENDORED):]
        members = [m for m in members if m.name and m.name != ".git"]
        tar.extractall(dest, members=members, filter="tar")
    _git(dest, "init", "-q", "-b", "main", ".")
    _git(dest, "add", "-A", "-f")
    _git(dest, "commit", "-q", "--no-verify", "-m", f"llama.cpp {COMMIT} (vendor/llama.cpp of {SDIST})")
    tree = _git(dest, "rev-parse", "HEAD^{tree}").strip()
    if tree != TREE_HASH:
        raise EnvironmentUnavailable(f"the unpacked llama.cpp tree hashes to {tree}, not the pinned {TREE_HASH}")


def prepare_tree(home: Path) -> Path:
    """The git repository holding the pristine tree at `home/tree/COMMIT` (made once)."""
    repo = home / "tree" / COMMIT
    if (repo / ".git").is_dir() and _has_tree(repo):
        return repo
    how = os.environ.get(ENV_SOURCE, "auto").strip().lower() or "auto"
    if how not in SOURCES:
        raise EnvironmentUnavailable(f"{ENV_SOURCE}={how!r}: use one of {', '.join(SOURCES)}")
    url = os.environ.get(ENV_GIT_URL) or UPSTREAM_URL
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{COMMIT}-", dir=repo.parent))
    origin: dict = {"commit": COMMIT, "tree": TREE_HASH}
    try:
        if how in ("auto", "git"):
            try:
                clone_tree(url, COMMIT, TREE_HASH, staging / "repo")
                origin["source"] = f"git {url}"
            except EnvironmentUnavailable as exc:
                if how == "git":
                    raise
                origin["git_failed"] = str(exc)  # kept: why this machine fell back to the sdist
                shutil.rmtree(staging / "repo", ignore_errors=True)
        if "source" not in origin:
            (staging / "repo").mkdir()
            _unpack_sdist(fetch_sdist(home), staging / "repo")
            origin["source"] = f"sdist {SDIST} (sha256 {SDIST_SHA256[:16]}...)"
        if repo.exists():
            shutil.rmtree(repo)
        os.replace(staging / "repo", repo)
        (repo.parent / f"{COMMIT}.origin.json").write_text(json.dumps(origin, indent=1) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repo


def origin(home: Path) -> str:
    """How the cached tree came (git or the sdist), as prepare_tree recorded it."""
    try:
        return json.loads((home / "tree" / f"{COMMIT}.origin.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def _has_tree(repo: Path) -> bool:
    return git_run(repo, "cat-file", "-e", TREE_HASH + "^{tree}").returncode == 0


def export_pristine(repo: Path, dest: Path, paths: tuple[str, ...] = ()) -> None:
    """Write the pinned tree's files (or those under `paths`) into `dest`, from git's objects by
    the pinned tree hash: whatever a checkout or a branch of the repository holds now, these are
    the pinned bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = _git(repo, "archive", "--format=tar", TREE_HASH, "--", *paths, text=False)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        tar.extractall(dest, filter="tar")


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


def pristine_file(repo: Path, rel: str) -> bytes:
    """The pinned tree's bytes of one file."""
    return _git(repo, "cat-file", "-p", f"{TREE_HASH}:{rel}", text=False)
