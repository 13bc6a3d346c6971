"""The oracle (spec: program.md, "Correctness"): generate parity, teacher-forced probabilities and final
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


def compare_outputs(kernel_p, kernel_h0, kernel_h1, ref_p, ref_h0, ref_h1, ref_gap) -> TeacherComparison:
    """p per step and the final states against the reference run along the same tokens, in
    generate mode as in teacher mode (steps with an ambiguous min-p set left out, counted)."""
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

    def guard(self, name: str, out, sentinel_token: int, sentinel_bits: int) -> bool:
        """Adds guard/<name>: every output written, in range and finite, and none of the launch's
        own problems (guards written, inputs changed). Returns whether it passed."""
        from lab.sdk import CheckItem

        problems = guard_problems(out.tokens, out.p, out.h0, out.h1, sentinel_token, sentinel_bits)
        problems += out.problems
        self.add(CheckItem(f"guard/{name}", not problems, {}, "; ".join(problems)))
        return not problems

    def record_parity(self, name: str, cmp: GenerateComparison, steps: int) -> None:
        """Adds generate_parity/<name>; the first mismatch of the run and the near-ties."""
        from lab.sdk import CheckItem

        self.near_ties += cmp.near_ties
        if cmp.first_mismatch is not None and self.first_mismatch == "none":
            self.first_mismatch = (f"step {cmp.first_mismatch} ({name}) margin {cmp.margin:.3g}"
                                   + ("" if cmp.passed else " FAIL"))
        self.add(CheckItem(f"generate_parity/{name}", cmp.passed,
                           {"first_mismatch": cmp.first_mismatch, "margin": cmp.margin,
                            "near_ties": cmp.near_ties, "steps": steps}, cmp.detail))

    def record_outputs(self, name: str, kind: str, cmp: TeacherComparison) -> None:
        """Adds <kind>/<name> (p and the final states) and keeps the run's largest differences."""
        from lab.sdk import CheckItem

        self.p_max = max(self.p_max, cmp.p_max)
        self.p_mean = max(self.p_mean, cmp.p_mean)
        self.h0_max = max(self.h0_max, cmp.h0_max)
        self.h1_max = max(self.h1_max, cmp.h1_max)
        self.ambiguous += cmp.ambiguous
        self.add(CheckItem(f"{kind}/{name}", cmp.passed,
                           {"p_max_abs_diff": cmp.p_max, "p_mean_abs_diff": cmp.p_mean,
                            "h0_max_abs_diff": cmp.h0_max, "h1_max_abs_diff": cmp.h1_max,
                            "ambiguous_steps": cmp.ambiguous}, cmp.detail))

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


# --- a timed sample against its partner ---------------------------------------------------------
# Both sides of a timed pair run on the same noise. Two correct kernels give the same tokens at
# every step (a flip needs a near-tie within their few-1e-6 logit difference) and the same final
# states within H_MAX_ABS. p may differ beyond P_MAX_ABS only where a logit sits at the min-p cut
# (one side keeps it, the other not: then p moves by at most the cut's weight, 10%); at most
# MAX_CUT_STEPS such steps. Anything else goes to the reference (`adjudicate`).
MAX_CUT_STEPS = 16


def outputs_agree(a, b) -> str:
    """"" when two sides' outputs for the same noise agree, else what differs (one line)."""
    ta, tb = np.asarray(a.tokens), np.asarray(b.tokens)
    if ta.shape != tb.shape:
        return f"output shapes differ: {ta.shape} and {tb.shape}"
    diff = np.argwhere(ta != tb)
    if diff.size:
        t, s = (int(x) for x in diff[0])
        return f"tokens differ first at step {t} of stream {s} ({int(diff.shape[0])} steps in all)"
    pa, pb = np.asarray(a.p, dtype=np.float64), np.asarray(b.p, dtype=np.float64)
    d = np.abs(pa - pb)
    d = np.where(np.isnan(d), np.inf, d)
    off = d > P_MAX_ABS
    if off.any():
        cut = d[off] <= 0.1 * np.maximum(pa[off], pb[off]) + P_MAX_ABS
        if not cut.all() or int(off.sum()) > MAX_CUT_STEPS:
            t = int(np.argwhere(off)[0][0])
            return (f"p differs by more than {P_MAX_ABS:g} at {int(off.sum())} steps (first step {t}: "
                    f"{pa.reshape(-1)[np.argmax(off.reshape(-1))]:.6g} and {pb.reshape(-1)[np.argmax(off.reshape(-1))]:.6g})")
    rest = d[~off]
    if rest.size and not rest.mean() <= P_MEAN_ABS:
        return f"p mean abs difference {rest.mean():.3g} > {P_MEAN_ABS:g}"
    for name in ("h0", "h1"):
        x = np.abs(np.asarray(getattr(a, name), dtype=np.float64) - np.asarray(getattr(b, name), dtype=np.float64))
        m = float(np.where(np.isnan(x), np.inf, x).max())
        if not m <= H_MAX_ABS:
            return f"final {name} differs by {m:.3g} > {H_MAX_ABS:g}"
    return ""


