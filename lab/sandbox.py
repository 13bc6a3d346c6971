"""The sandbox that every process compiling or running candidate code goes through.

Candidate code is hostile (docs/security.md): it may read any file it can reach, write any file
it can reach and signal any process it can see. So a candidate process (nvcc on a kernel, the C
compiler, llama.cpp's build and its tools, the mlx worker) runs under bubblewrap with:

- its own mount namespace, built from nothing: the toolchain (/usr, /etc, /opt, the Python
  environment) and whatever the caller binds read-only, one or more writable binds (its stage
  and scratch), a private /tmp; the lab's cache, run folders, seeds, references and repository
  are simply not there;
- its own PID, IPC, UTS and network namespaces: it cannot see, signal or ptrace the runner, the
  lab or the agent, and has no network;
- a scrubbed environment (`--clearenv`, then only what the caller passes);
- as root, the unprivileged uid 65534 inside (bwrap binds as root, then its child drops to
  65534 with every capability), so that the process limit holds and root-only files stay closed;
- limits (address space, processes, file size, open files) set before bwrap starts, and a
  wall-clock limit that kills the whole namespace (its init dies, the kernel kills the rest);
- `--die-with-parent`: it never outlives the trusted process that started it.

The GPU stays usable when `gpu=True`: the NVIDIA device nodes are bound in, /sys read-only.

`LAB_SANDBOX=off` (the user's `--no-sandbox`, recorded in every fingerprint and printed on
every verdict) runs the same command line without bubblewrap: still a scrubbed environment, its
own process group and the limits, but no namespaces. `LAB_BWRAP` names the bwrap binary where it
is not on PATH (e.g. one unpacked from Debian's package on a machine without apt).

Binds may place a host folder at another path inside (`Bind(host, inside="/stage")`): a build
then sees the same absolute paths in any run folder on any machine, which keeps artifacts that
record paths (debug line info) bit-identical. Callers must build argv with `sandbox.path(host)`,
which is the inside path under bubblewrap and the host path when the sandbox is off.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from .errors import LabError

ENV_MODE = "LAB_SANDBOX"  # "bwrap" (the default) or "off"
ENV_BWRAP = "LAB_BWRAP"
NOBODY = 65534

# The toolchain a candidate process may read: system folders that exist on this machine.
SYSTEM_READABLE = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
GPU_DEVICE_GLOBS = ("nvidia*", "nvidia-caps", "dri")


class SandboxUnavailable(LabError):
    """No sandbox can be made here; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    seconds: float
    memory_bytes: int | None = 16 << 30  # RLIMIT_AS; None for CUDA processes (they reserve huge VA)
    processes: int | None = 1024  # RLIMIT_NPROC of the sandbox's uid: a fork bomb stops here
    file_bytes: int | None = 4 << 30  # RLIMIT_FSIZE, stdout and stderr included
    open_files: int = 4096
    output_bytes: int = 1 << 20  # the end of stdout/stderr kept for the caller


@dataclass(frozen=True)
class Bind:
    host: Path
    inside: str | None = None  # None: the same path inside
    writable: bool = False

    @property
    def target(self) -> str:
        return self.inside or str(self.host)


@dataclass
class Result:
    returncode: int | None  # None when killed at the time limit
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def mode() -> str:
    value = os.environ.get(ENV_MODE, "bwrap").strip().lower() or "bwrap"
    if value not in ("bwrap", "off"):
        raise LabError(f"{ENV_MODE}={value!r}: use 'bwrap' (the default) or 'off' (--no-sandbox)")
    return value


def bwrap_path() -> str | None:
    return os.environ.get(ENV_BWRAP) or shutil.which("bwrap")


def describe() -> str:
    """What isolates candidate code, for fingerprints and verdict lines."""
    if mode() == "off":
        return "none (--no-sandbox)"
    version = _probe(bwrap_path() or "")
    return f"bubblewrap {version}" if version else "unavailable"


def check_available() -> None:
    """Raise SandboxUnavailable (with what to do) unless candidate code can be sandboxed here."""
    if mode() == "off":
        return
    path = bwrap_path()
    if not path:
        raise SandboxUnavailable(
            "no sandbox for candidate code: bubblewrap is not installed. Install it "
            "(`apt-get install bubblewrap`, or set LAB_BWRAP to a bwrap binary), or run with "
            "--no-sandbox to evaluate candidates without isolation (recorded on every verdict)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SandboxUnavailable(
            f"no sandbox for candidate code: {path} (bubblewrap) is not an executable file. Install "
            "bubblewrap (`apt-get install bubblewrap`) or set LAB_BWRAP to its binary, or run with "
            "--no-sandbox to evaluate candidates without isolation (recorded on every verdict)")
    if not _probe(path):
        raise SandboxUnavailable(
            f"no sandbox for candidate code: {path} cannot create namespaces here "
            f"({_probe_error(path)}). Enable unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces), or run with "
            "--no-sandbox to evaluate candidates without isolation (recorded on every verdict)")


