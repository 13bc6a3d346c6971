"""Verified caches: every cached build, reference and model is re-hashed on every read.

An entry is a folder `<root>/<key>/` made once by trusted code (`make`), where `key` names the
content that went in (a source hash and the locked harness's digest, a model's sha256, ...). Next
to it, `<key>.manifest.json` holds the sha256 of every file of the entry and a digest over the key
and those hashes. A read (`fetch`) re-hashes every file and compares: a changed, missing, added or
non-regular file (a symlink) is a mismatch, and the entry is evicted, logged (stderr and
`<root>/evictions.log`) and made again; it is never used. Entries are written read-only.

Candidate code never sees a cache (it runs in lab.sandbox with only its stage bound), so nothing
but trusted code writes one; the re-hash is what makes any change to an entry, whoever made it,
fail loudly instead of being timed or trusted.

    entry = fetch(cache / "builds" / "cdot", key, make)   # make(folder) -> dict | None
    entry.path, entry.meta, entry.cached, entry.evicted

`build_cached` is the harness's build through such an entry (the runner's, and a harness's own
baseline); `default_cache()` is the root every cache of the lab and its harnesses lives under.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import summary
from .harness import Harness, manifest_differences, sha256_file as _sha256, tree_hash
from .locks import file_lock
from .records import Build
from .store import atomic_write, now_iso

MANIFEST_SUFFIX = ".manifest.json"
EVICTIONS_LOG = "evictions.log"


def default_cache() -> Path:
    """The root of the lab's caches (builds, references, models): $LAB_CACHE, else ~/.cache/lab."""
    return Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "lab")


class CacheMismatch(Exception):
    """An entry whose files differ from its manifest (internal: `fetch` evicts and remakes)."""


@dataclass
class Entry:
    path: Path  # the entry's folder
    meta: dict  # what `make` returned
    cached: bool  # True when read from the cache (verified), False when made now
    evicted: str = ""  # why an earlier entry under this key was thrown away, if one was


def _say(text: str) -> None:
    print(f"[cache] {text}", file=sys.stderr, flush=True)


def hash_folder(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`; raises CacheMismatch on anything that
    is not a regular file or folder (a symlink, a device, a fifo)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                raise CacheMismatch(f"{Path(dirpath, name).relative_to(folder)} is a symlink")
        for name in sorted(filenames):
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            rel = path.relative_to(folder).as_posix()
            if not stat.S_ISREG(mode):
                raise CacheMismatch(f"{rel} is not a regular file")
            out[rel] = _sha256(path)
    return out


def _digest(key: str, files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps([key, sorted(files.items())]).encode()).hexdigest()


def verify(root: Path, key: str) -> dict:
    """The manifest of the entry `key` after re-hashing its files; CacheMismatch if any differ."""
    folder, manifest_path = Path(root) / key, Path(root) / (key + MANIFEST_SUFFIX)
    try:
        manifest = json.loads(manifest_path.read_text())
        files, digest = manifest["files"], manifest["digest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheMismatch(f"its manifest cannot be read ({type(exc).__name__})") from None
    if _digest(key, files) != digest:
        raise CacheMismatch("its manifest does not match its own digest")
    if not folder.is_dir() or folder.is_symlink():
        raise CacheMismatch("its folder is missing")
    found = hash_folder(folder)
    problems = manifest_differences(files, found, "the manifest")
    if problems:
        raise CacheMismatch("; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    return manifest


def evict(root: Path, key: str, why: str, say: Callable[[str], None] = _say) -> str:
    """Throw an entry away and log why; returns the log line."""
    root = Path(root)
    line = f"{now_iso()} evicted {root / key}: {why}"
    (root / (key + MANIFEST_SUFFIX)).unlink(missing_ok=True)
    _remove(root / key)
    with open(root / EVICTIONS_LOG, "a") as f:
        f.write(line + "\n")
    say(line)
    return line


def fetch(root: Path, key: str, make: Callable[[Path], dict | None],
          say: Callable[[str], None] = _say) -> Entry | None:
    """The verified entry `key` under `root`, made by `make(folder)` when absent or evicted.

    `make` fills an empty folder and returns the entry's metadata (JSON), or None when there is
    nothing to cache (a failed build): then `fetch` returns None and keeps nothing."""
    root = Path(root)
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"bad cache key {key!r}")
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{key}.lock"):
        evicted = ""
        if (root / (key + MANIFEST_SUFFIX)).exists() or (root / key).exists():
            try:
                manifest = verify(root, key)
                return Entry(root / key, manifest.get("meta") or {}, cached=True)
            except CacheMismatch as exc:
                evicted = evict(root, key, str(exc), say)
        scratch = root / f".{key}.partial-{os.getpid()}-{time.monotonic_ns()}"
        _remove(scratch)
        scratch.mkdir()
        try:
            meta = make(scratch)
            if meta is None:
                return None
            files = hash_folder(scratch)
            _read_only(scratch)
            os.replace(scratch, root / key)
        finally:
            _remove(scratch)
        manifest = {"key": key, "files": files, "digest": _digest(key, files), "meta": meta, "made": now_iso()}
        atomic_write(root / (key + MANIFEST_SUFFIX), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return Entry(root / key, meta, cached=False, evicted=evicted)


def _read_only(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, os.stat(path).st_mode & ~0o222)


def _remove(path: Path) -> None:
    """rmtree that also removes read-only entries (and a plain file or a symlink)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


# --- builds -----------------------------------------------------------------------------------
def build_cached(harness: Harness, stage: Path, cache: Path) -> Build:
    """Build a staged tree once per (locked harness, source) pair; reuse it afterwards, re-hashed.

    The entry lives in a verified cache (`fetch`): every read re-hashes the artifact and a
    changed one is evicted, logged and rebuilt, never used. A failed build is not cached."""
    files = harness.editable_files(stage)
    source_hash = tree_hash(stage, files)
    failed: list[Build] = []

    def make(out: Path) -> dict | None:
        start = time.monotonic()
        try:
            build = harness.build(stage, out)
        except Exception as exc:  # a harness bug or an unexpected toolchain failure
            build = Build(ok=False, source_hash=source_hash, error=summary(exc))
        build.source_hash = source_hash
        build.seconds = build.seconds or time.monotonic() - start
        if not build.ok:
            failed.append(build)
            return None
        meta = build.to_dict()
        # Stored relative to the entry: the folder is renamed into place once made.
        meta["artifact"] = Path(build.artifact).resolve().relative_to(out.resolve()).as_posix() if build.artifact else ""
        return meta

    key = f"{harness.lock_digest()[:12]}-{source_hash[:20]}"
    entry = fetch(cache / "builds" / harness.name, key, make)
    if entry is None:
        return failed[0]
    build = Build.from_dict(entry.meta)
    build.artifact = str(entry.path / build.artifact) if build.artifact else ""
    build.cached = entry.cached
    if entry.evicted:
        build.info = {**build.info, "cache_evicted": entry.evicted}
    return build