def verify_against_reference(out, forced) -> str:
    """"" when one stream's outputs are a valid generation per the reference teacher-forced on
    the kernel's own tokens (`forced`: model.Result of that run): each token kept and within
    TIE_EPS of the perturbed maximum, at most MAX_TIES near-tie deviations, p and the final
    states within the oracle's tolerances. Else the first problem."""
    k = np.asarray(out.tokens).reshape(-1)
    deficit, gap = np.asarray(forced.deficit).reshape(-1), np.asarray(forced.forced_gap).reshape(-1)
    bad = np.nonzero((deficit > TIE_EPS) | (gap < -TIE_EPS))[0]
    if bad.size:
        s = int(bad[0])
        return (f"token {k[s]} at step {s} is not a valid sample: {deficit[s]:.3g} below the perturbed "
                f"maximum, {gap[s]:.3g} from the min-p cut")
    ties = int((np.asarray(forced.tokens).reshape(-1) != k).sum())
    if ties > MAX_TIES:
        return f"{ties} near-tie deviations (> {MAX_TIES})"
    cmp = compare_outputs(out.p.reshape(-1), out.h0.reshape(-1), out.h1.reshape(-1), forced.p.reshape(-1),
                          forced.h0.reshape(-1), forced.h1.reshape(-1), forced.threshold_gap.reshape(-1))
    return cmp.detail


@dataclass
class _Waiting:
    side: int
    seed: int
    outputs: object
    sample: object
    noise: object


class TimedPairs:
    """Settles every timed sample against its partner: the first side of a pair waits; the second
    (same seed, so the same noise) compares the two (`outputs_agree`); where they differ,
    `adjudicate(noise, [outputs...])` -> [problem or ""] (the reference, teacher-forced on each
    side's own tokens) decides, and a side that fails has its Sample marked failed (FAIL, not a
    dropped pair). A sample whose partner never comes fails as unverified."""

    def __init__(self, adjudicate):
        self.adjudicate = adjudicate
        self.waiting: dict[int, _Waiting] = {}
        self.adjudications = 0

    def add(self, side: int, seed: int, outputs, sample, noise) -> None:
        if seed not in self.waiting:
            self.abandon(side)
            self.waiting[seed] = _Waiting(side, seed, outputs, sample, noise)
            return
        first = self.waiting.pop(seed)
        second = _Waiting(side, seed, outputs, sample, noise)
        pending = [w for w in (first, second) if w.sample.ok]
        if len(pending) < 2:
            return  # a side already failed its own guards: the pair fails with that reason
        differ = outputs_agree(first.outputs, second.outputs)
        if not differ:
            return
        self.adjudications += 1
        verdicts = self.adjudicate(noise, [first.outputs, second.outputs])
        for w, problem in zip((first, second), verdicts):
            if problem:
                _fail(w.sample, f"timed sample differs from its partner ({differ}) and the reference "
                                f"rejects it: {problem}")
            else:
                note = f"differed from its partner ({differ}); the reference accepts it"
                w.sample.detail = "; ".join(x for x in (w.sample.detail, note) if x)

    def abandon(self, side: int | None = None) -> None:
        """Fail the waiting samples of `side` (every side when None): they were never compared."""
        for seed, w in list(self.waiting.items()):
            if side is None or w.side == side:
                del self.waiting[seed]
                _fail(w.sample, "timed sample never compared with its partner's (unverified)")


def _fail(sample, detail: str) -> None:
    sample.ok = False
    sample.detail = "; ".join(x for x in (sample.detail, detail) if x)