@lru_cache(maxsize=None)
def _probe(path: str) -> str:
    """bwrap's version if it can build a sandbox like ours on this machine, else ''."""
    if not path:
        return ""
    try:
        sandbox = Sandbox()
        result = sandbox.run(["true"], Limits(seconds=30, memory_bytes=None), _bwrap=path)
        if not result.ok:
            return ""
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().split()[-1] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return ""


def _probe_error(path: str) -> str:
    try:
        result = Sandbox().run(["true"], Limits(seconds=30, memory_bytes=None), _bwrap=path)
    except OSError as exc:
        return str(exc)
    return (result.stderr.strip().splitlines() or ["exit %s" % result.returncode])[-1][:300]


@dataclass
class Sandbox:
    """One sandbox description; `run` and `popen` start processes in it."""

    binds: Sequence[Bind] = ()
    gpu: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None  # inside path; default: the first writable bind
    python: bool = True  # bind the running Python's installation read-only (workers, tools)

    def path(self, host: Path | str) -> str:
        """Where `host` (a bound folder or a path under one) is seen by the sandboxed process."""
        host = Path(host)
        if mode() == "off":
            return str(host)
        for bind in sorted(self.binds, key=lambda b: len(str(b.host)), reverse=True):
            try:
                rest = host.resolve().relative_to(Path(bind.host).resolve())
            except ValueError:
                continue
            return str(Path(bind.target) / rest) if str(rest) != "." else bind.target
        raise LabError(f"{host} is not inside any folder bound into the sandbox")

    # --- the command line ---------------------------------------------------------------------
    def command(self, argv: Sequence[str], limits: Limits, *, _bwrap: str | None = None) -> list[str]:
        """The full argv: the limits trampoline, then bwrap (unless off), then `argv`."""
        inner = list(argv)
        if mode() == "bwrap":
            if os.geteuid() == 0:
                # bwrap runs privileged (it can bind root's folders), its child keeps only the
                # right to drop to 65534, which it does at once; every capability goes with it.
                inner = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
                         "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         "--inh-caps=-all", "--"] + inner
            else:
                inner = ["--"] + inner
            inner = self._bwrap_args(_bwrap or bwrap_path() or "bwrap") + inner
        spec = {"limits": _limit_table(limits), "env": None if mode() == "bwrap" else self._environment()}
        return [sys.executable, "-S", "-c", _TRAMPOLINE, json.dumps(spec), *inner]

    def _environment(self) -> dict:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
               "TMPDIR": "/tmp"}
        if self.python:
            env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        env.update(self.env)
        return env

    def _bwrap_args(self, bwrap: str) -> list[str]:
        # Every namespace; a user namespace only where bwrap is unprivileged (as root it would map
        # nothing but uid 0, and the drop to 65534 needs the real one).
        unshare = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                   "--unshare-cgroup-try"] + ([] if os.geteuid() == 0 else ["--unshare-user"])
        args = [bwrap, *unshare, "--die-with-parent", "--new-session", "--clearenv",
                "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp",
                "--perms", "1777", "--dir", "/var/tmp"]
        for folder in SYSTEM_READABLE:
            if os.path.islink(folder):
                args += ["--symlink", os.readlink(folder), folder]
            elif os.path.isdir(folder):
                args += ["--ro-bind", folder, folder]
        if self.python:
            for prefix in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix}):
                if not any(prefix == f or prefix.startswith(f + "/") for f in SYSTEM_READABLE):
                    args += _parents(prefix) + ["--ro-bind", prefix, prefix]
        if self.gpu:
            args += ["--ro-bind", "/sys", "/sys"]
            for pattern in GPU_DEVICE_GLOBS:
                for node in sorted(Path("/dev").glob(pattern)):
                    args += ["--dev-bind", str(node), str(node)]
        for bind in self.binds:
            if not Path(bind.host).exists():
                raise LabError(f"cannot bind {bind.host} into the sandbox: it does not exist")
            args += _parents(bind.target)
            args += ["--bind" if bind.writable else "--ro-bind", str(bind.host), bind.target]
        for key, value in self._environment().items():
            args += ["--setenv", key, value]
        cwd = self.cwd or next((b.target for b in self.binds if b.writable), "/tmp")
        args += ["--chdir", cwd]
        return args

    def _prepare(self) -> None:
        """As root the sandbox runs as uid 65534: give it its writable folders."""
        if os.geteuid() != 0 or mode() != "bwrap":
            return
        for bind in self.binds:
            if bind.writable:
                for root, dirs, files in os.walk(bind.host):
                    for name in dirs + files:
                        os.lchown(os.path.join(root, name), NOBODY, NOBODY)
                os.chown(bind.host, NOBODY, NOBODY)

    def _host_cwd(self) -> str | None:
        """Without bubblewrap: the host folder behind the inside cwd (a bind's target, or a path
        under one), else the first writable bind; under bubblewrap bwrap's --chdir does it."""
        if mode() == "bwrap":
            return None
        if self.cwd:
            for bind in sorted(self.binds, key=lambda b: len(b.target), reverse=True):
                target = bind.target.rstrip("/")
                if self.cwd == target or self.cwd.startswith(target + "/"):
                    return str(Path(bind.host) / self.cwd[len(target):].lstrip("/"))
            return self.cwd if self.cwd != "/tmp" else None
        return next((str(b.host) for b in self.binds if b.writable), None)

    # --- running ------------------------------------------------------------------------------
    def popen(self, argv: Sequence[str], limits: Limits, **kwargs) -> subprocess.Popen:
        """Start a long-lived sandboxed process (a worker spoken to over pipes). The caller owns
        it: end it with `kill(proc)`. Its cwd is set inside; pass no env (use `Sandbox.env`)."""
        self._prepare()
        return subprocess.Popen(self.command(argv, limits), start_new_session=True,
                                env=_trampoline_env(), cwd=self._host_cwd(), **kwargs)

    def run(self, argv: Sequence[str], limits: Limits, *, input: bytes | None = None,
            _bwrap: str | None = None) -> Result:
        """Run to completion within `limits.seconds`; stdout/stderr kept up to output_bytes."""
        self._prepare()
        cwd = self._host_cwd()
        start = time.monotonic()
        # Output goes to unlinked files of the trusted side: bounded by RLIMIT_FSIZE, never
        # held in memory whole, and no path the candidate could learn.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(self.command(argv, limits, _bwrap=_bwrap), stdout=out,
                                    stderr=err, stdin=subprocess.PIPE if input is not None
                                    else subprocess.DEVNULL, start_new_session=True,
                                    env=_trampoline_env(), cwd=cwd)
            timed_out = False
            try:
                proc.communicate(input=input, timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill(proc)
            except BaseException:
                kill(proc)
                raise
            return Result(returncode=None if timed_out else proc.returncode,
                          stdout=_tail(out, limits.output_bytes), stderr=_tail(err, limits.output_bytes),
                          timed_out=timed_out, seconds=time.monotonic() - start)


def _parents(target: str) -> list[str]:
    """Folders above a bind target, made traversable (bwrap would copy a 0700 /root's mode, and
    uid 65534 could not reach a Python installed under it)."""
    args = []
    for parent in reversed(Path(target).parents[:-1]):
        if not any(str(parent) == f or str(parent).startswith(f + "/") for f in SYSTEM_READABLE):
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def kill(proc: subprocess.Popen) -> None:
    """End a sandboxed process and everything it started (its group; under bubblewrap its PID
    namespace dies with its init), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(handle, limit: int) -> str:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - limit))
    text = handle.read().decode("utf-8", errors="replace")
    return text if size <= limit else f"[... {size - limit} bytes cut ...]\n" + text


def _trampoline_env() -> dict:
    # The trampoline itself needs nothing; the sandboxed program gets only `Sandbox.env` (bwrap
    # --clearenv / the trampoline's own replacement when off).
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _limit_table(limits: Limits) -> dict:
    import resource

    table = {"RLIMIT_NOFILE": limits.open_files}
    if limits.memory_bytes:
        table["RLIMIT_AS"] = limits.memory_bytes
    if limits.processes:
        table["RLIMIT_NPROC"] = limits.processes
    if limits.file_bytes:
        table["RLIMIT_FSIZE"] = limits.file_bytes
    return {k: v for k, v in table.items() if hasattr(resource, k)}


# Runs as `python -S -c`: set the limits and the parent-death signal, then exec the sandbox. A separate exec rather than preexec_fn, which is unsafe in a process
# with threads (the parallel runs start runners from threads).
_TRAMPOLINE = r"""
import ctypes, json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
for name, value in spec["limits"].items():
    kind = getattr(resource, name)
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
argv = sys.argv[2:]
if spec["env"] is None:
    os.execvp(argv[0], argv)
os.execvpe(argv[0], argv, spec["env"])
"""
