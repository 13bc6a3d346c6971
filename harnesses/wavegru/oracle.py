"""The oracle (spec: design/wavegru.md): generate parity, teacher-forced probabilities and final
states, and the guards. The comparison functions work on plain arrays (tested on the CPU); the
`run` function drives the reference and the kernel on the GPU.

Near-ties. fp32 logits from two correct implementations differ by a few 1e-6 (fp32 against fp64
measured 3e-6 median, 5e-6 max). So (a) a generated token may legitimately differ where the
reference's top-2 perturbed margin is below TIE_EPS, and (b) a token may legitimately enter or
leave the min-p set where its distance to the threshold is below TIE_EPS. For (a), when the first
mismatch is such a near-tie, the kernel's whole stream is validated instead: the reference is
teacher-forced with the kernel's tokens and each must be kept and within TIE_EPS of the
perturbed maximum, at most MAX_TIES times not the maximum itself. For (b), steps whose min-p
membership is ambiguous are left out of the p comparison and counted. Everything else is exact.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from .weights import V

T_CHECK = 4096
PUBLIC_WEIGHT_SEED = 20240917  # the main weight set (timing); the oracle adds secret sets
TIE_EPS = 1e-4
MAX_TIES = 4
P_MAX_ABS, P_MEAN_ABS, H_MAX_ABS = 1e-4, 1e-5, 1e-4


def derive(seed: int, tag: str) -> int:
    """A 63-bit seed derived from a secret seed and a purpose."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{tag}".encode()).digest()[:8], "little") >> 1


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --- comparisons on arrays ------------------------------------------------------------------
def guard_problems(tokens, p, h0, h1, sentinel_token: int, sentinel_bits: int) -> list[str]:
    """Every element written, in range and finite. Returns human-readable problems."""
    out = []
    tokens = np.asarray(tokens)
    unwritten = int((tokens == sentinel_token).sum())
    if unwritten:
        out.append(f"{unwritten}/{tokens.size} tokens unwritten")
    bad = int(((tokens < 0) | (tokens >= V)).sum()) - unwritten
    if bad:
        out.append(f"{bad} tokens outside [0, {V})")
    for name, a in (("p", p), ("h0", h0), ("h1", h1)):
        a = np.ascontiguousarray(a, dtype=np.float32)
        un = int((a.view(np.uint32) == np.uint32(sentinel_bits)).sum())
        if un:
            out.append(f"{un}/{a.size} of {name} unwritten")
        nonfinite = int((~np.isfinite(a)).sum()) - un
        if nonfinite:
            out.append(f"{nonfinite} NaN/Inf in {name}")
    pf = np.asarray(p, dtype=np.float32)
    finite = np.isfinite(pf)
    if np.any((pf[finite] < 0) | (pf[finite] > 1)):
        out.append("p outside [0, 1]")
    return out


@dataclass
class GenerateComparison:
    passed: bool
    first_mismatch: int | None = None  # step
    margin: float | None = None  # the reference's top-2 perturbed margin there
    near_ties: int = 0
    detail: str = ""


def compare_generate(kernel_tokens, ref_tokens, ref_margin, validate=None) -> GenerateComparison:
    """Exact token parity for one stream; `validate(kernel_tokens)` -> (deficit, forced_gap,
    ref_argmax) of the reference teacher-forced on the kernel's tokens, called only when the
    first mismatch is a near-tie."""
    k = np.asarray(kernel_tokens).reshape(-1)
    r = np.asarray(ref_tokens).reshape(-1)
    diff = np.nonzero(k != r)[0]
    if diff.size == 0:
        return GenerateComparison(True)
    t = int(diff[0])
    margin = float(np.asarray(ref_margin).reshape(-1)[t])
    if margin >= TIE_EPS or validate is None:
        return GenerateComparison(False, t, margin, detail=(
            f"token {k[t]} != reference {r[t]} at step {t}, where the reference's top-2 margin is "
            f"{margin:.3g} (>= {TIE_EPS:g}: not a near-tie)"))
    deficit, forced_gap, argmax = (np.asarray(a).reshape(-1) for a in validate(k))
    bad = np.nonzero((deficit > TIE_EPS) | (forced_gap < -TIE_EPS))[0]
    ties = int((argmax != k).sum())
    if bad.size:
        s = int(bad[0])
        return GenerateComparison(False, t, margin, ties, detail=(
            f"near-tie at step {t} (margin {margin:.3g}), but the kernel's token at step {s} is not a "
            f"valid sample: {deficit[s]:.3g} below the perturbed maximum, {forced_gap[s]:.3g} from the min-p cut"))
    if ties > MAX_TIES:
        return GenerateComparison(False, t, margin, ties, detail=f"{ties} near-tie deviations (> {MAX_TIES})")
    return GenerateComparison(True, t, margin, ties, detail=f"near-tie at step {t} (margin {margin:.3g}); "
                              f"kernel stream validated, {ties} near-tie deviation(s)")


