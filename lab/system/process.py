"""Where a runner runs and how long it lives: set by the runner itself, at its start.

The lab starts runners from threads (one per evaluation slot), and Python documents preexec_fn
as unsafe in a process with threads (the child may deadlock before exec). So the lab passes the
runner's placement in its environment (`placement_env`) and the runner applies it first thing
(`place_self`): its CPU set, and its death with the lab, even by kill -9, so that an orphaned
runner never keeps a hung kernel or a core busy.

What the lab starts outside its own process tree (a runner's container) cannot die with it; it
carries `owner_identity()` instead, and `owner_gone` tells whoever finds it later whether its lab
is still alive (lab/envs/docker.py sweeps those whose lab is gone).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from pathlib import Path
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


# --- who owns something outside this process (a container) -------------------------------------
# A process named so that nothing else is taken for it: the machine (host name and machine id: two
# VMs may share a host name, two clones a machine id), the boot (a reboot ends every process), the
# pid namespace (a lab in a container shares the boot with the host's labs but not their pids),
# the pid and its start time (a pid is reused). "-" where the system has no such thing (not Linux).
OWNER_FIELDS = ("host", "machine", "boot", "pidns", "pid", "started")


def owner_identity(pid: int | None = None) -> str:
    """This process (or `pid`, of this machine and pid namespace), as OWNER_FIELDS joined by "/"."""
    pid = os.getpid() if pid is None else pid
    return "/".join([*_here(), str(pid), _start_ticks(pid) or "-"])


def owner_gone(identity: str) -> bool:
    """Whether the process an `owner_identity` names has ended, as far as this process can tell:
    True only when it was of this machine and is gone (the machine rebooted since, or no such
    process in this pid namespace). Another machine's, another pid namespace's, or a label that
    does not parse, is never taken for gone."""
    parts = identity.split("/")
    if len(parts) != len(OWNER_FIELDS) or not parts[4].isdigit():
        return False
    host, machine, boot, pidns, pid, started = parts
    here_host, here_machine, here_boot, here_pidns = _here()
    if (host, machine) != (here_host, here_machine):
        return False
    if boot != here_boot:
        return True
    if pidns != here_pidns:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, as another user's
    return started != "-" and _start_ticks(int(pid)) != started


def _here() -> list[str]:
    """host, machine, boot and pid namespace of this process."""
    return [socket.gethostname(), _read("/etc/machine-id"), _read("/proc/sys/kernel/random/boot_id"),
            "".join(c for c in _link("/proc/self/ns/pid") if c.isdigit()) or "-"]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip().replace("/", "-") or "-"
    except OSError:
        return "-"


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command's parentheses
