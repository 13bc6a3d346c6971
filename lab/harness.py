"""The harness contract, discovery of harnesses, and the lock manifest.

A harness is a folder with `harness.py` (one subclass of `Harness`), `program.md` (the agent's
notes), `lock.json` (sha256 of every file outside the editable surface) and its editable files.
The lab loads the harness from a pristine, lock-verified folder; a candidate contributes only
the files of the editable surface, staged into a folder of their own (see `stage_editable`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import HarnessContractError, HarnessNotFound, LabError, LockedFileChanged
from .records import Build, Check, Environment, Metric, Sample

LOCK_FILE = "lock.json"
IMAGE_LOCK = "image.lock.json"  # written by `lab publish` after the lock: not part of the locked side
UNLOCKED = {LOCK_FILE, IMAGE_LOCK}
# Never part of a harness's identity: byte-code caches and editor droppings.
IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".DS_Store"}


class Harness:
    """Subclass this in `<harness>/harness.py`. The runner, not the harness, interleaves,
    collects telemetry, pins CPUs and writes JSON: a harness only builds, checks and samples."""

    name: str = ""
    description: str = ""
    metric: Metric = Metric("seconds", "s", higher_is_better=False)
    editable: tuple[str, ...] = ()  # globs relative to the harness folder
    environment: Environment = Environment()
    # No unit of work can physically take less than this (seconds); faster results are rejected.
    speed_of_light_seconds: float | None = None
    # Bounds the runner enforces on one evaluation (the lab kills the process group past them).
    timeout_seconds: float = 600.0
    min_pairs: int = 20
    # Reload both sides every block of pairs, alternating which is allocated first. Where the
    # buffers land can matter by more than delta: on an H200 a wavegru candidate loaded second
    # timed 0.4-1.3% slower than the identical incumbent loaded first in 9 of 9 A/A experiments,
    # 4 of them judged WORSE (docs/scaling.md, "A placement bias"). Costs a load and a warm-up per side per block.
    rotate_placement: bool = False
    # Python packages (distribution names) the harness's timing depends on, beyond the lab's own
    # (torch, numpy, ...): their versions go into every record's fingerprint.
    software: tuple[str, ...] = ()
    min_timing_seconds: float = 2.0
    max_timing_seconds: float = 30.0
    oracle_seeds: int = 2  # secret seeds per check
    # Seeds of the agent's draft check (its `check` tool): public, fixed; empty: 1..oracle_seeds.
    # A verdict never uses them: every evaluation draws fresh secret seeds.
    public_seeds: tuple[int, ...] = ()
    # Globs of this folder the agent's tools never open, besides solutions/, evidence/, runs/,
    # records/ and .git (lab/agents/tools.py DEFAULT_PRIVATE): anything that would be a hint.
    private: tuple[str, ...] = ()
    # What `--model PATH` gives a harness whose workload runs a model file the user may swap
    # (llamacpp: "a GGUF model file"); empty: the harness takes none. The lab hands the file to
    # every runner (mounted read-only in a container) and records its identity with each result.
    model_help: str = ""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.model_path: Path | None = None  # set by use_model; None: the harness's own model

    # --- the methods a harness implements -------------------------------------------------
    def build(self, src: Path, out: Path) -> Build:
        """Build the editable files staged in `src` into `out` with the harness's own flags."""
        raise NotImplementedError

    def check(self, build: Build, seeds: list[int]) -> Check:
        """Run the oracle on `build` with secret `seeds`."""
        raise NotImplementedError

    def load(self, build: Build) -> Any:
        """Prepare a build for timing (load a module, allocate buffers). Default: the build."""
        return build

    def sample(self, loaded: Any, seed: int) -> Sample:
        """Time one full unit of the metric on fresh inputs drawn from `seed`; verify its outputs."""
        raise NotImplementedError

    def unload(self, loaded: Any) -> None:
        """Release what `load` took."""

    def profile(self, build: Build) -> str:
        """A short profile digest for the agent; never feeds a verdict."""
        return f"harness {self.name} has no profiler"

    def workload(self) -> dict:
        """The fixed amount of work one sample does, as counters the change monitor shows."""
        return {}

    def preflight(self) -> None:
        """Raise EnvironmentUnavailable when this machine cannot evaluate the harness."""

    def describe_model(self, path: Path) -> dict:
        """Validate the model file at `path` (raise with the reason when it cannot be used) and
        return its identity: at least {"name", "sha256", "bytes"}. Harnesses with model_help implement it."""
        raise NotImplementedError

    def source_tree(self) -> Path:
        """The tree whose editable files candidates change, inside a git repository (runs get a
        worktree of it). By default the harness folder itself; a harness over a third-party
        tree (llama.cpp) returns a repository it prepares, e.g. in the cache."""
        return self.root

    # --- provided ------------------------------------------------------------------------
    @property
    def program(self) -> Path:
        return self.root / "program.md"

    def use_model(self, path: str | Path) -> dict:
        """Run the workload on the model at `path` instead of the harness's own; its identity."""
        if not self.model_help:
            raise LabError(f"harness '{self.name}' takes no --model: its workload is fixed; leave --model out")
        path = Path(path).expanduser().resolve()
        identity = self.describe_model(path)
        self.model_path = path
        return identity

    def model_identity(self) -> dict | None:
        """The chosen model's identity (use_model), None while the harness runs its own."""
        return None if self.model_path is None else self.describe_model(self.model_path)

    def is_editable(self, relpath: str) -> bool:
        return matches_any(relpath, self.editable)

    def editable_files(self, tree: Path) -> list[str]:
        """Relative paths of the files under `tree` that belong to the editable surface."""
        return [p for p in _walk(tree) if self.is_editable(p)]

    def locked_files(self) -> list[str]:
        return [p for p in _walk(self.root) if p not in UNLOCKED and not self.is_editable(p)]

    def lock_hashes(self) -> dict[str, str]:
        return {p: sha256_file(self.root / p) for p in self.locked_files()}

    def lock_digest(self) -> str:
        """One hash for the whole locked side: what bundles and image labels carry."""
        return sha256_text(json.dumps(self.lock_hashes(), sort_keys=True))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric.to_dict(),
            "editable": list(self.editable),
            "environment": self.environment.to_dict(),
            "model_option": self.model_help,
            "root": str(self.root),
        }


