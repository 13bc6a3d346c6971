import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.harness import load, write_lock

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CDOT = REPO / "examples" / "cdot"  # the shipped example harness, which the tests use too


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False  # no driver, no GPU: said without importing torch (seconds on 2 cores)
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


HAS_GPU = _has_gpu()


# The slowest tests of modules not marked slow as a whole, by name: over 20 s each in a whole-suite
# run on 2 cores shared with other jobs (2026-12-02, `--durations`). `pytest -m "not slow"` is the
# quick round without them and without the real harnesses' suites.
SLOW = {
    "test_a_night_of_faults_compressed",  # 85 s
    "test_a_colleague_reproduces_a_kept_result_from_another_checkout",  # 52 s
    "test_a_bundle_measured_on_a_chosen_model_reproduces_only_on_that_model",  # 45 s
    "test_loop_with_the_anthropic_agent",  # 25 s
    "test_kill_9_mid_evaluation_then_resume",  # 24 s
    "test_a_winner_that_no_longer_applies_is_rejected_as_stale",  # 20 s
}


# pytest-xdist (pyproject's addopts: -n 2 --dist loadgroup): tests that share one service or one
# costly session fixture run on one worker, so that it is started or made once: the Docker engine
# and registry (started and stopped by the session that needs them), the MLX suite, the kept cdot
# run. llama.cpp's tests go to either worker: its build is made before the workers start
# (pytest_sessionstart) and every later build takes the build folder's lock. The first matching
# rule names the group.
XDIST_GROUPS = (
    ("docker", lambda item: bool({"docker_client", "published"} & set(item.fixturenames))
     or "docker" in getattr(getattr(item, "callspec", None), "params", {}).values()),  # lab_env[docker]
    ("mlx", lambda item: item.module.__name__ == "test_mlx_solutions"),
    ("kept_cdot", lambda item: "kept_cdot" in item.fixturenames),
)


def pytest_configure(config):
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1:
        os.sched_setaffinity(0, worker_cores(int(worker.removeprefix("gw")), count, sorted(os.sched_getaffinity(0))))


def worker_cores(index: int, count: int, cores: list[int]) -> list[int]:
    """The cores of xdist worker `index` of `count`: a contiguous share of `cores`, the last
    worker taking what does not divide evenly. An xdist worker, and every process it starts,
    runs on its own share, so the timed tests of one worker never share a core with the other's
    builds and models (a build on the timing core made re-timed bundles disagree with their
    record: docs/decisions.md); the lab inside a worker sees that share as the machine, as it
    would under taskset. With fewer cores than workers, each worker gets one core, in turn."""
    index %= count
    per = len(cores) // count
    if per == 0:
        return [cores[index % len(cores)]]
    return cores[index * per:(index + 1) * per] if index < count - 1 else cores[index * per:]


def xdist_group(item) -> str | None:
    """The xdist group of a collected test (XDIST_GROUPS), or None."""
    return next((name for name, belongs in XDIST_GROUPS if belongs(item)), None)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if getattr(item, "originalname", item.name) in SLOW:
            item.add_marker(pytest.mark.slow)
        group = xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test (or its fixture) that reaches an optional package this install lacks (the README's
    core install, `pip install -e '.[dev]'`) skips, naming the extra, instead of failing. CI
    installs every extra (scripts/bootstrap.sh), so there it stays a failure. A test that
    expects MissingExtra catches it itself and never gets here."""
    from lab.errors import MissingExtra

    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(MissingExtra) and not _in_ci():
        path, line, _ = item.location
        report.outcome = "skipped"
        report.longrepr = (path, (line or 0) + 1, f"Skipped: {call.excinfo.value}")


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session builds into its own cache, never the user's. LAB_TEST_CACHE=DIR names
    one that sessions share instead: on the GPU machine, which has no ccache, a CUDA build of
    llama.cpp made ahead of the tests is then reused rather than redone in every session.

    Compiled objects are shared across sessions all the same: ccache answers by content (the
    preprocessed source, the compiler and its flags), so the llama.cpp build of a second session
    on this machine takes a minute or two instead of ~10 (a fresh machine still builds cold).
    $CCACHE_DIR, when set, wins."""
    for name, value in session_cache_env(tmp_path_factory).items():
        monkeypatch.setenv(name, value)


TEST_CCACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lab-test-ccache"


