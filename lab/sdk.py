"""What a harness may use of the lab: the one lab module that code under harnesses/ imports.

Everything else in `lab` may change without notice to a harness; tests/test_imports.py fails
when a harness imports any other lab module. What is here:

- the contract: `Harness` and the records it returns (`Build`, `Check`, `CheckItem`, `Sample`,
  `Metric`, `Environment`), the outcome vocabulary (`Status`); `load` (a harness by name or folder);
- the errors a harness raises (`EnvironmentUnavailable`, `CandidateAborted`, `MissingExtra`, ...)
  and `require` (an optional package, or MissingExtra naming its extra);
- hashes: `sha256_file`, `sha256_text`, `tree_hash`, `tree_files`;
- caches: `default_cache()` (the root of every cache), `fetch` (a verified cache entry, re-hashed
  on every read) and `build_cached` (the harness's own build through that cache);
- `file_lock` / `try_lock` (flock across processes);
- `sandbox`: the module that runs candidate code (`sandbox.Sandbox`, `Bind`, `Limits`, `kill`, ...);
- `git`, `git_run`, `git_env` (git without the user's GIT_* variables);
- `progress`: say what a long step is doing (`progress.stage`, a line or a spinner);
- `telemetry`: read-only NVML (`open_nvml`, `device_handle`, `read`) for a profile digest.
"""

from __future__ import annotations

from . import progress, sandbox
from .cache import Entry, build_cached, default_cache, fetch
from .errors import (CandidateAborted, EnvironmentUnavailable, HarnessContractError, LabError, MissingExtra,
                     summary)
from .extras import require
from .git import env as git_env
from .git import git
from .git import run as git_run
from .harness import Harness, load, sha256_file, sha256_text, tree_files, tree_hash
from .locks import file_lock, try_lock
from .records import Build, Check, CheckItem, Environment, Metric, Sample, Status
from .system import telemetry

__all__ = [
    "Build", "CandidateAborted", "Check", "CheckItem", "Entry", "Environment", "EnvironmentUnavailable",
    "Harness", "HarnessContractError", "LabError", "Metric", "MissingExtra", "Sample", "Status",
    "build_cached", "default_cache", "fetch", "file_lock", "git", "git_env", "git_run", "load", "progress", "require", "sandbox",
    "sha256_file", "sha256_text", "summary", "telemetry", "tree_files", "tree_hash", "try_lock",
]
