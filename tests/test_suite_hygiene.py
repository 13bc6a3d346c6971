"""Issue 18 (item 7): the suite itself. It shows its slowest tests, skips (never fails) what needs an
extra that a core install lacks, and stops the services it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import HERE, REPO, SLOW, _pids, stop_started


def test_every_run_shows_the_slowest_tests():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--durations=20" in config["addopts"].split()
    assert any(m.startswith("slow:") for m in config["markers"])


def test_the_slowest_tests_are_marked_and_exist():
    """`pytest -m "not slow"` leaves out every name in conftest.SLOW; a renamed test must not
    silently fall out of the list."""
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-m", "slow",
                                "-p", "no:cacheprovider", str(HERE)], cwd=REPO, capture_output=True, text=True,
                               timeout=300).stdout
    names = {line.split("::")[-1].split("[")[0] for line in collected.splitlines() if "::" in line}
    assert SLOW <= names, SLOW - names


def _run_suite(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    """A one-test suite under the real conftest's hooks, in a subprocess."""
    (tmp_path / "conftest.py").write_text(
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        f"spec = importlib.util.spec_from_file_location('lab_tests_conftest', {str(HERE / 'conftest.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "pytest_runtest_makereport = module.pytest_runtest_makereport\n")
    (tmp_path / "test_needs_torch.py").write_text(
        "from lab.errors import MissingExtra\n\n"
        "def test_needs_torch():\n"
        "    raise MissingExtra('torch', 'cuda')\n\n"
        "def test_plain_failure_stays_one():\n"
        "    assert False\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_extra_skips_with_its_name_on_a_core_install(tmp_path):
    result = _run_suite(tmp_path, ci="")
    assert "1 failed, 1 skipped" in result.stdout, result.stdout
    assert "SKIPPED" in result.stdout and "the [cuda] extra" in result.stdout, result.stdout


def test_under_ci_a_missing_extra_is_a_failure(tmp_path):
    result = _run_suite(tmp_path, ci="true")
    assert "2 failed" in result.stdout, result.stdout


def test_a_service_the_session_started_is_stopped_and_one_it_found_is_left(tmp_path):
    name = "labtestsvc"  # a stand-in service: a copy of sleep under its own process name
    binary = tmp_path / name
    shutil.copy(shutil.which("sleep"), binary)
    found = subprocess.Popen([str(binary), "300"])  # running before the "session"
    try:
        before = {name: _pids(name)}
        assert found.pid in before[name]
        started = subprocess.Popen([str(binary), "300"], start_new_session=True)
        stopped = stop_started(before, wait_s=10)
        assert stopped == [started.pid]
        assert started.wait(timeout=10) is not None
        assert found.poll() is None, "a service running before the session was stopped"
    finally:
        found.kill()
        found.wait()
