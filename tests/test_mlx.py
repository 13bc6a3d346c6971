"""The MLX harness's parts: the sampler spec and its stream check (numpy only), the preflight
without mlx, model resolution, the tiny model, and the worker protocol with small fake pipelines
(no model needed: the worker only imports mlx).

Tests that need mlx skip with the reason where mlx and mlx-lm are not installed
(harnesses/mlx/setup.sh installs them); under CI they fail instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lab.errors import EnvironmentUnavailable, MissingExtra
from lab.harness import load

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "mlx"


def _module(name: str):
    h = load(HARNESS)
    return importlib.import_module(type(h).__module__.rsplit(".", 1)[0] + "." + name)


def mlx_missing() -> str:
    """Why the mlx tests cannot run here, or "" when they can."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        return f"mlx is not importable ({exc}); run harnesses/mlx/setup.sh"
    if importlib.util.find_spec("mlx_lm") is None:
        return "mlx-lm is not installed; run harnesses/mlx/setup.sh"
    return ""


@pytest.fixture
def needs_mlx():
    reason = mlx_missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the MLX tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _tiny_model(monkeypatch):
    monkeypatch.setenv("LAB_MLX_MODEL", "tiny")  # never probe the hub from a test


# --- the sampler spec (numpy only) --------------------------------------------------------------
def _stream(seed=0, steps=48, vocab=300, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((steps, vocab)) * scale).astype(np.float32)
    gumbel = -np.log(-np.log(rng.uniform(size=(steps, vocab)))).astype(np.float32)
    return logits, gumbel


def _draw(spec, logits, gumbel, temperature, top_p):
    """A straightforward float32 implementation of the spec, as a pipeline would write it."""
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    if temperature == 0:
        return lp.argmax(-1).tolist()
    ascending = np.sort(lp, axis=-1)
    probs = np.exp(ascending)
    mass_above = np.cumsum(probs[:, ::-1], axis=-1)[:, ::-1] - probs
    dropped = (mass_above >= top_p).sum(-1)
    threshold = np.take_along_axis(ascending, dropped[:, None], -1)
    kept = np.where(lp < threshold, -np.inf, lp)
    return (kept / temperature + gumbel).argmax(-1).tolist()


def test_spec_accepts_its_own_sampler_and_rejects_argmax_and_no_top_p():
    spec = _module("spec")
    logits, gumbel = _stream()
    tokens = _draw(spec, logits, gumbel, 0.7, 0.9)
    report = spec.check_stream(logits, gumbel, tokens, 0.7, 0.9, logit_eps=1e-3)
    assert report["ok"] and report["exact"] == len(tokens), report
    assert len(set(tokens)) > 10  # sampling, not a constant
    argmax = logits.argmax(-1).tolist()
    report = spec.check_stream(logits, gumbel, argmax, 0.7, 0.9, logit_eps=1e-3)
    assert not report["ok"] and "below the spec's choice" in report["first_bad"]["why"]
    no_top_p = (spec.log_softmax(logits) / 0.7 + gumbel).argmax(-1).tolist()
    assert no_top_p != tokens
    report = spec.check_stream(logits, gumbel, no_top_p, 0.7, 0.9, logit_eps=1e-3)
    assert not report["ok"] and report["first_bad"]["why"] == "outside the top-p nucleus"


def test_spec_greedy_and_other_temperature_or_noise_fail():
    spec = _module("spec")
    logits, gumbel = _stream(1)
    assert spec.check_stream(logits, None, logits.argmax(-1).tolist(), 0.0, 1.0, logit_eps=1e-3)["ok"]
    hotter = _draw(spec, logits, gumbel, 1.0, 0.9)
    assert not spec.check_stream(logits, gumbel, hotter, 0.7, 0.9, logit_eps=1e-3)["ok"]
    _, other_noise = _stream(2)
    assert not spec.check_stream(logits, gumbel, _draw(spec, logits, other_noise, 0.7, 0.9), 0.7, 0.9,
                                 logit_eps=1e-3)["ok"]


