"""WaveGRU without a GPU: Philox known answers, weight rounding, the reference in fp32 against
fp64, the launch symbol read from a cubin, and the oracle's comparisons on fake candidates
derived from the reference (a correct one passes; a flipped token, a perturbed p, a NaN, an
unwritten element fail)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lab.extras import require
from lab.harness import load

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "wavegru"


@pytest.fixture(scope="module")
def wg():
    h = load(HARNESS)
    import importlib

    pkg = type(h).__module__.rsplit(".", 1)[0]
    mods = {m: importlib.import_module(f"{pkg}.{m}") for m in ("philox", "weights", "model", "oracle", "cuda", "device")}
    mods["harness"] = h
    return mods


# --- Philox ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(wg, ctr, key, expected):
    out = wg["philox"].philox4x32(np.array([ctr], dtype=np.uint32), key)[0]
    assert tuple(int(v) for v in out) == expected


def test_gumbel_layout_and_range(wg):
    ph = wg["philox"]
    G = ph.gumbel(12345, 5, 3)
    assert G.shape == (5, 3, 256) and G.dtype == np.float32
    x = ph.philox4x32(np.array([[7, 4, 2, 0]], dtype=np.uint32), ph.seed_key(12345))[0]  # quad 7, t 4, b 2
    u = ((x >> 8).astype(np.float64) + 0.5) * 2.0 ** -24
    assert np.array_equal(G[4, 2, 28:32], (-np.log(-np.log(u))).astype(np.float32))
    assert not np.array_equal(G, ph.gumbel(12346, 5, 3))


def test_gumbel_torch_matches_numpy(wg):
    ph = wg["philox"]
    assert np.array_equal(ph.gumbel(2**40 + 9, 40, 2), ph.gumbel_torch(2**40 + 9, 40, 2, device="cpu").numpy())


# --- weights ---------------------------------------------------------------------------------
def test_round_to_bf16(wg):
    w = wg["weights"]
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 2**-7 + 2**-9, -3.14159, 1e-30], dtype=np.float32)
    r = w.round_to_bf16(x)
    assert w.is_bf16_exact(r)
    assert r[0] == 1.0 and r[1] == 1.0  # a tie rounds to even
    assert r[2] == np.float32(1.0 + 2**-6) or r[2] == np.float32(1.0 + 2**-7)
    assert np.all(np.abs(r - x) <= np.abs(x) * 2**-8)


def test_weights_are_seeded_shaped_and_bf16(wg):
    w = wg["weights"]
    a, b = w.make_weights(1), w.make_weights(1)
    assert all(np.array_equal(a[n], b[n]) for n in w.NAMES)
    assert not np.array_equal(a["W_hh0"], w.make_weights(2)["W_hh0"])
    assert a["W_ih0"].shape == (3072, 1024) and a["W_o"].shape == (256, 1024)
    assert all(w.is_bf16_exact(a[n]) for n in w.NAMES)
    assert np.abs(a["W_hh1"]).max() <= 1 / 32 and np.abs(a["W_o"]).max() <= 1.0
    assert np.all(a["g0"] == 1) and np.all(a["g1"] == 1)


# --- reference -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(wg):
    """fp32 and fp64 references on the same weights and noise (T=96, B=2)."""
    torch = require("torch")  # the [cuda] extra: where it is not installed, these tests skip saying so

    torch.set_num_threads(2)
    W = wg["weights"].make_weights(3)
    G = wg["philox"].gumbel(99, 96, 2)
    r32 = wg["model"].Reference(W, "cpu", "float32")
    r64 = wg["model"].Reference(W, "cpu", "float64")
    g32, g64 = r32.generate(G), r64.generate(G)
    t32, t64 = r32.teacher(g64.tokens, G), r64.teacher(g64.tokens, G)
    return {"W": W, "G": G, "r32": r32, "g32": g32, "g64": g64, "t32": t32, "t64": t64}


def test_reference_fp32_matches_fp64(calib):
    g32, g64, t32, t64 = calib["g32"], calib["g64"], calib["t32"], calib["t64"]
    assert np.array_equal(g32.tokens, g64.tokens)
    assert np.abs(t32.p - t64.p).max() < 1e-5
    assert np.abs(t32.h0 - t64.h0).max() < 5e-6 and np.abs(t32.h1 - t64.h1).max() < 5e-6
    assert np.all(t32.deficit <= 1e-4) and np.all(t32.forced_gap >= -1e-4)


def test_reference_is_a_valid_sampler(calib):
    g = calib["g32"]
    assert g.tokens.shape == (96, 2) and g.tokens.min() >= 0 and g.tokens.max() < 256
    assert np.all((g.p > 0) & (g.p <= 1)) and np.all(g.margin >= 0)
    assert len(np.unique(g.tokens)) > 20  # sampling, not a constant


def test_teacher_mode_reproduces_generate(calib):
    """Teacher-forced with its own tokens, the reference retraces its generation exactly."""
    t = calib["r32"].teacher(calib["g32"].tokens, calib["G"])
    assert np.array_equal(t.tokens, calib["g32"].tokens)
    assert np.array_equal(t.p, calib["g32"].p)
    assert np.array_equal(t.h0, calib["g32"].h0)


def test_streams_are_independent(calib):
    one = calib["r32"].generate(calib["G"][:, 1:2])
    assert np.array_equal(one.tokens[:, 0], calib["g32"].tokens[:, 1])


# --- oracle comparisons on fake candidates ------------------------------------------------------
def test_generate_parity_logic(wg, calib):
    o, g = wg["oracle"], calib["g32"]
    ref, margin = g.tokens[:, 0], g.margin[:, 0]
    assert o.compare_generate(ref.copy(), ref, margin).passed
    flipped = ref.copy()
    t = int(np.argmax(margin))  # a step far from any tie
    flipped[t] = (flipped[t] + 1) % 256
    c = o.compare_generate(flipped, ref, margin)
    assert not c.passed and c.first_mismatch == t and c.margin >= o.TIE_EPS


def test_near_tie_is_validated(wg, calib):
    o, g = wg["oracle"], calib["g32"]
    ref = g.tokens[:, 0]
    margin = g.margin[:, 0].copy()
    alt = ref.copy()
    alt[10] = (alt[10] + 1) % 256
    margin[10] = 1e-6  # pretend the reference saw a near-tie there
    good = lambda k: (np.zeros(len(k)), np.ones(len(k)), ref)  # noqa: E731  every token valid
    c = o.compare_generate(alt, ref, margin, good)
    assert c.passed and c.first_mismatch == 10 and c.near_ties == 1
    bad = lambda k: (np.where(np.arange(len(k)) == 50, 0.5, 0.0), np.ones(len(k)), ref)  # noqa: E731
    assert not o.compare_generate(alt, ref, margin, bad).passed


def _teacher(o, t, p=None, h0=None):
    return o.compare_outputs(t.p[:, 0] if p is None else p, t.h0[0] if h0 is None else h0, t.h1[0],
                             t.p[:, 0], t.h0[0], t.h1[0], t.threshold_gap[:, 0])


def test_teacher_logic(wg, calib):
    o, t64, t32 = wg["oracle"], calib["t64"], calib["t32"]
    assert _teacher(o, t64).passed
    # the fp32 reference as the candidate against the fp64 one: a correct kernel's numbers
    c = o.compare_outputs(t32.p[:, 0], t32.h0[0], t32.h1[0], t64.p[:, 0], t64.h0[0], t64.h1[0], t64.threshold_gap[:, 0])
    assert c.passed and c.p_max < 1e-5
    p = t64.p[:, 0].astype(np.float32).copy()
    clear = int(np.argmax(t64.threshold_gap[:, 0]))
    p[clear] += 3e-4
    assert not _teacher(o, t64, p=p).passed
    p[clear] = np.nan
    assert not _teacher(o, t64, p=p).passed
    h0 = t64.h0[0].copy()
    h0[5] += 2e-4
    assert not _teacher(o, t64, h0=h0).passed


def test_guards(wg, calib):
    o, d, g = wg["oracle"], wg["device"], calib["g32"]
    tok, p = g.tokens[:, :1].copy(), g.p[:, :1].astype(np.float32).copy()
    h0, h1 = g.h0[:1].astype(np.float32).copy(), g.h1[:1].astype(np.float32).copy()
    args = (d.SENTINEL_TOKEN, d.SENTINEL_FLOAT_BITS)
    assert o.guard_problems(tok, p, h0, h1, *args) == []
    t2 = tok.copy()
    t2[-1] = d.SENTINEL_TOKEN
    assert "unwritten" in o.guard_problems(t2, p, h0, h1, *args)[0]
    p2 = p.copy()
    p2.view(np.uint32)[3] = d.SENTINEL_FLOAT_BITS
    assert "unwritten" in o.guard_problems(tok, p2, h0, h1, *args)[0]
    h2 = h1.copy()
    h2[0, 7] = np.inf
    assert "NaN/Inf" in o.guard_problems(tok, p, h0, h2, *args)[0]
    t3 = tok.copy()
    t3[0] = 256
    assert "outside" in o.guard_problems(t3, p, h0, h1, *args)[0]


def test_tally_lines_use_the_seed_format(wg):
    from lab import CheckItem

    t = wg["oracle"].Tally()
    t.add(CheckItem("x", True))
    lines = t.lines()
    for key in ("correctness: pass", "sample_first_mismatch:", "teacher_p_max_abs_diff:",
                "teacher_p_mean_abs_diff:", "h0_max_abs_diff:", "h1_max_abs_diff:"):
        assert any(line.startswith(key) for line in lines), key


# --- the harness and the build (nvcc runs without a GPU) -------------------------------------
def test_harness_contract(wg):
    h = wg["harness"]
    assert h.name == "wavegru" and h.editable == ("kernel.cu",)
    assert h.metric.name == "throughput_sps" and h.metric.higher_is_better
    assert h.environment.needs_gpu
    assert abs(h.speed_of_light_seconds - 16384 * 2.4e-6 * 0.9) < 1e-12
    assert h.workload()["steps"] == 16384
    assert wg["cuda"].Params.__dict__  # the ctypes mirror of WavegruParams is 216 bytes (asserted at import)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_build_reads_launch_config_and_ptxas(wg, tmp_path):
    h = wg["harness"]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(HARNESS / "kernel.cu", src / "kernel.cu")
    b = h.build(src, tmp_path / "out")
    assert b.ok, b.error
    assert b.info["grid"] >= 1 and b.info["block"] == 256 and b.info["cooperative"]
    assert b.info["registers"] > 0 and "spill_store_bytes" in b.info
    assert len(b.artifact_sha256) == 64
    (src / "kernel.cu").write_text("this is not CUDA\n")
    bad = h.build(src, tmp_path / "out2")
    assert not bad.ok and bad.error


def test_solution_patches_apply(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not on PATH")
    from solutions import expected

    cases = expected(HARNESS)
    assert {"KEEP", "TIMEOUT"} <= {v.status for v in cases.values()}
    for name in cases:
        d = tmp_path / name.replace("/", "_")
        d.mkdir()
        shutil.copy(HARNESS / "kernel.cu", d / "kernel.cu")
        subprocess.run(["git", "apply", str(HARNESS / "solutions" / name)], cwd=d, check=True)
        assert (d / "kernel.cu").read_text() != (HARNESS / "kernel.cu").read_text()