@dataclass
class TeacherComparison:
    passed: bool
    p_max: float
    p_mean: float
    h0_max: float
    h1_max: float
    ambiguous: int
    detail: str = ""


def compare_teacher(kernel_p, kernel_h0, kernel_h1, ref_p, ref_h0, ref_h1, ref_gap) -> TeacherComparison:
    kp = np.asarray(kernel_p, dtype=np.float64).reshape(-1)
    rp = np.asarray(ref_p, dtype=np.float64).reshape(-1)
    clear = np.asarray(ref_gap).reshape(-1) >= TIE_EPS
    d = np.abs(kp - rp)[clear]
    d = np.where(np.isnan(d), np.inf, d)
    p_max = float(d.max()) if d.size else 0.0
    p_mean = float(d.mean()) if d.size else 0.0

    def hmax(a, b):
        x = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
        return float(np.where(np.isnan(x), np.inf, x).max())

    h0m, h1m = hmax(kernel_h0, ref_h0), hmax(kernel_h1, ref_h1)
    problems = []
    if not p_max <= P_MAX_ABS:
        problems.append(f"p max abs diff {p_max:.3g} > {P_MAX_ABS:g}")
    if not p_mean <= P_MEAN_ABS:
        problems.append(f"p mean abs diff {p_mean:.3g} > {P_MEAN_ABS:g}")
    if not h0m <= H_MAX_ABS:
        problems.append(f"h0 max abs diff {h0m:.3g} > {H_MAX_ABS:g}")
    if not h1m <= H_MAX_ABS:
        problems.append(f"h1 max abs diff {h1m:.3g} > {H_MAX_ABS:g}")
    return TeacherComparison(not problems, p_max, p_mean, h0m, h1m, int((~clear).sum()), "; ".join(problems))


@dataclass
class Tally:
    """Accumulates the per-stream results into Check items and the seed's line format."""

    items: list = field(default_factory=list)
    hashes: dict = field(default_factory=dict)
    first_mismatch: str = "none"
    near_ties: int = 0
    p_max: float = 0.0
    p_mean: float = 0.0
    h0_max: float = 0.0
    h1_max: float = 0.0
    ambiguous: int = 0

    def add(self, item):
        self.items.append(item)

    def lines(self) -> list[str]:
        ok = all(i.passed for i in self.items) and bool(self.items)
        out = [f"correctness: {'pass' if ok else 'fail'}",
               f"sample_first_mismatch: {self.first_mismatch}",
               f"sample_near_ties: {self.near_ties}",
               f"teacher_p_max_abs_diff: {self.p_max:.6g}",
               f"teacher_p_mean_abs_diff: {self.p_mean:.6g}",
               f"teacher_ambiguous_steps: {self.ambiguous}",
               f"h0_max_abs_diff: {self.h0_max:.6g}",
               f"h1_max_abs_diff: {self.h1_max:.6g}"]
        for i in self.items:
            if not i.passed:
                out.append(f"failed: {i.name}: {i.detail}")
        return out