def test_spec_accepts_near_ties_within_the_logit_bound_only():
    spec = _module("spec")
    logits, gumbel = _stream(3)
    logits[5, :] = -5.0
    logits[5, [10, 11]] = [4.0, 4.0 - 1e-4]  # two tokens apart by far less than the bound
    gumbel[5, [10, 11]] = [0.0, 0.0]
    tokens = _draw(spec, logits, gumbel, 0.7, 0.9)
    assert tokens[5] == 10
    tokens[5] = 11
    report = spec.check_stream(logits, gumbel, tokens, 0.7, 0.9, logit_eps=1e-3)
    assert report["ok"] and report["ties"] == 1
    assert not spec.check_stream(logits, gumbel, tokens, 0.7, 0.9, logit_eps=1e-6)["ok"]


def test_spec_rejects_tokens_outside_the_vocabulary_and_short_streams():
    spec = _module("spec")
    logits, gumbel = _stream(4, steps=4)
    tokens = _draw(spec, logits, gumbel, 0.7, 0.9)
    bad = spec.check_stream(logits, gumbel, tokens[:3] + [logits.shape[1]], 0.7, 0.9, logit_eps=1e-3)
    assert not bad["ok"] and "outside the vocabulary" in bad["first_bad"]["why"]
    assert not spec.check_stream(logits, gumbel, tokens[:3], 0.7, 0.9, logit_eps=1e-3)["ok"]


def test_nucleus_matches_mlx_lm_semantics():
    spec = _module("spec")
    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert spec.nucleus(lp, 0.5).tolist() == [[True, False, False, False]]
    assert spec.nucleus(lp, 0.79).tolist() == [[True, True, False, False]]
    assert spec.nucleus(lp, 0.81).tolist() == [[True, True, True, False]]


# --- the driver's seeds and prompts --------------------------------------------------------------
def test_prompts_are_seeded_windows_of_the_corpus():
    driver = _module("driver")
    corpus = list(range(100))
    a, b = driver.seeded_prompt(corpus, 7, 64), driver.seeded_prompt(corpus, 7, 64)
    assert a == b and len(a) == 64
    assert driver.seeded_prompt(corpus, 8, 64) != a
    assert driver.window(corpus, 90, 15) == list(range(90, 100)) + list(range(5))
    assert 0 <= driver.derive(2**62, "x") < 2**63 and driver.derive(1, "a") != driver.derive(1, "b")


# --- the locked side ----------------------------------------------------------------------------------
def test_reference_is_the_pristine_pipeline():
    assert (HARNESS / "reference.py").read_bytes() == (HARNESS / "inference.py").read_bytes(), \
        "reference.py must stay a byte-identical copy of the shipped inference.py"


def test_only_inference_py_is_editable_and_the_lock_holds():
    from lab.harness import verify_lock

    h = load(HARNESS)
    assert h.editable == ("inference.py",)
    assert {"harness.py", "driver.py", "worker.py", "oracle.py", "spec.py", "reference.py", "model.py",
            "corpus.txt", "interface.md", "program.md"} <= set(h.locked_files())
    verify_lock(h)


def test_preflight_names_the_mlx_extra(monkeypatch):
    h = load(HARNESS)
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # as if mlx were not installed
    with pytest.raises(MissingExtra, match=r"\[mlx\]"):
        h.preflight()


def test_preflight_names_the_mlx_extra_for_mlx_lm(monkeypatch, needs_mlx):
    h = load(HARNESS)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else real(name, *a))
    with pytest.raises(MissingExtra, match=r"mlx_lm.*\[mlx\]"):
        h.preflight()


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, monkeypatch, needs_mlx):
    model = _module("model")
    h = load(HARNESS)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("LAB_MLX_MODEL", str(tmp_path))
    with pytest.raises(EnvironmentUnavailable, match="not an MLX model folder: it has no tokenizer.json, model"):
        h.preflight()
    monkeypatch.setenv("LAB_MLX_MODEL", str(tmp_path / "absent"))
    with pytest.raises(model.ModelUnavailable, match="not a folder"):
        h.preflight()


