"""WaveGRU on a real GPU, through the lab's own path (lab.evaluate.run_evaluation: a runner
process per evaluation, killed with its process group past the timeout): the baseline and every
solution patch, each verdict asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.envs import get
from lab.evaluate import run_evaluation
from lab.harness import load

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "wavegru"
EXPECTED = json.loads((HARNESS / "solutions" / "expected.json").read_text())
TIMEOUT_S = 240
# expected.json's words -> the lab's verdict for a candidate timed against the baseline
VERDICT = {"pass": "KEEP", "FAIL": "FAIL", "CRASH": "CRASH", "TIMEOUT": "TIMEOUT"}


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
    assert out.evaluation.pairs, out.stderr_tail
    assert out.verdict.status != "KEEP", out.verdict
    assert out.evaluation.candidate_build.info.get("registers"), "ptxas report parsed"


@pytest.mark.parametrize("name", sorted(n for n, v in EXPECTED.items() if v != "TIMEOUT"))
def test_solution_verdict(wavegru, name, tmp_path):
    tree = patched(HARNESS / "solutions" / name, tmp_path)
    out = run_evaluation(wavegru, tree, tmp_path / "w", env=get("native"), incumbent_tree=HARNESS,
                         timeout_s=TIMEOUT_S)
    assert out.verdict.status == VERDICT[EXPECTED[name]], (out.verdict, out.evaluation.reason, out.stderr_tail)


def test_gpu_usable_after_hang(wavegru, tmp_path):
    """A hang is killed with its process; the next evaluation on the same GPU passes."""
    hangs = sorted(n for n, v in EXPECTED.items() if v == "TIMEOUT")
    assert hangs, "solutions/expected.json names no hanging kernel"
    for name in hangs:
        (tmp_path / name.replace("/", "_")).mkdir()
        tree = patched(HARNESS / "solutions" / name, tmp_path / name.replace("/", "_"))
        out = run_evaluation(wavegru, tree, tmp_path / "w", env=get("native"), mode="check", timeout_s=TIMEOUT_S)
        assert out.verdict.status == "TIMEOUT", (out.verdict, out.stderr_tail)
    out = run_evaluation(wavegru, HARNESS, tmp_path / "w2", env=get("native"), mode="check", timeout_s=TIMEOUT_S)
    assert out.verdict.status == "PASS", (out.verdict, out.stderr_tail)
