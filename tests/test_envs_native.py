"""The native environment starts runners from threads (one per slot) without preexec_fn: the runner
places itself (lab/system/process.py). Its CPU set and its death with the lab, even by kill -9 and
even behind a wrapper process (as `nix develop` is), are checked on the real runner."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.envs.native import NativeEnv
from lab.evaluate import run_evaluation
from lab.system.cpus import allowed_cpus

from conftest import CDOT, git_apply_in_copy


def test_a_runner_started_from_a_thread_runs_on_its_cpu_set(cdot, tmp_path):
    core = max(allowed_cpus())
    done = {}
    worker = threading.Thread(target=lambda: done.update(outcome=run_evaluation(
        cdot, cdot.root, tmp_path / "work", env=NativeEnv(), mode="check", cpus=[core])))
    worker.start()
    worker.join(300)
    ev = done["outcome"].evaluation
    assert not ev.status, ev.reason
    assert ev.fingerprint["cpu"]["affinity"] == [core], "the runner set its own CPU set"
    assert os.sched_getaffinity(0) == set(allowed_cpus()), "the lab's own set is untouched"


# A "lab": evaluates the tree from a thread, as a slot does, in the native env or behind a shell.
LAB = """
import sys, threading
from pathlib import Path
from lab.envs.native import NativeEnv
from lab.evaluate import run_evaluation
from lab.harness import load

class BehindAShell(NativeEnv):  # the runner a grandchild of the lab, as under `nix develop`
    def run(self, argv, **options):
        argv = [sys.executable if a == "python" else a for a in argv]
        return super().run(["sh", "-c", '"$@"; exit $?', "sh", *argv], **options)

harness, tree, work, wrapped = sys.argv[1:5]
env = BehindAShell() if wrapped == "1" else NativeEnv()
t = threading.Thread(target=run_evaluation, args=(load(harness), Path(tree), Path(work)),
                     kwargs={"env": env, "mode": "check", "timeout_s": 300})
t.start()
t.join()
"""


def _runner_pids(work: Path) -> list[int]:
    """Live (not zombie) `lab.runner` processes of the evaluation in `work`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"lab.runner" in cmdline and f"{work}/request.json".encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("wrapped", [False, True], ids=["child", "behind-a-shell"])
def test_a_runner_dies_with_the_lab_that_started_it_from_a_thread(cdot, tmp_path, wrapped):
    hanging = git_apply_in_copy(cdot.root, (CDOT / "solutions" / "wrong" / "hang.patch").read_text(), tmp_path)
    work = tmp_path / "work"
    lab = subprocess.Popen([sys.executable, "-c", LAB, str(cdot.root), str(hanging), str(work), str(int(wrapped))],
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _runner_pids(work) and time.monotonic() < deadline and lab.poll() is None:
            time.sleep(0.1)
        runners = _runner_pids(work)
        assert runners, f"no runner started: {lab.stderr.read().decode() if lab.poll() is not None else 'timeout'}"
        time.sleep(1.0)  # building or in the hanging oracle: either way it would run for 300 s
        os.kill(lab.pid, signal.SIGKILL)  # the lab only, not its group
        lab.wait(10)
        deadline = time.monotonic() + 15
        while _runner_pids(work) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _runner_pids(work), f"the runner outlived the lab ({json.dumps(runners)})"
    finally:
        for pid in _runner_pids(work):
            os.kill(pid, signal.SIGKILL)
        if lab.poll() is None:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()


def test_an_owner_identity_tells_a_live_process_from_an_ended_or_reused_one():
    """What the container sweep of lab/envs/docker.py judges a killed lab by."""
    from lab.system.process import owner_gone, owner_identity

    me = owner_identity()
    assert not owner_gone(me)
    ended = subprocess.Popen(["true"])
    identity = owner_identity(ended.pid)
    ended.wait()
    assert owner_gone(identity)
    host, machine, boot, pidns, pid, started = me.split("/")
    assert owner_gone(f"{host}/{machine}/{boot}/{pidns}/{pid}/{int(started) + 1}")  # the pid reused since
    assert owner_gone(f"{host}/{machine}/another-boot/{pidns}/{pid}/{started}")  # the machine rebooted since
    assert not owner_gone(f"another-host/{machine}/{boot}/{pidns}/{pid}/{started}")  # not this machine
    assert not owner_gone(f"{host}/another-machine/{boot}/{pidns}/{pid}/{started}")  # a namesake host
    assert not owner_gone(f"{host}/{machine}/{boot}/1/{ended.pid}/1")  # another pid namespace: its pids aren't ours
    assert not owner_gone("not an identity")