# --- the tiny model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_is_deterministic_and_loads_offline(tmp_path, needs_mlx):
    model = _module("model")
    a = model.resolve(str(tmp_path / "a"))
    b = model.resolve(str(tmp_path / "b"))
    assert a.sha256 == b.sha256 and a.name == model.tiny_name()
    assert set(a.files) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert json.loads((Path(a.path) / "config.json").read_text())["eos_token_id"] == []
    corpus = model.corpus_ids(a)
    assert 1000 < len(corpus) and max(corpus) < model.TINY_SPEC["vocab_size"]
    code = ("import mlx_lm; m, t = mlx_lm.load(%r); "
            "print(len(mlx_lm.generate(m, t, 'The river', max_tokens=8, verbose=False)) > 0, list(t.eos_token_ids))")
    out = subprocess.run([sys.executable, "-c", code % a.path], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.stdout.split() == ["True", "[]"], out.stderr[-2000:]


# --- the worker and its protocol, with fake pipelines -------------------------------------------
FAKE = '''
import os, sys, time
def load(model_path):
    return {"path": model_path}
def generate(state, prompt, max_tokens, temperature, top_p, seed):
    print("generation_tps: 99999")            # Python-level print: must land in the log
    os.write(1, b"prompt_tps: 99999\\n")       # C-level write to fd 1: must land in the log too
    if prompt == [0]:
        raise ValueError("no zeros please")
    if prompt == [1]:
        time.sleep(3600)
    if prompt == [2]:
        os._exit(3)
    for i in range(max_tokens):
        yield (seed + i) % 50
def score(state, prompt, continuation):
    import numpy as np
    return np.ones((len(continuation), 7), dtype=np.float32)
'''


@pytest.fixture
def fake_worker(tmp_path, needs_mlx):
    driver = _module("driver")
    pipeline = tmp_path / "inference.py"
    pipeline.write_text(FAKE)
    worker = driver.Worker(pipeline, str(tmp_path), label="fake")
    yield driver, worker
    worker.close()


def test_worker_answers_and_the_pipeline_cannot_print_into_the_protocol(fake_worker):
    driver, worker = fake_worker
    answer = driver.generate(worker, [5, 6], 4, 0.7, 0.9, 10)
    assert answer.data["tokens"] == [10, 11, 12, 13]
    assert answer.events == ["first"] and 0 < answer.first_seconds <= answer.seconds <= answer.wall_seconds + 1e-3
    log = worker.stderr_tail()
    assert "generation_tps: 99999" in log and "prompt_tps: 99999" in log
    assert driver.score(worker, [1, 2], [3, 4, 5]).shape == (3, 7)


def test_worker_reports_the_pipeline_exception_and_carries_on(fake_worker):
    driver, worker = fake_worker
    with pytest.raises(driver.WorkerError, match="generate raised ValueError: no zeros please"):
        driver.generate(worker, [0], 4, 0.7, 0.9, 1)
    assert driver.generate(worker, [5], 2, 0.7, 0.9, 1).data["tokens"] == [1, 2]


def test_reference_ops_are_refused_to_a_candidate(fake_worker):
    driver, worker = fake_worker
    with pytest.raises(driver.WorkerError, match="PermissionError"):
        driver.verify(worker, [5], [1, 2], 0.7, 0.9, 1, 1e-3)


def test_a_hung_request_is_killed_at_its_deadline(fake_worker):
    driver, worker = fake_worker
    with pytest.raises(driver.WorkerTimeout, match="did not answer within its deadline"):
        driver.generate(worker, [1], 4, 0.7, 0.9, 1, timeout=2)
    assert worker.proc.poll() is not None


def test_a_dying_pipeline_is_an_error_with_its_status(fake_worker):
    driver, worker = fake_worker
    with pytest.raises(driver.WorkerError, match="exited with status 3"):
        driver.generate(worker, [2], 4, 0.7, 0.9, 1)


def test_an_import_error_is_reported_at_start(tmp_path, needs_mlx):
    driver = _module("driver")
    (tmp_path / "inference.py").write_text("import no_such_module_anywhere\n")
    worker = driver.Worker(tmp_path / "inference.py", str(tmp_path), label="broken")
    with pytest.raises(driver.WorkerError, match="ModuleNotFoundError: No module named 'no_such_module_anywhere'"):
        worker.wait_ready()
    worker.close()


def test_the_worker_has_no_torch_even_where_it_is_installed(tmp_path, needs_mlx):
    """transformers (through mlx_lm) would import torch in every worker; an MLX pipeline runs
    without it, as on a Mac (interface.md)."""
    driver = _module("driver")
    (tmp_path / "inference.py").write_text(
        "import transformers.utils\n"
        "assert not transformers.utils.is_torch_available()\n"
        "import torch\n")
    worker = driver.Worker(tmp_path / "inference.py", str(tmp_path), label="torch")
    with pytest.raises(driver.WorkerError, match="ModuleNotFoundError: import of torch halted"):
        worker.wait_ready()
    worker.close()
