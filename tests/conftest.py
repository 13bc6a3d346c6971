import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CDOT = HERE / "harnesses" / "cdot"


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return shutil.which("nvidia-smi") is not None and subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True).returncode == 0


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session builds into its own cache, never the user's."""
    monkeypatch.setenv("LAB_CACHE", str(tmp_path_factory.getbasetemp() / "lab-cache"))


@pytest.fixture
def cdot_repo(tmp_path):
    """A git repository holding a copy of the cdot test harness, locked and committed."""
    from lab.harness import load, write_lock

    repo = tmp_path / "project"
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


@pytest.fixture
def cdot(cdot_repo):
    from lab.harness import load

    return load(cdot_repo / "harnesses" / "cdot")


def lab_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `lab` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
