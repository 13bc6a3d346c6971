"""The runner as a plain child process of the lab, in a process group of its own.

No preexec_fn: the lab starts runners from threads, where it is unsafe. The runner sets its own CPU
set and its death with the lab at its start (lab/system/process.py), from its environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from ..scrub import SECRET_MARKERS
from ..system.process import placement_env
from .base import Env, Mount, RunResult


def run_process_group(argv, *, timeout_s, env=None, cwd=None, on_line=None) -> RunResult:
    """Run argv in a new session; on timeout kill the whole group (a hung kernel, a forked
    helper, a compiler) with SIGKILL, so that nothing keeps running or holding the GPU.
    `on_line` gets each line of stderr as it comes (the runner's progress), besides the whole."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_drain, args=(proc.stdout, out, None), daemon=True),
               threading.Thread(target=_drain, args=(proc.stderr, err, on_line), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()
        timed_out = True
    except BaseException:
        kill_group(proc.pid)  # Ctrl-C or an error in the lab: leave no runner behind
        proc.wait()
        raise
    for reader in readers:
        # A daemon that left the group may still hold a pipe: its output is not waited for.
        reader.join(timeout=PIPE_GRACE_S)
    return RunResult(
        returncode=None if timed_out else proc.returncode,
        stdout="".join(out),
        stderr="".join(err),
        timed_out=timed_out,
        seconds=time.monotonic() - start,
    )


PIPE_GRACE_S = 30.0


def _drain(stream, into: list[str], on_line) -> None:
    """Read a pipe to its end into `into`, handing each line to `on_line` (whose failure never
    stops the reading: the record travels on these pipes)."""
    for line in stream:
        into.append(line)
        if on_line is not None:
            try:
                on_line(line)
            except Exception:
                pass
    stream.close()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class NativeEnv(Env):
    def __init__(self):
        super().__init__(name="native")

    def reference(self) -> str:
        return "native"

    def path_of(self, mount: Mount) -> str:
        return str(mount.host)

    def run(self, argv, *, mounts, timeout_s, cpus=None, gpus=None, env=None, network=False, on_line=None):
        # Natively the network cannot be taken away without privileges; the runner still gets
        # no secrets (see `scrubbed_environ`).
        child_env = scrubbed_environ()
        child_env.update(self.extra_env)
        child_env.update(env or {})
        if gpus is not None:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        child_env.update(placement_env(cpus))  # the runner applies it itself (lab/system/process.py)
        if argv and argv[0] == "python":
            argv = [sys.executable] + argv[1:]
        return run_process_group(argv, timeout_s=timeout_s, env=child_env, on_line=on_line)


def scrubbed_environ() -> dict:
    """The lab's environment without anything that looks like a secret: candidates are
    evaluated without the API key."""
    return {k: v for k, v in os.environ.items() if not any(m in k.upper() for m in SECRET_MARKERS)}