# --- the full oracle on the GPU ----------------------------------------------------------------
def run(cubin: bytes, seeds: list[int], T: int = T_CHECK, deadline_s: float = 30.0):
    """Returns lab Check. Raises cuda.KernelError / KernelTimeout / LaunchConfigError when the
    kernel crashes, hangs or cannot launch (the runner maps them to CRASH / TIMEOUT)."""
    from lab import Check, CheckItem
    from lab.extras import require

    from . import device as dev
    from .cuda import Module
    from .model import Reference
    from .philox import gumbel
    from .weights import make_weights

    torch = require("torch")
    start = time.perf_counter()
    if len(seeds) < 2:
        raise ValueError("the oracle needs at least two secret seeds")
    weight_sets = [("main", PUBLIC_WEIGHT_SEED), ("secret", derive(seeds[0], "weights"))]
    noise_seeds = [derive(s, "noise") for s in seeds]
    S = len(noise_seeds)
    tally = Tally()

    # 1. References first, before the candidate is loaded; only host copies are kept.
    cases = []
    for wname, wseed in weight_sets:
        W = make_weights(wseed)
        G = np.concatenate([gumbel(ns, T, 1) for ns in noise_seeds], axis=1)  # streams = seeds
        ref = Reference(W, "cuda")
        gen = ref.generate(G)
        tea = ref.teacher(gen.tokens, G)
        cases.append({"name": wname, "W": W, "G": G, "gen": gen, "tea": tea, "ref": ref})
    torch.cuda.synchronize()

    def fresh_launcher():
        torch.cuda.empty_cache()
        module = Module(cubin, dev.ENTRY, dev.LAUNCH_SYMBOL)
        return module, dev.Launcher(module)

    def guard(name, out):
        problems = guard_problems(out.tokens, out.p, out.h0, out.h1, dev.SENTINEL_TOKEN, dev.SENTINEL_FLOAT_BITS)
        tally.add(CheckItem(f"guard_written/{name}", not problems, {}, "; ".join(problems)))
        return not problems

    # 2. Generate parity (module loaded fresh for the phase).
    module, launcher = fresh_launcher()
    first = {}
    for c in cases:
        dw = dev.DeviceWeights(c["W"])
        for si in range(S):
            name = f"{c['name']}/seed{si}"
            out = launcher.run(dw, c["G"][:, si:si + 1], dev.MODE_GENERATE, deadline_s=deadline_s,
                               what=f"generate {name}")
            first[("gen", name)] = out
            tally.hashes[f"generate/{name}/tokens"] = sha256(out.tokens)
            tally.hashes[f"generate/{name}/p"] = sha256(out.p)
            guard(f"generate/{name}", out)

            def validate(k, c=c, si=si):
                v = c["ref"].teacher(k.reshape(-1, 1), c["G"][:, si:si + 1])
                return v.deficit, v.forced_gap, v.tokens

            cmp = compare_generate(out.tokens[:, 0], c["gen"].tokens[:, si], c["gen"].margin[:, si], validate)
            tally.near_ties += cmp.near_ties
            if cmp.first_mismatch is not None and tally.first_mismatch == "none":
                tally.first_mismatch = (f"step {cmp.first_mismatch} ({name}) margin {cmp.margin:.3g}"
                                        + ("" if cmp.passed else " FAIL"))
            tally.add(CheckItem(f"generate_parity/{name}", cmp.passed,
                                {"first_mismatch": cmp.first_mismatch, "margin": cmp.margin,
                                 "near_ties": cmp.near_ties, "steps": T}, cmp.detail))
        del dw
    launcher.close()
    module.unload()

    # 3. Teacher-forced probabilities and final states (module reloaded, buffers re-allocated).
    module, launcher = fresh_launcher()
    for c in cases:
        dw = dev.DeviceWeights(c["W"])
        for si in range(S):
            name = f"{c['name']}/seed{si}"
            teacher = c["gen"].tokens[:, si:si + 1]
            out = launcher.run(dw, c["G"][:, si:si + 1], dev.MODE_TEACHER, teacher=teacher,
                               deadline_s=deadline_s, what=f"teacher {name}")
            first[("tea", name)] = out
            for k in ("p", "h0", "h1"):
                tally.hashes[f"teacher/{name}/{k}"] = sha256(getattr(out, k))
            guard(f"teacher/{name}", out)
            tea = c["tea"]
            cmp = compare_teacher(out.p[:, 0], out.h0[0], out.h1[0], tea.p[:, si], tea.h0[si], tea.h1[si],
                                  tea.threshold_gap[:, si])
            tally.p_max = max(tally.p_max, cmp.p_max)
            tally.p_mean = max(tally.p_mean, cmp.p_mean)
            tally.h0_max = max(tally.h0_max, cmp.h0_max)
            tally.h1_max = max(tally.h1_max, cmp.h1_max)
            tally.ambiguous += cmp.ambiguous
            tally.add(CheckItem(f"teacher/{name}", cmp.passed,
                                {"p_max_abs_diff": cmp.p_max, "p_mean_abs_diff": cmp.p_mean,
                                 "h0_max_abs_diff": cmp.h0_max, "h1_max_abs_diff": cmp.h1_max,
                                 "ambiguous_steps": cmp.ambiguous}, cmp.detail))
        del dw
    launcher.close()
    module.unload()

    # 4. Run twice: the same inputs in a freshly loaded module give bit-identical outputs.
    module, launcher = fresh_launcher()
    c = cases[1]
    dw = dev.DeviceWeights(c["W"])
    name = f"{c['name']}/seed0"
    again = launcher.run(dw, c["G"][:, 0:1], dev.MODE_GENERATE, deadline_s=deadline_s, what=f"repeat {name}")
    prev = first[("gen", name)]
    same = all(np.array_equal(np.ascontiguousarray(getattr(again, k)).view(np.uint8),
                              np.ascontiguousarray(getattr(prev, k)).view(np.uint8)) for k in ("tokens", "p", "h0", "h1"))
    tally.add(CheckItem(f"bit_identical/generate/{name}", same, {},
                        "" if same else "the same inputs gave different outputs (a race or an uninitialised read)"))
    again = launcher.run(dw, c["G"][:, 0:1], dev.MODE_TEACHER, teacher=c["gen"].tokens[:, 0:1],
                         deadline_s=deadline_s, what=f"repeat teacher {name}")
    prev = first[("tea", name)]
    same = all(np.array_equal(np.ascontiguousarray(getattr(again, k)).view(np.uint8),
                              np.ascontiguousarray(getattr(prev, k)).view(np.uint8)) for k in ("tokens", "p", "h0", "h1"))
    tally.add(CheckItem(f"bit_identical/teacher/{name}", same, {},
                        "" if same else "the same inputs gave different outputs (a race or an uninitialised read)"))
    del dw
    launcher.close()
    module.unload()
    for c in cases:
        del c["ref"]
    torch.cuda.empty_cache()

    passed = all(i.passed for i in tally.items)
    return Check(passed=passed, items=tally.items, lines=tally.lines(), output_hashes=tally.hashes,
                 seconds=time.perf_counter() - start)
