"""The decision rule: paired log ratios, a bootstrap CI of their median, KEEP/SAME/WORSE.

Everything here works on per-pair x = log(t_candidate / t_incumbent): negative is faster. The
protocol (README, "How a run works") keeps a change only when the whole 99% CI of the median is
faster by at least delta, where delta = max(0.5%, 2 x the A/A noise floor), and sends every KEEP to a
confirmation run in a fresh process. `verdict_for` is the one place where a runner's record
becomes a verdict: every guard against a dishonest or broken timing is there. `speedup` and
`speedup_ci` (defined with the records, whose `median` and CI they read) turn a log ratio and
its CI into the speedup every report shows.

This module imports nothing of the lab but lab.records (tests/test_imports.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .records import CRASH, FAIL, KEEP, SAME, WORSE, Evaluation, Pair, Sample, TelemetryBlock, Verdict
from .records import speedup, speedup_ci  # noqa: F401 (part of this module's API)

DEFAULT_CONFIDENCE = 0.99
MIN_DELTA = 0.005  # 0.5 %: below this no GPU timing we have seen is reproducible across processes
BIG_GAIN = 1.3  # a single step faster than this gets a diff review on top of the confirmation run
DEFAULT_MIN_PAIRS = 20
N_BOOT = 4000

# Timer cross-check (hack 3: work moved off the timed stream). `seconds` is the harness's own
# clock (device events on a GPU) and `wall_seconds` the host clock around the same unit.
# Events lie inside the host interval, so device time may exceed wall time only by clock
# granularity: any sample beyond DEVICE_OVER_WALL x wall + DEVICE_OVER_WALL_SLACK_S is a broken
# timer. The other direction is legitimate in part (launch overhead, host work of a generation
# call), so it is judged on medians, never on one sample that a host hiccup can stretch, and
# relative to the incumbent, so that a harness whose unit is mostly host time is not failed on
# every evaluation: the candidate fails when its device time covers under MIN_TIMER_COVERAGE of
# its wall time while covering under half of what the incumbent's covers.
DEVICE_OVER_WALL = 1.05
DEVICE_OVER_WALL_SLACK_S = 1e-3
MIN_TIMER_COVERAGE = 0.2


# --- the numbers ----------------------------------------------------------------------------
def _valid_seconds(seconds) -> bool:
    """A time that can enter a log ratio: a finite positive number (JSON stores NaN as null)."""
    return isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0


def log_ratios(pairs: Sequence[Pair], dropped_blocks: Iterable[int] = frozenset()) -> np.ndarray:
    """Per-pair log(t_candidate / t_incumbent); NaN where a time is not a finite positive number."""
    dropped = set(dropped_blocks)
    return np.array([
        p.log_ratio() if _valid_seconds(p.incumbent.seconds) and _valid_seconds(p.candidate.seconds)
        else math.nan
        for p in pairs if p.block not in dropped
    ], dtype=float)


def median_ci(x, confidence: float = DEFAULT_CONFIDENCE, n_boot: int = N_BOOT,
              seed: int = 0) -> tuple[float, float, float]:
    """(median, lo, hi): the median of `x` (finite values; `decide` checks) and its bootstrap
    percentile CI, all n_boot resamples drawn at once.

    The seed is fixed so that the stop rule in the runner and the verdict in the lab compute the
    same interval from the same pairs.
    """
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        raise ValueError("median_ci needs at least one value")
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(x)), float(lo), float(hi)


def _half_width(x, confidence: float) -> float:
    _, lo, hi = median_ci(x, confidence)
    return (hi - lo) / 2


def noise_floor(aa_log_ratios, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest effect an A/A run could show, as a fraction: |median| + CI half-width."""
    x = np.asarray(aa_log_ratios, dtype=float)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(
            "the A/A run has no pairs or a time that is zero, negative or not a number: "
            "the harness's `sample` must return finite positive seconds")
    median, lo, hi = median_ci(x, confidence)
    return math.expm1(abs(median) + (hi - lo) / 2)