# --- glob matching ------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _glob_regex(glob: str) -> re.Pattern:
    """`**` crosses folders, `*` and `?` do not (as in .gitignore)."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def matches_any(relpath: str, globs) -> bool:
    return any(_glob_regex(g).match(relpath) for g in globs)


# --- hashing ------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_differences(expected: dict[str, str], actual: dict[str, str], manifest: str) -> list[str]:
    """What differs between two {relative path: sha256} maps: changed, missing, and files
    `manifest` (e.g. "the lock") does not name; sorted, one line each."""
    changed = sorted(p for p in expected if p in actual and actual[p] != expected[p])
    missing = sorted(p for p in expected if p not in actual)
    added = sorted(p for p in actual if p not in expected)
    return ([f"changed: {p}" for p in changed] + [f"missing: {p}" for p in missing]
            + [f"not in {manifest}: {p}" for p in added])


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _walk(tree: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_PARTS and d != ".git")
        for name in sorted(filenames):
            if name in IGNORED_PARTS or name.endswith(".pyc"):
                continue
            out.append(Path(dirpath, name).relative_to(tree).as_posix())
    return out


def tree_hash(tree: Path, files: list[str]) -> str:
    """Content hash of `files` under `tree`: names and bytes, order-independent."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + sha256_file(tree / rel).encode() + b"\n")
    return h.hexdigest()


# --- the lock manifest --------------------------------------------------------------------
def write_lock(harness: Harness) -> Path:
    path = harness.root / LOCK_FILE
    data = {"harness": harness.name, "files": harness.lock_hashes()}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def verify_lock(harness: Harness) -> None:
    """Refuse to evaluate when any locked file differs from `lock.json`, naming the file."""
    path = harness.root / LOCK_FILE
    if not path.exists():
        raise LockedFileChanged(
            f"harness '{harness.name}' has no {LOCK_FILE}; run `lab lock {harness.root}` on a "
            "trusted checkout to record its locked files"
        )
    try:
        expected = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise LockedFileChanged(f"{path} is not a lock manifest ({exc}); restore it from git") from None
    actual = harness.lock_hashes()
    problems = manifest_differences(expected, actual, "the lock")
    if problems:
        raise LockedFileChanged(
            f"harness '{harness.name}' has locked files that differ from {LOCK_FILE}: "
            + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Restore them (git checkout), or re-lock with `lab lock` if the change is yours."
        )