# --- the full oracle on the GPU ----------------------------------------------------------------
T_TIMED, B_TIMED = 16384, 1  # the timed shape: the oracle runs it too


def secret_shape(seed: int) -> tuple[int, int]:
    """Another shape, drawn from a secret seed: T in [1024, 6144], B in [2, 4]."""
    x = derive(seed, "shape")
    return 1024 + x % 5121, 2 + (x >> 20) % 3


def run(cubin: bytes, seeds: list[int], deadline_s: float = 30.0):
    """Returns lab Check. Raises cuda.KernelError / KernelTimeout / LaunchConfigError when the
    kernel crashes, hangs or cannot launch (the runner maps them to CRASH / TIMEOUT).

    Cases: the timed shape (T = 16384, B = 1, the main weights: the very launch a timed sample
    makes, with secret noise) and a secret shape (T, B > 1 from a secret seed, a secret weight
    set). Each in generate mode (tokens exact, p and final states against the reference) and
    teacher mode (p and final states), each phase in a freshly loaded module, every launch
    through the same Launcher as timing (guards, read-only inputs, scrubbing)."""
    from lab.sdk import Check, require

    from . import device as dev
    from .cuda import Module

    torch = require("torch")
    start = time.perf_counter()
    if len(seeds) < 2:
        raise ValueError("the oracle needs at least two secret seeds")
    o = _OracleRun(cubin, deadline_s, torch, dev, Module)
    o.references(seeds)
    o.generate_phase()
    o.teacher_phase()
    o.repeat_phase()
    o.release()
    tally = o.tally
    passed = all(i.passed for i in tally.items)
    return Check(passed=passed, items=tally.items, lines=tally.lines(), output_hashes=tally.hashes,
                 seconds=time.perf_counter() - start)


def same_outputs(a, b) -> bool:
    """Bit-identical tokens, p and final states."""
    return all(np.array_equal(np.ascontiguousarray(getattr(a, k)).view(np.uint8),
                              np.ascontiguousarray(getattr(b, k)).view(np.uint8))
               for k in ("tokens", "p", "h0", "h1"))