def delta_for(noise_floor: float, minimum: float = MIN_DELTA) -> float:
    """The decision threshold: twice the noise floor, never under `minimum`."""
    return max(minimum, 2 * noise_floor)


def min_detectable_effect(x, n_pairs: int | None = None, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The effect (a fraction) whose CI would clear zero in almost every run of `n_pairs` pairs.

    Twice the CI half-width: for a true effect of that size the CI's near end lies one
    half-width (z = 2.58 standard errors at 99%) past zero, so only an estimate that errs by that
    much misses it. The half-width at another pair count is scaled by sqrt(n_now / n), the
    1/sqrt(n) law of a median's standard error.
    """
    x = np.asarray(x, dtype=float)
    n = n_pairs or x.size
    return math.expm1(2 * _half_width(x, confidence) * math.sqrt(x.size / n))


# --- the decision ---------------------------------------------------------------------------
def decide(x, delta: float, *, confidence: float = DEFAULT_CONFIDENCE, min_pairs: int = DEFAULT_MIN_PAIRS,
           budget_exhausted: bool = False) -> Verdict:
    """KEEP/WORSE only when the whole CI lies beyond delta; SAME otherwise; FAIL on broken times."""
    x = np.asarray(x, dtype=float)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        return Verdict(FAIL, f"{bad} of {x.size} pairs have a time that is zero, negative or not a number",
                       delta=delta, pairs=int(x.size))
    if x.size < min_pairs:
        return Verdict(SAME, f"too few pairs ({x.size} < {min_pairs})", delta=delta, pairs=int(x.size))
    median, lo, hi = median_ci(x, confidence)
    verdict = Verdict(SAME, median=median, ci_low=lo, ci_high=hi, delta=delta, pairs=int(x.size))
    pct = f"{confidence * 100:g}%"
    # A timing the budget ended while the CI was still wider than the stop rule's target did not
    # converge: its verdict must hold for an interval twice as wide (one more half-width of
    # margin), so that only effects far beyond delta survive it; everything else is SAME.
    half_width = (hi - lo) / 2
    margin = half_width if budget_exhausted and half_width >= delta / 2 else 0.0
    # delta >= 1 (a machine so noisy that twice its floor is 100 %): no time is that much
    # shorter, so nothing can be kept; the bound is -inf rather than a log of a non-positive.
    faster_by_delta = math.log1p(-delta) if delta < 1 else -math.inf
    if hi + margin <= faster_by_delta:
        verdict.status, verdict.needs_confirmation = KEEP, True
        gain = speedup(median)
        if gain > BIG_GAIN:
            verdict.reason = (f"speedup {gain:.2f}x is above {BIG_GAIN}x: review the diff and "
                              "confirm in a fresh process on fresh seeds")
        else:
            verdict.reason = f"the whole {pct} CI is faster by at least delta; confirm in a fresh process"
    elif lo - margin >= math.log1p(delta):
        verdict.status = WORSE
        verdict.reason = f"the whole {pct} CI is slower by at least delta"
    elif margin:
        verdict.reason = "budget ended before the CI was narrow enough"
    else:
        verdict.reason = f"the {pct} CI reaches inside +-delta"
    return verdict


def confirm(verdict: Verdict, confirmation: Verdict, refused: str = "") -> Verdict:
    """A KEEP after its confirming run (a fresh process on fresh seeds): still KEEP, saying it
    was confirmed, when that run said KEEP too and nothing else (`refused`) speaks against it;
    else SAME, saying why."""
    if confirmation.status != KEEP or refused:
        why = refused or f"the confirming run said {confirmation.status}"
        return Verdict.from_dict({**verdict.to_dict(), "status": SAME, "reason": f"not confirmed: {why}"})
    reason = "confirmed in a fresh process on fresh seeds" + (
        f" ({speedup(confirmation.median):.2f}x there)" if confirmation.median is not None else "")
    if speedup(verdict.median) > BIG_GAIN:
        reason += f"; above {BIG_GAIN}x in one step: worth reading the diff"
    return Verdict.from_dict({**verdict.to_dict(), "reason": reason})


# The timing budget is counted in pairs first: a budget that ends before the minimum pair count
# would only buy a "too few pairs" SAME (seen: MLX on 2 busy cores, 15 of 20 pairs in its 20 s).
# It stretches up to this many times max_seconds to reach min_pairs; past that the pairs are too
# slow for the harness's budget, and the SAME says how long they would take.
MIN_PAIRS_STRETCH = 4.0


def should_stop(x, delta: float, *, elapsed_s: float, min_pairs: int, min_seconds: float,
                max_seconds: float, confidence: float = DEFAULT_CONFIDENCE) -> bool:
    """Stop timing when the CI is narrow (half-width < delta/2) after the minimums, or at the
    budget once min_pairs are there (MIN_PAIRS_STRETCH x the budget at most).

    The rule looks at the CI's width only, never at where the median lies, so that stopping
    early cannot favour an effect. A broken time stops at once: the verdict is FAIL anyway.
    """
    x = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(x)):
        return True
    if x.size < min_pairs:
        return elapsed_s >= max_seconds * MIN_PAIRS_STRETCH
    if elapsed_s >= max_seconds:
        return True
    if elapsed_s < min_seconds:
        return False
    return _half_width(x, confidence) < delta / 2


# A timing longer than this (or more pairs than this) is no practical advice: the noise is the problem.
REACHABLE_TIMING_S = 1800.0
REACHABLE_PAIRS = 5000


def pairs_to_decide(x, delta: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """About how many pairs would bring the CI's half-width under delta/2 (the stop rule's
    target), by the 1/sqrt(n) law from the pairs at hand; None with fewer than 3 of them."""
    x = np.asarray(x, dtype=float)
    if x.size < 3:
        return None
    half_width = _half_width(x, confidence)
    if half_width <= 0:
        return int(x.size)
    return max(int(x.size), math.ceil(x.size * (2 * half_width / delta) ** 2))


def undecided_advice(x, delta: float, *, seconds_per_pair: float | None, min_pairs: int,
                     confidence: float = DEFAULT_CONFIDENCE) -> str:
    """Why a SAME is a SAME, in numbers, and what would decide it: the smallest effect these
    pairs could have shown (MDE), and the pairs (and timing seconds) a decision would take.

    A CI narrower than the stop rule's target that still reaches inside +-delta is a decision:
    any change is smaller than delta. A wider one is not: it needs more pairs, a longer timing
    budget, or quieter cores (a lower noise floor lowers delta's share of the noise)."""
    x = np.asarray(x, dtype=float)
    pct = f"{confidence * 100:g}%"
    if x.size < 3:
        return (f"only {x.size} pair(s), too few for a CI: a longer timing budget (lab bench --time-cap) "
                "or quieter cores")
    median, lo, hi = median_ci(x, confidence)
    half_width = (hi - lo) / 2
    measured = (f"{pct} CI of the speedup {math.exp(-hi):.3f}-{math.exp(-lo):.3f}x over {x.size} pairs, "
                f"MDE {min_detectable_effect(x, confidence=confidence) * 100:.1f}%, delta {delta * 100:.1f}%")
    if x.size >= min_pairs and half_width < delta / 2:  # converged: the stop rule's answer
        faster_by_delta = math.log1p(-delta) if delta < 1 else -math.inf
        if faster_by_delta < lo and hi < math.log1p(delta):
            return f"{measured}: any change is smaller than delta"
        return f"{measured}: the change is close to delta ({(math.exp(-median) - 1) * 100:+.1f}%), too close to call"
    needed = max(pairs_to_decide(x, delta, confidence) or min_pairs, min_pairs)
    if needed * (seconds_per_pair or 0) > REACHABLE_TIMING_S or needed > REACHABLE_PAIRS:
        # The noise is far above delta: more pairs are no answer (seen: delta 0.5 % against an
        # MDE of 56 % on 2 cores shared with other jobs, 4.6 s a pair: ~160,000 pairs).
        return (f"{measured}; a decision at this delta would take about {needed} pairs: the machine's noise is "
                "far above delta. Quieter cores decide it (stop other jobs on this machine), or a delta that "
                "matches this machine's noise (lab noise, then --delta)")
    advice = f"{measured}; about {needed} pairs would decide it"
    if seconds_per_pair:
        seconds = needed * seconds_per_pair
        cap = max(10, math.ceil(seconds * 1.25 / 10) * 10)
        advice += (f" (~{seconds:.0f} s of timing at {seconds_per_pair:.2f} s a pair): a timing budget "
                   f"of {cap} s (lab bench --time-cap {cap}), or quieter cores")
    else:
        advice += ": a longer timing budget (lab bench --time-cap), or quieter cores"
    return advice


# --- from a runner's record to a verdict ----------------------------------------------------
def verdict_for(evaluation: Evaluation, delta: float, *, speed_of_light_seconds: float | None = None,
                confidence: float = DEFAULT_CONFIDENCE, min_pairs: int = DEFAULT_MIN_PAIRS) -> Verdict:
    """The whole decision on one evaluation record: every guard first, then `decide`."""
    ev = evaluation
    if ev.status:  # the runner already said FAIL, CRASH or TIMEOUT, with its reason
        return Verdict(ev.status, ev.reason, delta=delta)
    if ev.candidate_build is not None and not ev.candidate_build.ok:
        return Verdict(FAIL, "build failed: " + _tail(ev.candidate_build.error), delta=delta)
    if ev.incumbent_build is not None and not ev.incumbent_build.ok:
        return Verdict(CRASH, "the incumbent no longer builds: " + _tail(ev.incumbent_build.error), delta=delta)
    if ev.check is not None and not ev.check.passed:
        return Verdict(FAIL, "oracle: " + _tail("; ".join(ev.check.failures())), delta=delta)
    pairs = ev.pairs
    if not pairs:
        return Verdict(FAIL, "harness returned no samples", delta=delta)
    reason = _guard_failure(pairs, speed_of_light_seconds)
    if reason:
        return Verdict(FAIL, reason, delta=delta, pairs=len(pairs))

    dropped_blocks = {b.index for b in ev.telemetry if b.throttled}
    kept = log_ratios(pairs, dropped_blocks)
    dropped_pairs = len(pairs) - kept.size
    if kept.size == 0:
        return Verdict(SAME, "all blocks throttled", delta=delta, dropped_pairs=dropped_pairs)
    # The runner stops on a narrow CI or at its time budget and records neither; a CI still
    # wider than the stop rule's over all the pairs it saw means the budget ended it.
    everything = log_ratios(pairs)
    budget_exhausted = everything.size >= 2 and _half_width(everything, confidence) >= delta / 2
    verdict = decide(kept, delta, confidence=confidence, min_pairs=min_pairs, budget_exhausted=budget_exhausted)
    verdict.dropped_pairs = dropped_pairs
    if verdict.status == SAME:  # say why in numbers, and what would decide it
        per_pair = ev.timing_seconds / len(pairs) if ev.timing_seconds else None
        verdict.reason += "; " + undecided_advice(kept, delta, seconds_per_pair=per_pair, min_pairs=min_pairs,
                                                  confidence=confidence)
    if dropped_pairs:
        verdict.reason += f" ({dropped_pairs} pairs of throttled blocks dropped)"
    return verdict


def _guard_failure(pairs: Sequence[Pair], speed_of_light_seconds: float | None) -> str:
    """The first reason these pairs cannot be trusted, or "" when every guard passes."""
    samples = [s for p in pairs for s in (p.incumbent, p.candidate)]
    if any(not s.ok for s in samples):
        bad = [p.index for p in pairs if not (p.incumbent.ok and p.candidate.ok)]
        first = next(s for s in samples if not s.ok)
        side = "incumbent" if any(p.incumbent is first for p in pairs) else "candidate"
        return (f"a timed sample's own outputs were wrong (pairs {_few(bad)}; first, of the {side}: "
                f"{first.detail[:300] or 'no detail'})")
    if any(not _valid_seconds(s.seconds) for s in samples):
        bad = [p.index for p in pairs
               if not (_valid_seconds(p.incumbent.seconds) and _valid_seconds(p.candidate.seconds))]
        return f"a sample time is zero, negative or not a number (pairs {_few(bad)})"
    differing = _work_differences(pairs)
    if differing:
        return "did less/different work: " + "; ".join(differing)
    if speed_of_light_seconds:
        fastest = min(p.candidate.seconds for p in pairs)
        if fastest < speed_of_light_seconds:
            return (f"faster than physically possible: a candidate unit took {fastest:.3g} s, "
                    f"the floor is {speed_of_light_seconds:.3g} s")
    return _timer_disagreement(pairs)


def _work_differences(pairs: Sequence[Pair]) -> list[str]:
    """Counters whose candidate value differs from the incumbent's in the same pair (first seen)."""
    seen: dict[str, str] = {}
    for p in pairs:
        a, b = p.incumbent.work, p.candidate.work
        for name in sorted(set(a) | set(b)):
            if name not in seen and a.get(name) != b.get(name):
                seen[name] = f"{name} (candidate {b.get(name)!r}, incumbent {a.get(name)!r})"
    return list(seen.values())


def _timer_disagreement(pairs: Sequence[Pair]) -> str:
    """The rule documented at DEVICE_OVER_WALL and MIN_TIMER_COVERAGE; "" when the timers agree."""
    for p in pairs:
        for side, s in (("incumbent", p.incumbent), ("candidate", p.candidate)):
            wall = s.wall_seconds or 0.0
            if wall > 0 and s.seconds > wall * DEVICE_OVER_WALL + DEVICE_OVER_WALL_SLACK_S:
                return (f"timer disagreement: pair {p.index} {side} timed {s.seconds:.6g} s "
                        f"inside a wall-clock interval of {wall:.6g} s")
    candidate = _median_coverage([p.candidate for p in pairs])
    incumbent = _median_coverage([p.incumbent for p in pairs])
    if candidate is not None and incumbent is not None \
            and candidate < MIN_TIMER_COVERAGE and candidate < incumbent / 2:
        return (f"timer disagreement: the candidate's timed work covers {candidate:.0%} of its wall "
                f"time (incumbent {incumbent:.0%}); work may run off the timed stream")
    return ""


def _median_coverage(samples: Sequence[Sample]) -> float | None:
    """Median of seconds / wall_seconds over the samples that recorded a wall time."""
    ratios = [s.seconds / s.wall_seconds for s in samples if (s.wall_seconds or 0) > 0]
    return float(np.median(ratios)) if ratios else None


def _few(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _tail(text: str, limit: int = 1500) -> str:
    return text.strip()[-limit:]


# --- the A/A report -------------------------------------------------------------------------
def noise_report(aa_log_ratios, telemetry_blocks: Sequence[TelemetryBlock] = (),
                 confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """What an A/A run says about this machine, as plain numbers (fractions, not percent)."""
    x = np.asarray(aa_log_ratios, dtype=float)
    floor = noise_floor(x, confidence)
    median, lo, hi = median_ci(x, confidence)
    q1, q3 = np.percentile(x, [25, 75])
    return {
        "pairs": int(x.size),
        "median": median,
        "ci_low": lo,
        "ci_high": hi,
        "noise_floor": floor,
        "delta": delta_for(floor),
        "iqr": float(q3 - q1),
        "sd": float(np.std(x, ddof=1)) if x.size > 1 else 0.0,
        "mde": min_detectable_effect(x, confidence=confidence),
        "blocks": len(telemetry_blocks),
        "throttled_blocks": sum(1 for b in telemetry_blocks if b.throttled),
    }
