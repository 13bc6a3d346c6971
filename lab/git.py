"""git, the one way the lab (and a harness, through lab.sdk) runs it.

Every call gets an environment without the user's GIT_* variables, so that GIT_DIR,
GIT_WORK_TREE, GIT_INDEX_FILE and the like never redirect a command to another repository, and
without prompts or translated messages.

    head = git(worktree, "rev-parse", "HEAD").strip()       # text; LabError when git fails
    blob = git(worktree, "cat-file", "blob", obj, text=False)
    proc = run(tree, "rev-parse", "--show-toplevel")         # the CompletedProcess, never raises
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from .errors import LabError


def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment less every GIT_* variable, plus `extra`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**out, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", **(extra or {})}


def isolated_env(home: Path) -> dict[str, str]:
    """An environment in which git reads no user or system configuration: only what the caller sets."""
    return env({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_ATTR_NOSYSTEM": "1",
                "HOME": str(home), "XDG_CONFIG_HOME": str(home)})


def run(cwd: Path, *args: str, input: str | bytes | None = None, text: bool = True,
        environment: Mapping[str, str] | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`git *args` in `cwd`, output captured; the caller reads the return code. `environment`
    replaces env() (build it with env() or isolated_env())."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=text, input=input,
                          env=dict(environment) if environment is not None else env(), timeout=timeout)


def git(cwd: Path, *args: str, check: bool = True, input: str | bytes | None = None, text: bool = True,
        environment: Mapping[str, str] | None = None, error: type[LabError] = LabError):
    """The standard output of `git *args` in `cwd` (str, or bytes with text=False); raises `error`
    with git's message when it fails and `check` is set."""
    proc = run(cwd, *args, input=input, text=text, environment=environment)
    if check and proc.returncode != 0:
        message = proc.stderr or proc.stdout
        if isinstance(message, bytes):
            message = message.decode(errors="replace")
        raise error(f"git {' '.join(args[:2])} failed in {cwd}: {message.strip()}")
    return proc.stdout