def session_cache_env(tmp_path_factory) -> dict[str, str]:
    """The caches of this test session (see _isolated_cache), for a session fixture too. The
    xdist workers of one session share one (the lab's caches lock what they build)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's root; each worker's own basetemp is under it
    return cache_env_at(base)


def cache_env_at(root: Path) -> dict[str, str]:
    """The caches of the session whose root basetemp is `root`."""
    return {"LAB_CACHE": os.environ.get("LAB_TEST_CACHE") or str(root / "lab-cache"),
            "CCACHE_DIR": os.environ.get("CCACHE_DIR") or str(TEST_CCACHE)}


# --- llama.cpp: the pristine build of the real-harness tests, made once per session -------------
LLAMACPP_HARNESS = REPO / "harnesses" / "llamacpp"
LLAMACPP_TESTS = HERE / "test_llamacpp_solutions.py"
PREBUILT = "llamacpp-pristine-build.json"  # in the session's root basetemp: what the prebuild did


def build_llamacpp_pristine(cache_env: dict[str, str]) -> list[str] | None:
    """Build the pinned llama.cpp tree for the CPU into the caches of `cache_env`, every stage on
    stderr as it happens: the stages seen ([] when the build was already there), or None where
    the harness cannot run here."""
    from lab.errors import EnvironmentUnavailable
    from lab.progress import Progress

    seen: list[str] = []

    class Recorder(Progress):
        def stage(self, text):
            seen.append(text)
            super().stage(text)

    with pytest.MonkeyPatch.context() as mp:
        for name, value in cache_env.items():
            mp.setenv(name, value)
        mp.setenv("LAB_LLAMACPP_BACKEND", "cpu")
        h = load(LLAMACPP_HARNESS)
        try:
            h.preflight()
            print(file=sys.stderr)
            with Recorder("llama.cpp for the tests: the pristine build"):
                h.baseline()
        except EnvironmentUnavailable:
            return None
    return seen


def prebuilt_llamacpp(basetemp: Path) -> dict | None:
    """What pytest_sessionstart's build left for this session ({"stages": [...] or None}), or
    None when it made none."""
    import json

    for root in (basetemp, basetemp.parent):
        if (root / PREBUILT).is_file():
            return json.loads((root / PREBUILT).read_text())
    return None


def pytest_sessionstart(session):
    """A run that includes the real llama.cpp tests builds llama.cpp first, on every core, before
    xdist starts its workers (which then find it in the session's cache): a cold build takes
    ~5 min on 2 cores, but more than twice that on one core beside the other worker's tests
    (13 min 45 s on 2026-12-03), which held the whole suite up. Not in a worker, not for
    --collect-only, not when the tests are deselected by path or by -m "not slow"."""
    config = session.config
    if os.environ.get("PYTEST_XDIST_WORKER") or config.option.collectonly or not _selects(config, LLAMACPP_TESTS):
        return
    import json
    import time

    basetemp = config._tmp_path_factory.getbasetemp()
    started = time.monotonic()
    with config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():  # shown as it happens
        stages = build_llamacpp_pristine(cache_env_at(basetemp))
    (basetemp / PREBUILT).write_text(json.dumps({"stages": stages}))
    config.stash[PREBUILD_SECONDS] = time.monotonic() - started


PREBUILD_SECONDS = pytest.StashKey[float]()


def pytest_terminal_summary(terminalreporter, config):
    """pytest's own time starts after pytest_sessionstart: the prebuild's is said beside it."""
    seconds = config.stash.get(PREBUILD_SECONDS, None)
    if seconds is not None:
        terminalreporter.write_line(f"llama.cpp built before the tests in {seconds:.0f} s: not counted in "
                                    f"pytest's time below; the whole run took that much longer")


def _selects(config, test_file: Path) -> bool:
    """Whether the paths and -m of this run include `test_file`'s tests (a -k is not looked at)."""
    markexpr = config.option.markexpr or ""
    if "not slow" in markexpr or (markexpr and "slow" not in markexpr):
        return False
    for arg in config.args:
        path = Path(arg.split("::")[0])
        for base in (config.invocation_params.dir, config.rootpath):
            full = (base / path).resolve()
            if full.exists():
                if full == test_file or full in test_file.parents:
                    return True
                break
    return False


def make_cdot_repo(repo: Path) -> Path:
    """A git repository at `repo` holding a copy of the cdot test harness, locked and committed."""
    shutil.copytree(CDOT, repo / "harnesses" / "cdot",
                    ignore=shutil.ignore_patterns("__pycache__", "lock.json"))
    git(repo.parent, "init", "-q", "-b", "main", str(repo))
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "test")
    harness = load(repo / "harnesses" / "cdot")
    write_lock(harness)
    (repo / ".gitignore").write_text("runs/\n__pycache__/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    return repo


def new_try_run(cdot_repo: Path) -> str:
    """A new try run of cdot, nothing tried yet (what a first `lab try` whose patch applies
    starts with), made by a process that has ended: its name."""
    script = ("from pathlib import Path\nfrom lab.envs import get\nfrom lab.harness import load\n"
              "from lab.runs import try_lab\nh = load('harnesses/cdot')\n"
              "lab, _ = try_lab(h, get('native', h), Path('runs'), new_run=True)\n"
              "lab.record_stop('made by the test')\nprint(lab.folder.path.name)\n")
    return subprocess.run([sys.executable, "-c", script], cwd=cdot_repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def snapshot_repo(dest: Path) -> Path:
    """A repository at `dest` holding this checkout's files as they are now (tracked and new, not
    ignored), committed: what a colleague or a new user would clone."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest.parent, "init", "-q", "-b", "main", str(dest))
    git(dest, "add", "-A")
    git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the lab")
    return dest


@pytest.fixture
def cdot_repo(tmp_path):
    return make_cdot_repo(tmp_path / "project")


@pytest.fixture
def cdot(cdot_repo):
    return load(cdot_repo / "harnesses" / "cdot")


def lab_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `lab` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# --- a real Docker engine and registry (tests marked `docker`) -----------------------------------
REGISTRY = os.environ.get("LAB_REGISTRY_ADDR", "127.0.0.1:5000")
BASE = os.environ.get("LAB_BASE_IMAGE", "local/debian:bookworm")


def _unavailable(reason: str):
    """Skip with the reason; under CI the engine must start, so fail instead."""
    if _in_ci():
        pytest.fail(f"CI must run the Docker tests: {reason}")
    pytest.skip(reason)


def _start(script: str) -> None:
    try:
        proc = subprocess.run(["bash", str(REPO / "scripts" / script)], capture_output=True,
                              text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/{script} did not finish: {exc}")
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
        _unavailable(f"scripts/{script} could not start it: {tail}")


# The services the scripts start, by process name: what a session started it also stops.
SERVICES = ("dockerd", "docker-registry")


def _pids(name: str) -> set[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _running(pid: int) -> bool:
    """Alive and not a zombie (a child of ours that ended is one until reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_started(before: dict[str, set[int]], wait_s: float = 30.0) -> list[int]:
    """Stop the processes of the names in `before` (name -> the pids running before) that were
    not running then, by pid: SIGTERM, then SIGKILL for one still there after wait_s. Returns
    the pids stopped."""
    import signal
    import time

    started = [pid for name, was in before.items() for pid in sorted(_pids(name) - was)]
    for pid in started:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    for pid in started:
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return started


@pytest.fixture(scope="session")
def docker_client():
    """A client of a running engine, with the base image and the loopback registry ready. An
    engine or registry this session started is stopped at its end (one already running is left)."""
    try:
        import docker  # noqa: F401
    except ImportError:
        _unavailable("the Python package 'docker' is not installed (pip install -e '.[docker]')")
    before = {name: _pids(name) for name in SERVICES}
    try:
        _start("start-docker.sh")
        _start("start-registry.sh")
        from lab.envs.docker import connect

        client = connect()
        yield client
        client.close()
    finally:
        stop_started(before)


def locked_copy(dest: Path) -> Path:
    """A locked copy of the cdot test harness (a compiled C function), outside the repository."""
    shutil.copytree(CDOT, dest, ignore=shutil.ignore_patterns("__pycache__", "lock.json",
                                                              "image.lock.json"))
    write_lock(load(dest))
    return dest


@pytest.fixture(scope="session")
def published(docker_client, tmp_path_factory):
    """cdot's image, published once per session: (harness, the image lock publish returned)."""
    from lab.publish import publish

    harness = load(locked_copy(tmp_path_factory.mktemp("published") / "cdot"))
    lock_digest = harness.lock_digest()
    record = publish(harness, REGISTRY, base_image=BASE, client=docker_client)
    return harness, record, lock_digest




@pytest.fixture(scope="session")
def kept_cdot(tmp_path_factory):
    """(repo, harness, run folder, bundle) of one confirmed KEEP of cdot, exported: made once per
    session (a kept run costs half a minute on 2 busy cores) for every test that only reads the
    bundle or works on copies. A test that changes the repo or the run must own that change."""
    from lab.bundle import export
    from lab.envs import get

    from test_bundle import _kept_run

    root = tmp_path_factory.mktemp("kept-cdot")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in session_cache_env(tmp_path_factory).items():
            mp.setenv(name, value)
        repo = make_cdot_repo(root / "project")
        harness = load(repo / "harnesses" / "cdot")
        lab = _kept_run(harness, repo, get("native"))
        yield repo, harness, lab.folder.path, export(lab.folder.path, harness)


def git_apply_in_copy(tree: Path, patch: str, tmp_path: Path) -> Path:
    """`patch` applied with `git apply` (checked first) to a committed copy of `tree`: the copy."""
    copy = tmp_path / "applied"
    shutil.copytree(tree, copy)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b"]):
        subprocess.run(["git", *args], cwd=copy, check=True, capture_output=True)
    (tmp_path / "p.patch").write_text(patch)
    subprocess.run(["git", "apply", "--check", str(tmp_path / "p.patch")], cwd=copy, check=True)
    subprocess.run(["git", "apply", str(tmp_path / "p.patch")], cwd=copy, check=True)
    return copy


@pytest.fixture
def clock():
    """A compressed clock for the agent's waits and budgets (restored after the test)."""
    from fake_anthropic import FakeClock
    from lab.agents import clock as agent_clock

    fake = FakeClock()
    previous = agent_clock.use(fake)
    yield fake
    agent_clock.use(previous)
