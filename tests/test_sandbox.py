"""The sandbox for candidate code (lab/sandbox.py): what a process inside can and cannot reach."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from lab import sandbox as sb

pytestmark = pytest.mark.skipif(
    sb.mode() == "bwrap" and sb.describe() == "unavailable",
    reason="bubblewrap cannot make a sandbox on this machine (apt-get install bubblewrap)")


@pytest.fixture
def stage(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    return folder


def sh(box, script, **limits):
    return box.run(["sh", "-c", script], sb.Limits(seconds=limits.pop("seconds", 20), **limits))


def test_only_binds_and_the_toolchain_are_visible(stage, tmp_path):
    secret = tmp_path / "seeds.json"
    secret.write_text("42")
    box = sb.Sandbox(binds=[sb.Bind(stage, "/stage", writable=True)])
    repo_file = Path(__file__).resolve().parents[1] / "README.md"
    result = sh(box, f"pwd; echo made > out.txt; cat {secret} || echo hidden; ls {repo_file} || echo nocwd")
    assert result.ok, result.stderr
    assert result.stdout.splitlines()[0] == "/stage"
    assert "42" not in result.stdout and "hidden" in result.stdout and "nocwd" in result.stdout
    assert (stage / "out.txt").read_text() == "made\n"


def test_cannot_see_or_signal_the_lab(stage):
    box = sb.Sandbox(binds=[sb.Bind(stage, writable=True)])
    result = sh(box, f"ls /proc | grep -c '^[0-9]'; kill -0 {os.getpid()} && echo reached || echo unreachable")
    assert result.ok, result.stderr
    count, verdict = result.stdout.split()
    assert int(count) <= 4 and verdict == "unreachable"


def test_environment_is_scrubbed(stage, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-" + "x" * 20)
    box = sb.Sandbox(binds=[sb.Bind(stage, writable=True)], env={"WANTED": "1"})
    result = sh(box, "env")
    assert "sk-ant-" not in result.stdout and "WANTED=1" in result.stdout


def test_no_network(stage):
    box = sb.Sandbox(binds=[sb.Bind(stage, writable=True)])
    result = sh(box, "cat /proc/net/dev | grep -c :")
    assert result.ok and int(result.stdout) == 1  # loopback only


def test_time_limit_kills_the_whole_tree(stage):
    box = sb.Sandbox(binds=[sb.Bind(stage, writable=True)])
    start = time.monotonic()
    # 317: a duration no other test sleeps, since the other xdist worker's processes are seen too
    result = sh(box, "(setsid sleep 317 &) ; sleep 317 & sleep 317", seconds=1.5)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - start < 12
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", "sleep 317"], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes outlived the sandbox: {left}"


def test_limits_on_processes_and_file_size(stage):
    box = sb.Sandbox(binds=[sb.Bind(stage, writable=True)])
    bomb = box.run(["python3", "-c", "import os\ntry:\n  [os.fork() or os._exit(0) for _ in range(5000)]\n"
                    "except OSError as e: print('refused')"], sb.Limits(seconds=30, processes=64))
    assert "refused" in bomb.stdout
    big = sh(box, "head -c 3000000 /dev/zero > big", file_bytes=1 << 20)
    assert big.returncode != 0 and (stage / "big").stat().st_size <= 1 << 20


def test_output_kept_is_bounded(stage):
    box = sb.Sandbox(binds=[sb.Bind(stage, writable=True)])
    result = sh(box, "head -c 5000000 /dev/zero | tr '\\0' a", output_bytes=1000)
    assert len(result.stdout) < 1100 and "cut" in result.stdout


def test_fixed_inside_path_and_off_mode(stage, monkeypatch):
    box = sb.Sandbox(binds=[sb.Bind(stage, "/stage", writable=True)])
    assert box.path(stage / "a") == "/stage/a"
    monkeypatch.setenv(sb.ENV_MODE, "off")
    assert box.path(stage / "a") == str(stage / "a")
    assert sb.describe() == "none (--no-sandbox)"
    result = sh(box, "pwd; env | grep -c KEY || true")
    assert result.stdout.splitlines()[0] == str(stage)


def test_unavailable_names_what_to_do(monkeypatch):
    monkeypatch.setenv(sb.ENV_BWRAP, "/nonexistent/bwrap")
    sb._probe.cache_clear()
    with pytest.raises(sb.SandboxUnavailable, match="--no-sandbox"):
        sb.check_available()
    sb._probe.cache_clear()