def stage_editable(harness: Harness, tree: Path, dest: Path) -> str:
    """Copy only the editable files of `tree` to `dest`; return their content hash.

    The candidate's other files never reach the build: whatever else a tree holds, the harness
    builds from its own locked files plus exactly these. The editable surface is regular files: a
    symlink (or anything else) in its place is refused, never followed."""
    files = harness.editable_files(tree)
    odd = [rel for rel in files if not stat.S_ISREG(os.lstat(tree / rel).st_mode)]
    if odd:
        raise HarnessContractError(
            f"{tree} holds {', '.join(odd[:5])} as something other than a regular file (a symlink?); "
            f"the editable surface of '{harness.name}' is regular files only"
        )
    if not files:
        raise HarnessContractError(
            f"{tree} holds none of the editable files of '{harness.name}' ({', '.join(harness.editable)})"
        )
    if dest.exists():
        shutil.rmtree(dest)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / rel, dest / rel)
    return tree_hash(dest, files)


# --- discovery ------------------------------------------------------------------------------
def repo_root() -> Path:
    """The lab's own checkout (the package is installed from it in editable mode)."""
    return Path(__file__).resolve().parent.parent


def search_path() -> list[Path]:
    """Where harnesses are found by name, first match wins: $LAB_HARNESS_PATH, ./harnesses, the
    lab's own harnesses, then its examples (cdot: the CPU harness of the README's quickstart)."""
    paths = [Path(p) for p in os.environ.get("LAB_HARNESS_PATH", "").split(os.pathsep) if p]
    paths += [Path.cwd() / "harnesses", repo_root() / "harnesses", repo_root() / "examples"]
    seen, out = set(), []
    for p in paths:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def available() -> dict[str, Path]:
    """Harness name -> folder, for every folder with a harness.py on the search path."""
    found: dict[str, Path] = {}
    for base in search_path():
        if base.is_dir():
            for child in sorted(base.iterdir()):
                if (child / "harness.py").is_file():
                    found.setdefault(child.name, child)
    return found


def load(name_or_path: str | Path, model: str | Path | None = None) -> Harness:
    """A harness by name (searched on the harness path) or by folder path; `model`: a model file
    for a harness that takes one (Harness.use_model)."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        folder = candidate
    else:
        known = available()
        if str(name_or_path) not in known:
            names = ", ".join(sorted(known)) or "none"
            raise HarnessNotFound(
                f"no harness named '{name_or_path}' (known: {names}); give a harness folder's path, "
                "or add its parent folder to LAB_HARNESS_PATH"
            )
        folder = known[str(name_or_path)]
    harness = _load_folder(folder.resolve())
    if model:
        harness.use_model(model)
    return harness


def _load_folder(folder: Path) -> Harness:
    module_file = folder / "harness.py"
    if not module_file.is_file():
        raise HarnessContractError(
            f"{folder} is not a harness: it has no harness.py defining a subclass of lab.Harness"
        )
    # Load the folder as a package so that harness.py may import its siblings relatively.
    package = "lab_harness_" + re.sub(r"\W", "_", folder.name) + "_" + sha256_text(str(folder))[:8]
    if package not in sys.modules:
        # A bare package whose __path__ is the folder: no __init__.py needed.
        spec = importlib.util.spec_from_loader(package, loader=None, is_package=True)
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(folder)]
        sys.modules[package] = pkg
    modname = package + ".harness"
    module = sys.modules.get(modname)
    if module is None:
        spec = importlib.util.spec_from_file_location(modname, module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[modname]
            raise
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Harness) and obj is not Harness
        and obj.__module__ == modname
    ]
    if len(classes) != 1:
        raise HarnessContractError(
            f"{module_file} must define exactly one subclass of lab.Harness (found {len(classes)})"
        )
    cls = classes[0]
    for attr in ("name", "editable"):
        if not getattr(cls, attr):
            raise HarnessContractError(f"{cls.__name__} in {module_file} must set `{attr}`")
    for method in ("build", "check", "sample"):
        if getattr(cls, method) is getattr(Harness, method):
            raise HarnessContractError(f"{cls.__name__} in {module_file} must implement `{method}`")
    return cls(folder)