class _OracleRun:
    """The steps of `run`, in order: references, generate mode, teacher mode, run twice, release.
    `cases`: one dict per case (name, W, G, gen, ref, T, B); `first`: each phase-2/3 launch's
    outputs, for the repeat."""

    def __init__(self, cubin: bytes, deadline_s: float, torch, dev, module_cls):
        self.cubin, self.deadline_s, self.torch, self.dev, self.Module = cubin, deadline_s, torch, dev, module_cls
        self.tally = Tally()
        self.cases: list[dict] = []
        self.first: dict = {}

    def references(self, seeds: list[int]) -> None:
        """1. References first, before the candidate is loaded; only host copies of the outputs.
        Teacher-forced with its own tokens the reference retraces its generation exactly, so one
        generate run serves both modes."""
        from .model import Reference
        from .philox import gumbel_torch
        from .weights import make_weights

        T2, B2 = secret_shape(seeds[1])
        specs = [("timed", PUBLIC_WEIGHT_SEED, T_TIMED, B_TIMED, derive(seeds[0], "noise")),
                 (f"secret_T{T2}_B{B2}", derive(seeds[1], "weights"), T2, B2, derive(seeds[1], "noise"))]
        for name, wseed, T, B, nseed in specs:
            W = make_weights(wseed)
            G = gumbel_torch(nseed, T, B)
            ref = Reference(W, "cuda")
            self.cases.append({"name": name, "W": W, "G": G, "gen": ref.generate(G), "ref": ref, "T": T, "B": B})
        self.torch.cuda.synchronize()

    def fresh_launcher(self):
        """The candidate's module loaded afresh for a phase, and its launcher."""
        self.torch.cuda.empty_cache()
        module = self.Module(self.cubin, self.dev.ENTRY, self.dev.LAUNCH_SYMBOL)
        return module, self.dev.Launcher(module)

    def guard(self, name: str, out) -> bool:
        """Tally.guard with the device's sentinels."""
        return self.tally.guard(name, out, self.dev.SENTINEL_TOKEN, self.dev.SENTINEL_FLOAT_BITS)

    def generate_phase(self) -> None:
        """2. Generate mode (module loaded fresh for the phase): tokens, then p and final states."""
        dev, tally = self.dev, self.tally
        module, launcher = self.fresh_launcher()
        for c in self.cases:
            dw = dev.DeviceWeights(c["W"])
            out = launcher.run(dw, c["G"], dev.MODE_GENERATE, deadline_s=self.deadline_s,
                               what=f"generate {c['name']}")
            self.first[("gen", c["name"])] = out
            tally.hashes[f"generate/{c['name']}/tokens"] = sha256(out.tokens)
            tally.hashes[f"generate/{c['name']}/p"] = sha256(out.p)
            written = self.guard(f"generate/{c['name']}", out)
            for si in range(c["B"]):
                self.generate_stream(c, out, si, written)
            del dw
        launcher.close()
        module.unload()

    def generate_stream(self, c: dict, out, si: int, written: bool) -> None:
        """Token parity of stream `si`; where it holds and every output was written, p and the
        final states along the kernel's own tokens: the generation itself, or the reference
        teacher-forced on the kernel's tokens after a validated near-tie."""
        name = f"{c['name']}/stream{si}"
        gen, G1 = c["gen"], c["G"][:, si:si + 1]
        forced = {}

        def validate(k):
            forced["run"] = c["ref"].teacher(k.reshape(-1, 1), G1)
            v = forced["run"]
            return v.deficit, v.forced_gap, v.tokens

        cmp = compare_generate(out.tokens[:, si], gen.tokens[:, si], gen.margin[:, si], validate)
        self.tally.record_parity(name, cmp, c["T"])
        if not (cmp.passed and written):
            return
        r = forced.get("run")
        if r is None:
            ref_p, ref_h0, ref_h1, gap = gen.p[:, si], gen.h0[si], gen.h1[si], gen.threshold_gap[:, si]
        else:
            ref_p, ref_h0, ref_h1, gap = r.p[:, 0], r.h0[0], r.h1[0], r.threshold_gap[:, 0]
        self.tally.record_outputs(name, "generate_outputs",
                                  compare_outputs(out.p[:, si], out.h0[si], out.h1[si], ref_p, ref_h0, ref_h1, gap))

    def teacher_phase(self) -> None:
        """3. Teacher-forced on the reference's tokens (module reloaded, buffers re-allocated)."""
        dev, tally = self.dev, self.tally
        module, launcher = self.fresh_launcher()
        for c in self.cases:
            dw = dev.DeviceWeights(c["W"])
            gen = c["gen"]
            out = launcher.run(dw, c["G"], dev.MODE_TEACHER, teacher=gen.tokens, deadline_s=self.deadline_s,
                               what=f"teacher {c['name']}")
            self.first[("tea", c["name"])] = out
            for k in ("p", "h0", "h1"):
                tally.hashes[f"teacher/{c['name']}/{k}"] = sha256(getattr(out, k))
            if self.guard(f"teacher/{c['name']}", out):
                for si in range(c["B"]):
                    tally.record_outputs(f"{c['name']}/stream{si}", "teacher",
                                         compare_outputs(out.p[:, si], out.h0[si], out.h1[si], gen.p[:, si],
                                                         gen.h0[si], gen.h1[si], gen.threshold_gap[:, si]))
            del dw
        launcher.close()
        module.unload()

    def repeat_phase(self) -> None:
        """4. Run twice: the same inputs in a freshly loaded module give bit-identical outputs."""
        from lab.sdk import CheckItem

        dev, cases = self.dev, self.cases
        module, launcher = self.fresh_launcher()
        for kind, c, mode in (("gen", cases[0], dev.MODE_GENERATE), ("tea", cases[1], dev.MODE_TEACHER)):
            dw = dev.DeviceWeights(c["W"])
            again = launcher.run(dw, c["G"], mode, teacher=c["gen"].tokens if kind == "tea" else None,
                                 deadline_s=self.deadline_s, what=f"repeat {kind} {c['name']}")
            same = same_outputs(again, self.first[(kind, c["name"])]) and not again.problems
            detail = "" if same else ("the same inputs gave different outputs (a race or an uninitialised read)"
                                      + ("; " + "; ".join(again.problems) if again.problems else ""))
            self.tally.add(CheckItem(f"bit_identical/{kind}/{c['name']}", same, {}, detail))
            del dw
        launcher.close()
        module.unload()

    def release(self) -> None:
        """The references and the noise off the GPU."""
        for c in self.cases:
            del c["ref"], c["G"]
        self.torch.cuda.empty_cache()
