"""Where a runner runs and how long it lives: set by the runner itself, at its start.

The lab starts runners from threads (one per evaluation slot), and Python documents preexec_fn
as unsafe in a process with threads (the child may deadlock before exec). So the lab passes the
runner's placement in its environment (`placement_env`) and the runner applies it first thing
(`place_self`): its CPU set, and its death with the lab, even by kill -9, so that an orphaned
runner never keeps a hung kernel or a core busy.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Iterable, Mapping

ENV_CPUS = "LAB_RUNNER_CPUS"  # comma-separated CPU indices
ENV_PARENT = "LAB_RUNNER_PARENT"  # the pid of the lab process the runner must not outlive
PR_SET_PDEATHSIG = 1


def placement_env(cpus: Iterable[int] | None, parent: int | None = None) -> dict:
    """What the lab puts in a runner's environment: its CPU set (None: the lab's) and this process
    as the parent it dies with."""
    env = {ENV_PARENT: str(os.getpid() if parent is None else parent)}
    if cpus:
        env[ENV_CPUS] = ",".join(str(c) for c in cpus)
    return env


def place_self(environ: Mapping[str, str] = os.environ) -> None:
    """Apply the placement the lab passed (nothing where it passed none, as in a container)."""
    if environ.get(ENV_CPUS):
        os.sched_setaffinity(0, {int(c) for c in environ[ENV_CPUS].split(",")})
    if environ.get(ENV_PARENT):
        die_with(int(environ[ENV_PARENT]))


def die_with(parent: int) -> None:
    """SIGKILL this process's group when `parent` dies. The direct parent: the kernel's parent-death
    signal (PR_SET_PDEATHSIG). A parent further up (a wrapper between them: `nix develop`, a
    shell): a watcher thread on a pidfd of it. A parent already gone: die now. Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() == parent:  # checked after the prctl: a parent dead before it is seen here
        return
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        _die()
    except OSError:  # a kernel before 5.3: no pidfd
        return
    threading.Thread(target=_watch, args=(fd,), name="lab-parent-watch", daemon=True).start()


def _watch(fd: int) -> None:
    select.select([fd], [], [])  # readable once the process has exited
    _die()


def _die() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)
