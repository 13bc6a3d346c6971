"""Evaluations as Ray tasks (lab/executors.py RayExecutor) on a real local cluster on loopback.

The head is started by the test (`ray start --head --block` in a process group of its own, with
its own temp dir), has 2 CPUs and 2 `lab_slot` resources, and is stopped by killing that group.
Everything runs on this machine, so the run folder is the shared filesystem the executor needs.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lab.errors import LabError
from lab.executors import RayExecutor, check_address
from lab.slots import Slot

from conftest import lab_cli
from test_loop import sol

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # unix socket paths must stay short
    cache = tmp_path_factory.getbasetemp() / "lab-cache"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "LAB_CACHE": str(cache)}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--resources", '{"lab_slot": 2}', "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            check_address(address, timeout_s=1)
            break
        except LabError:
            if time.monotonic() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not start in 90 s")
            time.sleep(0.5)
    yield address
    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)


def test_a_ray_address_that_does_not_answer_is_refused_fast(cdot, cdot_repo, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"patch": sol("wrong/slower.patch"), "hypothesis": "x"}) + "\n")
    started = time.monotonic()
    out = lab_cli("run", str(cdot.root), "--executor", "ray", "--address", f"127.0.0.1:{free_port()}",
                  "--agent", f"replay:{replay}", "--runs", str(cdot_repo / "runs"), cwd=cdot_repo)
    assert out.returncode == 2
    assert "no Ray cluster answers at 127.0.0.1:" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 20
    assert not (cdot_repo / "runs").exists(), "nothing starts before the check"


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_recorded_as_lost_and_rerun(ray_head, cdot, tmp_path):
    executor = RayExecutor(cdot, "native", ray_head, max_lost=2)
    assert executor.preflight() == 2
    from lab.harness import stage_editable
    from lab.executors import Request

    tree = tmp_path / "incumbent"
    stage_editable(cdot, cdot.root, tree)
    req = Request("0001", "evaluate", tree, tmp_path / "evaluations" / "0001", tree, 0.02)
    lost, result = [], {}
    worker = threading.Thread(target=lambda: result.update(r=executor.evaluate(
        Slot(0, 0), req, on_lost=lambda r, attempt, error: lost.append((attempt, error)))))
    worker.start()
    marker = req.work / "worker.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the task never started"
    time.sleep(0.5)  # mid-evaluation: the runner is building or timing
    os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
    worker.join(180)
    assert not worker.is_alive()
    assert len(lost) == 1 and "WorkerCrashedError" in lost[0][1], lost
    r = result["r"]
    assert r.worker["attempt"] == 1 and r.worker["executor"] == "ray" and r.worker["node"]
    assert r.outcome.verdict.status == "SAME", r.outcome.verdict
    assert r.outcome.record_path == tmp_path / "evaluations" / "0001-r1" / "record.json"
    assert r.outcome.evaluation.fingerprint["cpu"], "the record carries the worker's fingerprint"


@pytest.mark.slow
def test_lab_run_on_the_ray_cluster_records_every_evaluation_in_the_run_folder(ray_head, cdot, cdot_repo, tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(json.dumps({"patch": sol(p), "hypothesis": h}) for p, h in [
        ("wrong/slower.patch", "volatile accumulator"), ("wrong/skip-half.patch", "skip half"),
    ]) + "\n")
    out = lab_cli("run", str(cdot.root), "--executor", "ray", "--address", ray_head, "--delta", "0.02",
                  "--agent", f"replay:{replay}", "--quiet", "--runs", str(cdot_repo / "runs"), cwd=cdot_repo)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = next((cdot_repo / "runs").glob("cdot-*"))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    workers = [e for e in events if e["type"] == "workers"]
    assert workers and workers[0]["executor"] == "ray" and len(workers[0]["slots"]) == 2
    evaluated = {e["number"]: e for e in events if e["type"] == "evaluated"}
    assert {n: e["verdict"]["status"] for n, e in evaluated.items()} == {1: "WORSE", 2: "FAIL"}
    for e in evaluated.values():
        assert e["worker"]["executor"] == "ray" and e["worker"]["node"] and e["fingerprint"]["cpu"]
        assert (run_dir / e["record"]).exists()
