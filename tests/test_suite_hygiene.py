"""Issue 18 (item 7): the suite itself. It shows its slowest tests, skips (never fails) what needs an
extra that a core install lacks, and stops the services it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import HERE, REPO, SLOW, _pids, _selects, stop_started, worker_cores, xdist_group


def test_every_run_shows_the_slowest_tests_and_uses_two_workers():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--durations=20" in config["addopts"].split()
    assert any(m.startswith("slow:") for m in config["markers"])
    assert "-n 2 --dist loadgroup" in config["addopts"]


def test_each_worker_gets_its_own_cores():
    assert [worker_cores(i, 2, [0, 1]) for i in range(2)] == [[0], [1]]
    assert [worker_cores(i, 2, [0, 1, 2, 3]) for i in range(2)] == [[0, 1], [2, 3]]
    assert [worker_cores(i, 2, [0, 1, 2]) for i in range(2)] == [[0], [1, 2]]
    assert [worker_cores(i, 2, [5]) for i in range(2)] == [[5], [5]]  # one core: shared, never empty
    assert [worker_cores(i, 4, [0, 1]) for i in range(4)] == [[0], [1], [0], [1]]  # -n 4 on 2 cores


def test_the_llama_cpp_prebuild_happens_only_when_its_tests_are_selected(tmp_path):
    def config(*args, markexpr=""):
        return SimpleNamespace(args=list(args), option=SimpleNamespace(markexpr=markexpr),
                               invocation_params=SimpleNamespace(dir=REPO), rootpath=REPO)

    tests = HERE / "test_llamacpp_solutions.py"
    assert _selects(config("tests"), tests)  # the README's command: pyproject's testpaths
    assert _selects(config("tests/test_llamacpp_solutions.py::test_profile_digest"), tests)
    assert _selects(config(str(REPO)), tests)
    assert _selects(config("tests", markexpr="slow"), tests)
    assert not _selects(config("tests", markexpr="not slow"), tests)
    assert not _selects(config("tests", markexpr="docker"), tests)
    assert not _selects(config("tests/test_stats.py"), tests)
    assert not _selects(config("harnesses"), tests)
    assert not _selects(config(str(tmp_path)), tests)


def test_tests_of_one_service_or_build_share_a_worker():
    def item(module, *fixtures):
        return SimpleNamespace(module=SimpleNamespace(__name__=module), fixturenames=list(fixtures))

    assert xdist_group(item("test_bundle", "tmp_path", "published", "docker_client", "kept_cdot")) == "docker"
    assert xdist_group(item("test_llamacpp_solutions", "harness_for")) is None  # built before the workers
    assert xdist_group(item("test_mlx_solutions", "tmp_path")) == "mlx"
    assert xdist_group(item("test_colleague", "kept_cdot")) == "kept_cdot"
    assert xdist_group(item("test_stats")) is None
    docker_param = item("test_redteam", "lab_env", "setting")
    docker_param.callspec = SimpleNamespace(params={"lab_env": "docker"})
    assert xdist_group(docker_param) == "docker"  # it asks for the engine at run time


def test_the_slowest_tests_are_marked_and_exist(request):
    """`pytest -m "not slow"` leaves out every name in conftest.SLOW; a renamed test must not
    silently fall out of the list. Checked against this session's collection (every xdist worker
    collects the whole suite) when it is the whole suite."""
    items = request.session.items
    if {i.path.name for i in items} < {p.name for p in HERE.glob("test_*.py")}:
        pytest.skip("only part of the suite was collected: run the whole suite to check conftest.SLOW")
    names = {getattr(i, "originalname", i.name) for i in items}
    assert SLOW <= names, SLOW - names
    assert all("slow" in i.keywords for i in items if getattr(i, "originalname", i.name) in SLOW)


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
