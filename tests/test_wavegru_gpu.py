"""WaveGRU on a real GPU, through the lab's own path (lab.evaluate.run_evaluation: a runner
process per evaluation, killed with its process group past the timeout): the baseline and every
solution patch, each verdict asserted."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab.envs import get
from lab.evaluate import run_evaluation
from lab.harness import load

from solutions import expected

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "wavegru"
EXPECTED = expected(HARNESS)  # solutions/expected.json: each patch's verdict against the baseline
BUILD_LIMIT = "build limit"  # the reason of a build ended at the harness's limit (its own test below)
TIMEOUT_S = 240
# What must have caught each cheat of issue 15 (a word of the verdict's reason): the right
# guard, not merely some failure.
CAUGHT_BY = {
    "wrong/t_dependent.patch": "timed",  # the oracle at the timed shape
    "wrong/clock_exit.patch": "timed",
    "wrong/launch_count.patch": "timed sample",  # passes the oracle; a timed sample fails
    "wrong/generate_shortcut.patch": "generate_outputs",
    "wrong/include_outside.patch": "includes /etc/passwd",
    "wrong/oob_write.patch": "past the end of tokens",
}
BUILD_LIMIT_TEST_S = 20.0


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    if not shutil.which("nvcc"):
        return "nvcc is not on PATH"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))]


@pytest.fixture(scope="module")
def wavegru():
    return load(HARNESS)


def patched(patch: Path, tmp: Path) -> Path:
    tree = tmp / "tree"
    tree.mkdir()
    shutil.copy(HARNESS / "kernel.cu", tree / "kernel.cu")
    subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
    return tree


def test_baseline_passes_the_oracle(wavegru, tmp_path):
    out = run_evaluation(wavegru, HARNESS, tmp_path / "w", env=get("native"), mode="check", timeout_s=TIMEOUT_S)
    assert out.verdict.status == "PASS", (out.verdict, out.stderr_tail)
    lines = out.evaluation.check.lines
    assert any(line.startswith("correctness: pass") for line in lines), lines


def test_baseline_against_itself_is_not_keep(wavegru, tmp_path):
    out = run_evaluation(wavegru, HARNESS, tmp_path / "w", env=get("native"), mode="aa", timeout_s=TIMEOUT_S)
    print(f"A/A: {out.verdict.status} {out.verdict.reason[:300]} | evaluation {out.evaluation.seconds:.1f} s, "
          f"oracle {out.evaluation.check.seconds:.1f} s, {len(out.evaluation.pairs)} pairs")
    assert out.evaluation.pairs, out.stderr_tail
    assert out.verdict.status != "KEEP", out.verdict
    assert out.evaluation.candidate_build.info.get("registers"), "ptxas report parsed"


@pytest.mark.parametrize("name", sorted(n for n, v in EXPECTED.items()
                                        if v.status != "TIMEOUT" and v.reason != BUILD_LIMIT))
def test_solution_verdict(wavegru, name, tmp_path):
    tree = patched(HARNESS / "solutions" / name, tmp_path)
    out = run_evaluation(wavegru, tree, tmp_path / "w", env=get("native"), incumbent_tree=HARNESS,
                         timeout_s=TIMEOUT_S)
    ev = out.evaluation
    print(f"{name}: {out.verdict.status} {out.verdict.reason[:300]} | evaluation {ev.seconds:.1f} s, "
          f"build {getattr(ev.candidate_build, 'seconds', 0):.1f} s, oracle {getattr(ev.check, 'seconds', 0) or 0:.1f} s, "
          f"{len(ev.pairs)} pairs")
    assert out.verdict.status == EXPECTED[name].status, (out.verdict, out.evaluation.reason, out.stderr_tail)
    reason = f"{out.verdict.reason} {out.evaluation.reason}"
    assert EXPECTED[name].reason in reason, reason
    if name in CAUGHT_BY:
        assert CAUGHT_BY[name] in reason, reason
    if name == "wrong/include_outside.patch":  # one line, quoting nothing of the file
        error = out.evaluation.candidate_build.error
        assert "\n" not in error and "root:" not in reason + error + out.evaluation.candidate_build.report, error


def test_never_ending_compile_is_ended_with_its_tree(wavegru, tmp_path):
    """A build past the limit: nvcc's whole tree ended, the verdict within 10 s of the limit."""
    names = [n for n, v in EXPECTED.items() if v.reason == BUILD_LIMIT]
    assert names
    for name in names:
        (tmp_path / name.replace("/", "_")).mkdir()
        tree = patched(HARNESS / "solutions" / name, tmp_path / name.replace("/", "_"))
        wavegru.build_limit_s = BUILD_LIMIT_TEST_S
        try:
            t0 = time.monotonic()
            build = wavegru.build(tree, tmp_path / "out")
            took = time.monotonic() - t0
        finally:
            wavegru.build_limit_s = type(wavegru).build_limit_s
        assert not build.ok and "build limit" in build.error, build.error
        assert took <= BUILD_LIMIT_TEST_S + 10, took
        time.sleep(1)
        left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _compiles(pid)]
        assert not left, f"compiler processes outlived the build: {left}"


