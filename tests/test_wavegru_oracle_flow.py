"""oracle.run end to end without a GPU: its phases, launches, module reloads, Check items,
values, details, hashes and releases, with the GPU parts faked on the CPU at small shapes.

Two layers of fakes, both playing a kernel whose outputs are the CPU reference's (optionally
altered the way a wrong kernel would alter them):

- launcher: device.Launcher, DeviceWeights, the MODE_* and SENTINEL_* constants and cuda.Module
  replaced; the fake launcher returns the outputs directly.
- driver: the real device.Launcher, DeviceWeights and Arena, on the CPU (torch's CUDA calls
  mapped to the CPU, cuda.Module and Event faked); the fake module's launch_async plays the
  kernel through the Params' pointers, so the launcher's guards and input checks run for real.

The reference the oracle builds with "cuda" runs on the CPU; gumbel_torch draws on the CPU;
torch.cuda.synchronize and empty_cache are logged. Nothing here runs the GPU path itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lab.extras import require
from lab.harness import load

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "wavegru"
T1, T2, B2 = 8, 6, 2  # the timed shape (B = 1) and the secret shape, small
TIMED, SECRET = "timed", f"secret_T{T2}_B{B2}"
SEEDS = [1234567, 7654321]
CUBIN = b"not a cubin"
DEADLINE = 7.5
WAIT_S = 100.0  # the host clock the fake end event reports past the real one
FAKE_MODES = (10, 11)  # MODE_GENERATE, MODE_TEACHER in the launcher layer: the oracle must pass dev's
FAKE_SENTINEL_TOKEN, FAKE_SENTINEL_BITS = -7, 0x7FC0FFEE


@pytest.fixture(scope="module")
def wg():
    h = load(HARNESS)
    pkg = type(h).__module__.rsplit(".", 1)[0]
    names = ("philox", "weights", "model", "oracle", "cuda", "device")
    mods = {m: importlib.import_module(f"{pkg}.{m}") for m in names}
    mods["make_weights"] = mods["weights"].make_weights  # the originals, before any monkeypatch
    mods["Reference"] = mods["model"].Reference
    mods["gumbel_torch"] = mods["philox"].gumbel_torch
    return mods


_WEIGHTS: dict = {}
_REFS: dict = {}


def _weights(wg, seed):
    if seed not in _WEIGHTS:
        _WEIGHTS[seed] = wg["make_weights"](seed)
    return _WEIGHTS[seed]


def _cpu_reference(wg, W):
    """A plain CPU reference for the fake kernel (not the oracle's), one per weight set."""
    if id(W) not in _REFS:
        _REFS[id(W)] = (W, wg["Reference"](W, "cpu"))
    return _REFS[id(W)][1]


@pytest.fixture(scope="module")
def expected(wg):
    """What the oracle's cases must be: the seeds, shapes and reference outputs, computed here
    independently (numpy noise, a plain CPU reference)."""
    torch = require("torch")  # the [cuda] extra: where it is not installed, these tests skip saying so
    torch.set_num_threads(2)
    o, ph = wg["oracle"], wg["philox"]
    out = {}
    for name, wseed, T, B, nseed in ((TIMED, o.PUBLIC_WEIGHT_SEED, T1, 1, o.derive(SEEDS[0], "noise")),
                                     (SECRET, o.derive(SEEDS[1], "weights"), T2, B2, o.derive(SEEDS[1], "noise"))):
        W = _weights(wg, wseed)
        G = ph.gumbel(nseed, T, B)
        ref = _cpu_reference(wg, W)
        gen = ref.generate(G)
        out[name] = SimpleNamespace(wseed=wseed, W=W, G=G, ref=ref, gen=gen, tea=ref.teacher(gen.tokens, G), T=T, B=B)
    return out


def _outputs(wg, r, T, B):
    """device.Outputs of a correct kernel: the reference's Result, copied."""
    return wg["device"].Outputs(tokens=np.ascontiguousarray(r.tokens, dtype=np.int32).reshape(T, B).copy(),
                                p=np.ascontiguousarray(r.p, dtype=np.float32).reshape(T, B).copy(),
                                h0=np.ascontiguousarray(r.h0, dtype=np.float32).copy(),
                                h1=np.ascontiguousarray(r.h1, dtype=np.float32).copy(),
                                seconds=1e-3, wall_seconds=1e-3)


def _correct_kernel(wg, W, G, generate: bool, teacher):
    ref = _cpu_reference(wg, W)
    G = np.asarray(G)
    T, B, _ = G.shape
    r = ref.generate(G) if generate else ref.teacher(np.asarray(teacher), G)
    return _outputs(wg, r, T, B)


# --- what every layer fakes -------------------------------------------------------------------
def _common_fakes(wg, monkeypatch, log):
    torch = require("torch")
    o, model = wg["oracle"], wg["model"]
    monkeypatch.setattr(o, "T_TIMED", T1)
    monkeypatch.setattr(o, "B_TIMED", 1)
    monkeypatch.setattr(o, "secret_shape", lambda seed: (T2, B2) if seed == SEEDS[1] else (0, 0))

    def make_weights(seed):
        log.append(("make_weights", seed))
        return _weights(wg, seed)

    def gumbel_torch(seed, T, B, V=256, device="cuda"):
        log.append(("noise", seed, T, B, device))
        return wg["gumbel_torch"](seed, T, B, V, device="cpu")

    counter = itertools.count()

    class CpuReference(wg["Reference"]):
        def __init__(self, weights, device="cpu", *args, **kwargs):
            self.tag = next(counter)
            log.append(("reference", self.tag, device))
            super().__init__(weights, "cpu", *args, **kwargs)

        def generate(self, G, *args, **kwargs):
            log.append(("generate", self.tag))
            return super().generate(G, *args, **kwargs)

        def teacher(self, tokens, G, *args, **kwargs):
            log.append(("teacher", self.tag))
            return super().teacher(tokens, G, *args, **kwargs)

        def __del__(self):
            log.append(("reference freed", self.tag))

    monkeypatch.setattr(wg["weights"], "make_weights", make_weights)
    monkeypatch.setattr(wg["philox"], "gumbel_torch", gumbel_torch)
    monkeypatch.setattr(model, "Reference", CpuReference)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.append(("synchronize",)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: log.append(("empty_cache",)))


def _reference_log(o, exp):
    out = []
    for tag, name, nseed in ((0, TIMED, o.derive(SEEDS[0], "noise")), (1, SECRET, o.derive(SEEDS[1], "noise"))):
        e = exp[name]
        out += [("make_weights", e.wseed), ("noise", nseed, e.T, e.B, "cuda"), ("reference", tag, "cuda"),
                ("generate", tag)]
    return out + [("synchronize",)]


# --- layer 1: a fake launcher -----------------------------------------------------------------
def _fake_launcher(wg, monkeypatch, log, faults):
    """Fakes device.Launcher / DeviceWeights / Module; `faults`: what -> f(outputs) altering them."""
    dev, o = wg["device"], wg["oracle"]
    gen_mode, tea_mode = FAKE_MODES
    modules, weight_sets = itertools.count(1), itertools.count(1)

    class FakeModule:
        def __init__(self, cubin, entry, symbol):
            self.n = next(modules)
            log.append(("load", self.n, cubin, entry, symbol))

        def unload(self):
            log.append(("unload", self.n))

    class FakeDeviceWeights:
        def __init__(self, W):
            self.W, self.n = W, next(weight_sets)
            log.append(("weights", self.n))

        def __del__(self):
            log.append(("weights freed", self.n))

    class FakeLauncher:
        def __init__(self, module):
            self.module = module
            log.append(("launcher", module.n))

        def run(self, weights, noise, mode=gen_mode, teacher=None, deadline_s=30.0, what="kernel", placement=None):
            tea = None if teacher is None else o.sha256(np.asarray(teacher, dtype=np.int32))
            log.append(("launch", what, mode, tea, deadline_s, placement, self.module.n))
            assert mode in FAKE_MODES
            out = _correct_kernel(wg, weights.W, noise, mode == gen_mode, teacher)
            if what in faults:
                faults[what](out)
            return out

        def close(self):
            log.append(("close", self.module.n))

    monkeypatch.setattr(wg["cuda"], "Module", FakeModule)
    monkeypatch.setattr(dev, "Launcher", FakeLauncher)
    monkeypatch.setattr(dev, "DeviceWeights", FakeDeviceWeights)
    monkeypatch.setattr(dev, "MODE_GENERATE", gen_mode)
    monkeypatch.setattr(dev, "MODE_TEACHER", tea_mode)
    monkeypatch.setattr(dev, "SENTINEL_TOKEN", FAKE_SENTINEL_TOKEN)
    monkeypatch.setattr(dev, "SENTINEL_FLOAT_BITS", FAKE_SENTINEL_BITS)


def _launch_log(wg, exp, validated=()):
    """The launches of phases 2-4 in the launcher layer: each phase in a fresh module; the weights
    of each launch released before the next are made; `validated`: the reference teacher-forced
    after the launch named."""
    dev, o = wg["device"], wg["oracle"]
    gen_mode, tea_mode = FAKE_MODES
    tokens = {name: o.sha256(exp[name].gen.tokens.astype(np.int32)) for name in (TIMED, SECRET)}
    phases = [[(f"generate {TIMED}", gen_mode, None), (f"generate {SECRET}", gen_mode, None)],
              [(f"teacher {TIMED}", tea_mode, tokens[TIMED]), (f"teacher {SECRET}", tea_mode, tokens[SECRET])],
              [(f"repeat gen {TIMED}", gen_mode, None), (f"repeat tea {SECRET}", tea_mode, tokens[SECRET])]]
    out, k = [], 0
    for n, launches in enumerate(phases, 1):
        out += [("empty_cache",), ("load", n, CUBIN, dev.ENTRY, dev.LAUNCH_SYMBOL), ("launcher", n)]
        for what, mode, tea in launches:
            k += 1
            out += [("weights", k), ("launch", what, mode, tea, DEADLINE, None, n)]
            out += [("teacher", 0)] if what in validated else []
            out += [("weights freed", k)]
        out += [("close", n), ("unload", n)]
    return out


def _run(wg, monkeypatch, layer, faults=None):
    log: list = []
    _common_fakes(wg, monkeypatch, log)
    layer(wg, monkeypatch, log, faults or {})
    t0 = time.perf_counter()
    check = wg["oracle"].run(CUBIN, list(SEEDS), deadline_s=DEADLINE)
    returned = len(log)
    gc.collect()
    print(f"oracle.run on the CPU fakes: {time.perf_counter() - t0:.1f} s")
    return check, log, returned


def _split_releases(log, returned):
    """The log without the reference releases; the releases up to the last empty_cache and all of
    them once run returned."""
    last_empty = max(i for i, e in enumerate(log) if e == ("empty_cache",))
    freed = [i for i, e in enumerate(log) if e[0] == "reference freed"]
    rest = [e for e in log[:returned] if e[0] != "reference freed"]
    return rest, {log[i][1] for i in freed if i < last_empty}, {log[i][1] for i in freed}


# --- what the oracle must report ------------------------------------------------------------------
def _names(exp, outputs=True):
    """Every item of a run where nothing is skipped, in order."""
    out = []
    for name in (TIMED, SECRET):
        out.append(f"guard/generate/{name}")
        for si in range(exp[name].B):
            out.append(f"generate_parity/{name}/stream{si}")
            out += [f"generate_outputs/{name}/stream{si}"] if outputs else []
    for name in (TIMED, SECRET):
        out.append(f"guard/teacher/{name}")
        out += [f"teacher/{name}/stream{si}" for si in range(exp[name].B)]
    return out + [f"bit_identical/gen/{TIMED}", f"bit_identical/tea/{SECRET}"]


def _ambiguous(o, exp, name, si):
    return int((exp[name].gen.threshold_gap[:, si] < o.TIE_EPS).sum())


def _hashes(o, exp, gen_tokens=None, gen_p=None, tea=None):
    """The output hashes, in order; the arguments: name -> array where the kernel's differ."""
    h = {}
    for name in (TIMED, SECRET):
        g = exp[name].gen
        h[f"generate/{name}/tokens"] = o.sha256((gen_tokens or {}).get(name, g.tokens.astype(np.int32)))
        h[f"generate/{name}/p"] = o.sha256((gen_p or {}).get(name, g.p.astype(np.float32)))
    for name in (TIMED, SECRET):
        for k in ("p", "h0", "h1"):
            h[f"teacher/{name}/{k}"] = o.sha256((tea or {}).get((name, k), getattr(exp[name].tea, k)))
    return h


def _zero_diffs(o, exp, name, si):
    return {"p_max_abs_diff": 0.0, "p_mean_abs_diff": 0.0, "h0_max_abs_diff": 0.0, "h1_max_abs_diff": 0.0,
            "ambiguous_steps": _ambiguous(o, exp, name, si)}


def _assert_correct_items(o, exp, check, skip=()):
    """Every item passed with the values of outputs identical to the reference's."""
    for i in check.items:
        assert i.passed, (i.name, i.detail)
        if i.name in skip:
            continue
        assert i.detail == "", (i.name, i.detail)
        kind, name, *rest = i.name.split("/")
        if kind in ("guard", "bit_identical"):
            assert i.values == {}, i.name
            continue
        si = int(rest[0].removeprefix("stream"))
        if kind == "generate_parity":
            assert i.values == {"first_mismatch": None, "margin": None, "near_ties": 0, "steps": exp[name].T}
        else:
            assert i.values == _zero_diffs(o, exp, name, si), i.name


def _lines(check, first="none", near_ties=0, p_max="0", p_mean="0", h0="0", h1="0", amb=0):
    return [f"correctness: {'pass' if check.passed else 'fail'}", f"sample_first_mismatch: {first}",
            f"sample_near_ties: {near_ties}", f"teacher_p_max_abs_diff: {p_max}", f"teacher_p_mean_abs_diff: {p_mean}",
            f"teacher_ambiguous_steps: {amb}", f"h0_max_abs_diff: {h0}", f"h1_max_abs_diff: {h1}"] + [
        f"failed: {i.name}: {i.detail}" for i in check.items if not i.passed]


def _all_ambiguous(o, exp, items):
    return sum(i.values["ambiguous_steps"] for i in items if i.name.split("/")[0] in ("generate_outputs", "teacher"))


# --- layer 1 cases ------------------------------------------------------------------------------------
def test_a_correct_kernel_passes_every_item(wg, expected, monkeypatch):
    o = wg["oracle"]
    check, log, returned = _run(wg, monkeypatch, _fake_launcher)
    assert check.passed
    assert [i.name for i in check.items] == _names(expected)
    _assert_correct_items(o, expected, check)
    assert list(check.output_hashes.items()) == list(_hashes(o, expected).items())
    assert check.lines == _lines(check, amb=_all_ambiguous(o, expected, check.items))
    rest, before_last_empty, freed = _split_releases(log, returned)
    assert rest == _reference_log(o, expected) + _launch_log(wg, expected) + [("empty_cache",)]
    assert before_last_empty == freed == {0, 1}  # del c["ref"], c["G"]: released before the last empty_cache


def _first_clear_step(o, values, lo=None):
    """The first step whose value is finite and at least TIE_EPS (a step far from any tie)."""
    ok = np.isfinite(values) & (values >= (o.TIE_EPS if lo is None else lo))
    return int(np.nonzero(ok)[0][0])


def test_wrong_outputs_fail_the_right_items(wg, expected, monkeypatch):
    """A token changed in the secret shape's second stream, a p off by 1e-3 in teacher mode, a
    launch that reports a guard written and leaves a token and a p unwritten (its items skipped),
    and a repeated run that differs in one bit of h1."""
    o, exp = wg["oracle"], expected
    g = exp[SECRET].gen
    t_tok = _first_clear_step(o, g.margin[:, 1])
    new_tok = (int(g.tokens[t_tok, 1]) + 1) % 256
    t_p = _first_clear_step(o, exp[TIMED].gen.threshold_gap[:, 0])
    guard_written = "a write past the end of p and before the start of h0 (guard region overwritten)"

    def flip_token(out):
        out.tokens[t_tok, 1] = new_tok

    def shift_p(out):
        out.p[t_p, 0] += np.float32(1e-3)

    def unwritten(out):
        out.tokens[-1, 0] = FAKE_SENTINEL_TOKEN
        out.p.view(np.uint32)[0, 1] = FAKE_SENTINEL_BITS
        out.problems.append(guard_written)

    def unwritten_and_racy(out):  # the same outputs left unwritten, one bit of h1 different; no guard written
        out.tokens[-1, 0] = FAKE_SENTINEL_TOKEN
        out.p.view(np.uint32)[0, 1] = FAKE_SENTINEL_BITS
        out.h1[1, 0] = np.nextafter(out.h1[1, 0], np.float32(np.inf))

    faults = {f"generate {SECRET}": flip_token, f"teacher {TIMED}": shift_p, f"teacher {SECRET}": unwritten,
              f"repeat tea {SECRET}": unwritten_and_racy}
    check, log, returned = _run(wg, monkeypatch, _fake_launcher, faults)
    assert not check.passed
    outcome = [(i.name, i.passed) for i in check.items]
    assert outcome == [
        (f"guard/generate/{TIMED}", True), (f"generate_parity/{TIMED}/stream0", True),
        (f"generate_outputs/{TIMED}/stream0", True),
        (f"guard/generate/{SECRET}", True), (f"generate_parity/{SECRET}/stream0", True),
        (f"generate_outputs/{SECRET}/stream0", True), (f"generate_parity/{SECRET}/stream1", False),
        (f"guard/teacher/{TIMED}", True), (f"teacher/{TIMED}/stream0", False),
        (f"guard/teacher/{SECRET}", False),
        (f"bit_identical/gen/{TIMED}", True), (f"bit_identical/tea/{SECRET}", False)]
    items = {i.name: i for i in check.items}
    _assert_correct_items(o, exp, SimpleNamespace(items=[i for i in check.items if i.passed]))

    parity = items[f"generate_parity/{SECRET}/stream1"]
    margin = float(g.margin[t_tok, 1])
    assert parity.values == {"first_mismatch": t_tok, "margin": margin, "near_ties": 0, "steps": T2}
    assert parity.detail == (f"token {new_tok} != reference {g.tokens[t_tok, 1]} at step {t_tok}, where the "
                             f"reference's top-2 margin is {margin:.3g} (>= {o.TIE_EPS:g}: not a near-tie)")

    teacher = items[f"teacher/{TIMED}/stream0"]
    clear = int((exp[TIMED].gen.threshold_gap[:, 0] >= o.TIE_EPS).sum())
    p_bad = exp[TIMED].tea.p.astype(np.float32).copy()
    p_bad[t_p, 0] += np.float32(1e-3)
    p_max = float(abs(np.float64(p_bad[t_p, 0]) - np.float64(exp[TIMED].tea.p[t_p, 0])))
    assert p_max == pytest.approx(1e-3, rel=1e-3)
    assert teacher.values == {"p_max_abs_diff": p_max, "p_mean_abs_diff": pytest.approx(p_max / clear),
                              "h0_max_abs_diff": 0.0, "h1_max_abs_diff": 0.0,
                              "ambiguous_steps": _ambiguous(o, exp, TIMED, 0)}
    assert teacher.detail == f"p max abs diff {p_max:.3g} > 0.0001; p mean abs diff {p_max / clear:.3g} > 1e-05"

    guard = items[f"guard/teacher/{SECRET}"]
    assert guard.values == {}
    assert guard.detail == f"1/{T2 * B2} tokens unwritten; 1/{T2 * B2} of p unwritten; {guard_written}"
    racy = items[f"bit_identical/tea/{SECRET}"]
    assert racy.values == {} and racy.detail == ("the same inputs gave different outputs (a race or an "
                                                 "uninitialised read)")

    tok_bad = exp[SECRET].gen.tokens.astype(np.int32).copy()
    tok_bad[t_tok, 1] = new_tok
    tea_p = exp[SECRET].tea.p.astype(np.float32).copy()
    tea_p.view(np.uint32)[0, 1] = FAKE_SENTINEL_BITS
    assert list(check.output_hashes.items()) == list(_hashes(
        o, exp, gen_tokens={SECRET: tok_bad}, tea={(TIMED, "p"): p_bad, (SECRET, "p"): tea_p}).items())
    assert check.lines == _lines(check, first=f"step {t_tok} ({SECRET}/stream1) margin {margin:.3g} FAIL",
                                 p_max=f"{p_max:.6g}", p_mean=f"{p_max / clear:.6g}",
                                 amb=_all_ambiguous(o, exp, check.items))
    rest, before_last_empty, freed = _split_releases(log, returned)
    assert rest == _reference_log(o, exp) + _launch_log(wg, exp) + [("empty_cache",)]
    assert before_last_empty == freed == {0, 1}


def _runner_up_stream(ref, G, t_fork):
    """The tokens of a sampler that takes the runner-up (the second perturbed maximum, kept) at
    step t_fork and the maximum at every other step."""
    torch = ref.torch
    G = torch.as_tensor(np.asarray(G))
    T, _, V = G.shape
    y = torch.full((1,), 128, dtype=torch.int64)
    h0 = torch.zeros(1, ref.H, dtype=ref.dtype)
    h1 = torch.zeros_like(h0)
    tokens = []
    for t in range(T):
        tok, _, h0n, h1n, *_ = ref.step(y, h0, h1, G[t])
        if t == t_fork:
            every = torch.arange(V)
            *_, deficit, forced_gap = ref.step(y.expand(V), h0.expand(V, -1), h1.expand(V, -1),
                                               G[t].expand(V, -1), every)
            ok = (deficit > 0) & (forced_gap >= 0)
            tok = every[ok][deficit[ok].argmin()].reshape(1)
            _, _, h0n, h1n, *_ = ref.step(y, h0, h1, G[t], tok)
        tokens.append(int(tok[0]))
        y, h0, h1 = tok, h0n, h1n
    return np.array(tokens, dtype=np.int32).reshape(T, 1)


def test_a_near_tie_is_validated_along_the_kernels_own_tokens(wg, expected, monkeypatch):
    """The kernel takes the runner-up where the reference's margin is smallest (TIE_EPS raised
    above that margin): the oracle teacher-forces the reference on the kernel's tokens right
    after that launch, accepts the stream, and compares p and the final states along it."""
    o, exp = wg["oracle"], expected
    margins = exp[TIMED].gen.margin[:, 0]
    t_fork = int(np.argmin(np.where(np.isfinite(margins), margins, np.inf)))
    margin = float(margins[t_fork])
    monkeypatch.setattr(o, "TIE_EPS", 2 * margin)
    kernel_tokens = _runner_up_stream(exp[TIMED].ref, exp[TIMED].G, t_fork)
    along = exp[TIMED].ref.teacher(kernel_tokens, exp[TIMED].G)
    assert kernel_tokens[t_fork, 0] != along.tokens[t_fork, 0]  # the reference's own choice there

    def take_runner_up(out):
        fork = _outputs(wg, along, T1, 1)
        out.tokens[:], out.p[:], out.h0[:], out.h1[:] = kernel_tokens, fork.p, fork.h0, fork.h1

    faults = {f"generate {TIMED}": take_runner_up, f"repeat gen {TIMED}": take_runner_up}
    check, log, returned = _run(wg, monkeypatch, _fake_launcher, faults)
    assert check.passed
    assert [i.name for i in check.items] == _names(exp)
    parity = check.items[1]
    assert parity.name == f"generate_parity/{TIMED}/stream0"
    assert parity.values == {"first_mismatch": t_fork, "margin": margin, "near_ties": 1, "steps": T1}
    assert parity.detail == (f"near-tie at step {t_fork} (margin {margin:.3g}); kernel stream validated, "
                             "1 near-tie deviation(s)")
    outputs = check.items[2]
    assert outputs.values == {"p_max_abs_diff": 0.0, "p_mean_abs_diff": 0.0, "h0_max_abs_diff": 0.0,
                              "h1_max_abs_diff": 0.0, "ambiguous_steps": int((along.threshold_gap < 2 * margin).sum())}
    _assert_correct_items(o, exp, check, skip={parity.name, outputs.name})
    assert list(check.output_hashes.items()) == list(_hashes(
        o, exp, gen_tokens={TIMED: kernel_tokens}, gen_p={TIMED: along.p.astype(np.float32)}).items())
    assert check.lines == _lines(check, first=f"step {t_fork} ({TIMED}/stream0) margin {margin:.3g}", near_ties=1,
                                 amb=_all_ambiguous(o, exp, check.items))
    rest, before_last_empty, freed = _split_releases(log, returned)
    assert rest == _reference_log(o, exp) + _launch_log(wg, exp, validated={f"generate {TIMED}"}) + [("empty_cache",)]
    assert before_last_empty == freed == {0, 1}


# --- layer 2: the real launcher on the CPU, a fake driver ---------------------------------------------
class _CpuTorch:
    """torch with every CUDA device, stream and synchronisation of device.py on the CPU."""

    def __init__(self, torch):
        self._torch = torch
        def stream():
            return SimpleNamespace(cuda_stream=0, synchronize=lambda: None, wait_stream=lambda other: None)

        self.cuda = SimpleNamespace(Stream=stream, current_stream=stream,
                                    stream=lambda s: contextlib.nullcontext(), synchronize=lambda: None)

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def empty(self, *args, device=None, **kwargs):
        return self._torch.empty(*args, **kwargs)

    def as_tensor(self, data, device=None, **kwargs):
        return self._torch.as_tensor(data, **kwargs)


def _at(ptr: int, shape, dtype):
    """A numpy view of host memory at `ptr` (the CPU arena's buffers)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)


def _fake_driver(wg, monkeypatch, log, faults):
    """The real Launcher and DeviceWeights over CPU memory; cuda.Module's launch_async plays the
    kernel through the Params' pointers; `faults`: launch index -> f(prm) after the outputs are
    written."""
    torch, dev, weights = require("torch"), wg["device"], wg["weights"]
    launches, modules = itertools.count(), itertools.count(1)

    class FakeEvent:
        def record(self, stream):
            pass

        def wait(self, deadline_s, what):
            log.append(("wait", what, deadline_s))
            return time.perf_counter() + WAIT_S

        def elapsed_ms(self, start):
            return 1.0

        def destroy(self):
            log.append(("event destroyed",))

    class FakeModule:
        def __init__(self, cubin, entry, symbol):
            self.n = next(modules)
            log.append(("load", self.n, cubin, entry, symbol))

        def launch_async(self, prm, stream):
            T, B = prm.T, prm.B
            log.append(("kernel", T, B, prm.mode, prm.teacher is not None, prm.temperature, prm.log_min_p, self.n))
            W = {n: _at(getattr(prm, n), shape, np.float32).copy() for n, shape, _ in weights.SPEC}
            G = _at(prm.noise, (T, B, weights.V), np.float32).copy()
            ref = wg["Reference"](W, "cpu")
            if prm.mode == dev.MODE_GENERATE:
                r = ref.generate(G)
            else:
                r = ref.teacher(_at(prm.teacher, (T, B), np.int32).copy(), G)
            _at(prm.tokens, (T, B), np.int32)[:] = r.tokens
            _at(prm.p, (T, B), np.float32)[:] = r.p
            _at(prm.h0_out, (B, weights.H), np.float32)[:] = r.h0
            _at(prm.h1_out, (B, weights.H), np.float32)[:] = r.h1
            k = next(launches)
            if k in faults:
                faults[k](prm)

        def unload(self):
            log.append(("unload", self.n))

    scrub = dev.Arena.scrub

    def logged_scrub(arena):
        log.append(("scrub",))
        scrub(arena)

    monkeypatch.setattr(dev.Arena, "scrub", logged_scrub)
    monkeypatch.setattr(dev, "_torch", lambda: _CpuTorch(torch))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: self.clone())  # a copy, as from a device
    monkeypatch.setattr(dev, "Event", FakeEvent)
    monkeypatch.setattr(wg["cuda"], "Module", FakeModule)


def _driver_log(wg):
    dev, model = wg["device"], wg["model"]
    lmp = float(np.float32(np.log(model.MIN_P)))
    G, Te = dev.MODE_GENERATE, dev.MODE_TEACHER
    phases = [[(f"generate {TIMED}", T1, 1, G), (f"generate {SECRET}", T2, B2, G)],
              [(f"teacher {TIMED}", T1, 1, Te), (f"teacher {SECRET}", T2, B2, Te)],
              [(f"repeat gen {TIMED}", T1, 1, G), (f"repeat tea {SECRET}", T2, B2, Te)]]
    out = []
    for n, launches in enumerate(phases, 1):
        out += [("empty_cache",), ("load", n, CUBIN, dev.ENTRY, dev.LAUNCH_SYMBOL)]
        for what, T, B, mode in launches:
            out += [("kernel", T, B, mode, mode == Te, 1.0, lmp, n), ("wait", what, DEADLINE), ("scrub",)]
        out += [("event destroyed",), ("event destroyed",), ("unload", n)]
    return out


def test_through_the_real_launcher_a_correct_kernel_passes(wg, expected, monkeypatch):
    o = wg["oracle"]
    check, log, returned = _run(wg, monkeypatch, _fake_driver)
    assert check.passed, check.failures()
    assert [i.name for i in check.items] == _names(expected)
    _assert_correct_items(o, expected, check)
    assert list(check.output_hashes.items()) == list(_hashes(o, expected).items())
    rest, before_last_empty, freed = _split_releases(log, returned)
    assert rest == _reference_log(o, expected) + _driver_log(wg) + [("empty_cache",)]
    assert before_last_empty == freed == {0, 1}


def test_through_the_real_launcher_guards_and_inputs_are_checked(wg, expected, monkeypatch):
    """Launch by launch: an h1 element left unwritten; the noise written; a store before the start
    of p; a weight written; a correct repeat (which differs from the first, unwritten, run); a
    repeat that writes the teacher tokens."""
    o, weights = wg["oracle"], wg["weights"]

    def unwritten_h1(prm):
        _at(prm.h1_out, (1, weights.H), np.uint32)[0, 5] = wg["device"].SENTINEL_FLOAT_BITS

    def write_noise(prm):
        _at(prm.noise, (1,), np.float32)[0] += 1

    def before_p(prm):
        _at(prm.p - 4, (1,), np.float32)[0] = 0.5

    def write_weight(prm):
        _at(prm.W_o, (1,), np.float32)[0] += 1

    def write_teacher(prm):
        _at(prm.teacher, (1,), np.int32)[0] ^= 1

    faults = {0: unwritten_h1, 1: write_noise, 2: before_p, 3: write_weight, 5: write_teacher}
    check, log, returned = _run(wg, monkeypatch, _fake_driver, faults)
    outcome = [(i.name, i.passed, i.detail) for i in check.items]
    assert outcome == [
        (f"guard/generate/{TIMED}", False, f"1/{weights.H} of h1 unwritten"),
        (f"generate_parity/{TIMED}/stream0", True, ""),
        (f"guard/generate/{SECRET}", False, "the noise was written (inputs are read-only)"),
        (f"generate_parity/{SECRET}/stream0", True, ""), (f"generate_parity/{SECRET}/stream1", True, ""),
        (f"guard/teacher/{TIMED}", False, "a write past the end of tokens and before the start of p "
                                          "(guard region overwritten)"),
        (f"guard/teacher/{SECRET}", False, "the weights were written (inputs are read-only)"),
        (f"bit_identical/gen/{TIMED}", False, "the same inputs gave different outputs (a race or an "
                                              "uninitialised read)"),
        (f"bit_identical/tea/{SECRET}", False, "the same inputs gave different outputs (a race or an "
                                               "uninitialised read); the teacher tokens were written "
                                               "(inputs are read-only)")]
    assert not check.passed
    assert check.lines == _lines(check)
    rest, before_last_empty, freed = _split_releases(log, returned)
    assert rest == _reference_log(o, expected) + _driver_log(wg) + [("empty_cache",)]
    assert before_last_empty == freed == {0, 1}


def test_the_real_launcher_alone(wg, expected, monkeypatch):
    """Launcher.run by itself over the CPU fakes: the outputs read back, the device and host
    times, no problems, one scrub of the launch's buffers."""
    log: list = []
    _fake_driver(wg, monkeypatch, log, {})
    dev, e = wg["device"], expected[SECRET]

    class Arena(dev.Arena):
        def __init__(self, torch, buffers, device="cuda", placement=None):
            log.append(("arena", buffers[0][0], placement))
            super().__init__(torch, buffers, device, placement)

    monkeypatch.setattr(dev, "Arena", Arena)
    launcher = dev.Launcher(wg["cuda"].Module(CUBIN, dev.ENTRY, dev.LAUNCH_SYMBOL))
    t0 = time.perf_counter()
    out = launcher.run(dev.DeviceWeights(e.W), e.G, dev.MODE_TEACHER, teacher=e.gen.tokens, deadline_s=DEADLINE,
                       what="alone", placement=3)
    for k in ("tokens", "p", "h0", "h1"):
        assert np.array_equal(getattr(out, k), getattr(e.tea, k)), k
    assert out.problems == [] and out.seconds == 1e-3
    assert WAIT_S <= out.wall_seconds <= WAIT_S + (time.perf_counter() - t0)
    lmp = float(np.float32(np.log(wg["model"].MIN_P)))
    assert log == [("load", 1, CUBIN, dev.ENTRY, dev.LAUNCH_SYMBOL), ("arena", "emb", None), ("arena", "noise", 3),
                   ("kernel", T2, B2, dev.MODE_TEACHER, True, 1.0, lmp, 1), ("wait", "alone", DEADLINE), ("scrub",)]
    launcher.close()
