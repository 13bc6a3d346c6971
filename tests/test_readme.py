"""The README's no-GPU quickstart runs as written (issue 18.1).

The commands are parsed out of README.md, not copied here, and run in a fresh clone of this
checkout, each with `.venv/bin/lab` standing for this interpreter's `python -m lab.cli` (the
setup block, apt and pip, is not run: it needs root and the network). README command 1 on a
machine without a GPU or a key must name, as the command that works instead, the quickstart's
own `lab run` line.
"""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import HAS_GPU, REPO, git, snapshot_repo

README = REPO / "README.md"
SECTION = "## No GPU?"
PROGRAM = ".venv/bin/lab"


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def quickstart() -> tuple[str, list[list[str]]]:
    """The setup block and the commands (argv lists) of the README's no-GPU section."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section '{SECTION}'"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    setup, commands = _blocks(section)[:2]
    return setup, [shlex.split(line, comments=True) for line in commands.splitlines() if line.strip()]


def command_one() -> list[str]:
    """README command 1 without its bootstrap: `.venv/bin/lab run wavegru --budget 8h`."""
    first = _blocks(README.read_text())[0].splitlines()[0]
    return shlex.split(first.split("&&", 1)[1], comments=True)


def test_the_quickstart_sets_up_what_it_uses():
    setup, commands = quickstart()
    assert "bubblewrap" in setup and "gcc" in setup and "pip install -e ." in setup
    assert commands and all(argv[0] == PROGRAM for argv in commands), commands
    assert command_one()[:2] == [PROGRAM, "run"]


def _lab(clone, cache, argv):
    assert argv[0] == PROGRAM
    env = {**os.environ, "PYTHONPATH": str(clone), "LAB_CACHE": str(cache), "ANTHROPIC_API_KEY": "",
           "LAB_HARNESS_PATH": ""}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "lab.cli", *argv[1:]], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=900)
    return out, time.monotonic() - start


@pytest.mark.slow
def test_the_no_gpu_quickstart_runs_as_written(tmp_path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(snapshot_repo(tmp_path / "origin")), str(clone))
    git(clone, "config", "user.email", "t@t")
    git(clone, "config", "user.name", "t")
    cache = tmp_path / "cache"

    if not HAS_GPU:  # README command 1 here names the quickstart's run line as what works instead
        out, _ = _lab(clone, cache, command_one())
        assert out.returncode == 2, out.stdout + out.stderr
        suggested = re.search(r"What works on this machine instead[^`]*`([^`]+)`", out.stderr)
        assert suggested, out.stderr
        run_line = next(argv for argv in quickstart()[1] if argv[1] == "run")
        assert shlex.split(suggested.group(1))[3:] == run_line[1:], (suggested.group(1), run_line)

    outputs = {}
    for argv in quickstart()[1]:
        out, seconds = _lab(clone, cache, argv)
        print(f"{seconds:6.1f} s  {shlex.join(argv)}")
        assert out.returncode == 0, f"{shlex.join(argv)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        outputs[argv[1]] = out.stdout
    # what the README says they do
    assert "cdot" in outputs["harnesses"]
    assert "experiments by verdict: KEEP 1, WORSE 1" in outputs["run"], outputs["run"]
    assert "resume: " in outputs["run"]
    assert re.search(r"^cdot-\S+ +stopped ", outputs["status"], re.M), outputs["status"]
    assert "KEEP" in outputs["log"] and "WORSE" in outputs["log"]
    assert re.search(r"^#1 KEEP .*confirmed in a fresh process", outputs["try"], re.M), outputs["try"]
    assert not git(clone, "status", "--porcelain").strip(), "the clone's files are unchanged"