def _compiles(pid: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"kernel.cu" in cmd and (b"/stage" in cmd or b"lab-wavegru-build" in cmd)


def test_cubin_is_the_same_in_any_folder(wavegru, tmp_path):
    """The sealed build compiles at a fixed path (/stage; a fixed folder of this user with the
    sandbox off): two source folders, one cubin (issue 17, item 6)."""
    shas = []
    for sub in ("one", "deeper/two"):
        tree = tmp_path / sub / "src"
        tree.mkdir(parents=True)
        shutil.copy(HARNESS / "kernel.cu", tree / "kernel.cu")
        build = wavegru.build(tree, tmp_path / sub / "out")
        assert build.ok, build.error
        shas.append(build.artifact_sha256)
    assert shas[0] == shas[1], shas


def test_gpu_usable_after_hang(wavegru, tmp_path):
    """A hang is killed with its process; the next evaluation on the same GPU passes."""
    hangs = sorted(n for n, v in EXPECTED.items() if v.status == "TIMEOUT")
    assert hangs, "solutions/expected.json names no hanging kernel"
    for name in hangs:
        (tmp_path / name.replace("/", "_")).mkdir()
        tree = patched(HARNESS / "solutions" / name, tmp_path / name.replace("/", "_"))
        out = run_evaluation(wavegru, tree, tmp_path / "w", env=get("native"), mode="check", timeout_s=TIMEOUT_S)
        assert out.verdict.status == "TIMEOUT", (out.verdict, out.stderr_tail)
    out = run_evaluation(wavegru, HARNESS, tmp_path / "w2", env=get("native"), mode="check", timeout_s=TIMEOUT_S)
    assert out.verdict.status == "PASS", (out.verdict, out.stderr_tail)


def test_noise_still_in_flight_on_the_callers_stream_is_awaited(wavegru, tmp_path):
    """The timed samples make their noise on the default stream and launch on the launcher's own:
    the launcher must wait for it. Here the noise is finished only after a half-second spin on the
    default stream, so a launcher that does not wait copies it unfinished, and its check of the
    inputs ('the noise was written') or of the outputs fails."""
    import torch

    package = type(wavegru).__module__.rsplit(".", 1)[0]  # the harness's modules, as the lab loaded them
    dev, philox = (importlib.import_module(f"{package}.{name}") for name in ("device", "philox"))
    (tmp_path / "src").mkdir()
    shutil.copy(HARNESS / "kernel.cu", tmp_path / "src" / "kernel.cu")
    build = wavegru.build(tmp_path / "src", tmp_path / "out")
    assert build.ok, build.error
    loaded = wavegru.load(build)
    try:
        G = philox.gumbel_torch(7, 64, 8)
        reference = loaded.launcher.run(loaded.weights, G, dev.MODE_GENERATE, what="settled", placement=0)
        assert not reference.problems, reference.problems
        torch.cuda.synchronize()
        torch.cuda._sleep(int(1e9))  # ~0.5 s of spinning on the default stream
        late = G * 1.0  # ready only after the spin
        out = loaded.launcher.run(loaded.weights, late, dev.MODE_GENERATE, what="in flight", placement=0)
        assert not out.problems, out.problems
        assert (out.tokens == reference.tokens).all()
    finally:
        wavegru.unload(loaded)
