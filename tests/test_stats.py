"""The decision rule on synthetic timings with known effects, and every guard of verdict_for."""

import json
import math

import numpy as np
import pytest

from lab import stats
from lab.errors import HarnessContractError
from lab.records import (CRASH, FAIL, KEEP, SAME, TIMEOUT, WORSE, Build, Check, CheckItem, Evaluation, Pair,
                         Sample, TelemetryBlock)

UNIT_S = 0.01  # simulated seconds of one sample


def sample(seconds):
    """A unit of 10 steps whose host clock agrees with its own."""
    return Sample(seconds=seconds, value=1 / seconds if seconds else 0.0, wall_seconds=seconds, work={"steps": 10})


def pair(i, t_incumbent, t_candidate, block=0):
    return Pair(index=i, order="AB" if i % 2 else "BA", block=block,
                incumbent=sample(t_incumbent), candidate=sample(t_candidate))


def simulate(rng, n, effect=0.0, sigma=0.01, outliers=0.05, start=0):
    """n pairs: lognormal noise per sample, a drift common to both sides of a pair (it cancels in
    the ratio, as the interleaving intends), and occasional 1.5x host hiccups on either side."""
    drift = np.exp(rng.normal(0, 0.05, n))
    noise = rng.normal(0, sigma, (2, n))
    hiccups = np.where(rng.random((2, n)) < outliers, math.log(1.5), 0.0)
    t_a = UNIT_S * drift * np.exp(noise[0] + hiccups[0])
    t_b = UNIT_S * drift * np.exp(effect + noise[1] + hiccups[1])
    return [pair(i, float(a), float(b), block=i // 5) for i, a, b in zip(range(start, start + n), t_a, t_b)]


def evaluation(pairs, **kw):
    return Evaluation(harness="synthetic", pairs=pairs, **kw)


def measured_delta(rng, sigma, n=40):
    """What the lab does once per machine: an A/A run, its noise floor, the threshold from it."""
    return stats.delta_for(stats.noise_floor(stats.log_ratios(simulate(rng, n, sigma=sigma))))


def run_like_the_runner(rng, effect, sigma, delta, *, min_pairs=20, min_seconds=0.4, max_seconds=6.0):
    """Blocks of 5 pairs until should_stop, as lab/runner.py does; elapsed time is simulated."""
    pairs = []
    while True:
        pairs += simulate(rng, 5, effect, sigma, start=len(pairs))
        elapsed = sum(p.incumbent.seconds + p.candidate.seconds for p in pairs)
        if stats.should_stop(stats.log_ratios(pairs), delta, elapsed_s=elapsed, min_pairs=min_pairs,
                             min_seconds=min_seconds, max_seconds=max_seconds):
            return stats.verdict_for(evaluation(pairs), delta, min_pairs=min_pairs)


# --- numbers --------------------------------------------------------------------------------
def test_log_ratios_skip_dropped_blocks_and_mark_broken_times():
    pairs = [pair(0, 1.0, 0.5, block=0), pair(1, 1.0, 2.0, block=1), pair(2, 1.0, 0.0, block=2),
             pair(3, -1.0, 1.0, block=2), pair(4, None, 1.0, block=3)]
    x = stats.log_ratios(pairs)
    assert x[:2] == pytest.approx([math.log(0.5), math.log(2.0)])
    assert np.isnan(x[2:]).all()
    assert stats.log_ratios(pairs, {0, 2, 3}) == pytest.approx([math.log(2.0)])


def test_median_ci_brackets_the_median_and_is_deterministic():
    x = np.random.default_rng(1).normal(0.1, 0.02, 200)
    median, lo, hi = stats.median_ci(x)
    assert lo < median < hi
    assert lo < 0.1 < hi
    assert stats.median_ci(x) == (median, lo, hi)  # the runner and the lab agree on the interval
    wider = stats.median_ci(x[:20])
    assert wider[2] - wider[1] > hi - lo
    with pytest.raises(ValueError):
        stats.median_ci([])


def test_noise_floor_and_delta():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 0.01, 100)
    median, lo, hi = stats.median_ci(x)
    assert stats.noise_floor(x) == pytest.approx(math.expm1(abs(median) + (hi - lo) / 2))
    assert stats.noise_floor(np.zeros(30)) == 0.0
    assert stats.delta_for(0.0) == stats.MIN_DELTA
    assert stats.delta_for(0.01) == 0.02
    with pytest.raises(HarnessContractError):
        stats.noise_floor([0.0, math.nan, 0.1])


def test_min_detectable_effect_shrinks_as_one_over_sqrt_n():
    x = np.random.default_rng(3).normal(0, 0.02, 100)
    now = stats.min_detectable_effect(x)
    at_4n = stats.min_detectable_effect(x, n_pairs=400)
    assert now > 0
    assert math.log1p(at_4n) == pytest.approx(math.log1p(now) / 2)


# --- decide and should_stop -----------------------------------------------------------------
def test_decide_keep_worse_same():
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 0.005, 60)
    keep = stats.decide(math.log(0.9) + noise, 0.02)
    assert keep.status == KEEP and keep.needs_confirmation and keep.speedup == pytest.approx(1 / 0.9, rel=0.01)
    assert keep.ci_high <= math.log(1 - 0.02) and keep.pairs == 60
    worse = stats.decide(math.log(1.1) + noise, 0.02)
    assert worse.status == WORSE and not worse.needs_confirmation
    same = stats.decide(math.log(0.99) + noise, 0.02)  # faster, but not by delta for all of the CI
    assert same.status == SAME
    straddling = stats.decide(math.log(0.97) + rng.normal(0, 0.03, 60), 0.02)
    assert straddling.median < math.log(1 - 0.02) < straddling.ci_high  # the median alone would keep
    assert straddling.status == SAME


def test_a_big_gain_asks_for_a_diff_review():
    x = math.log(1 / 1.6) + np.random.default_rng(5).normal(0, 0.005, 40)
    verdict = stats.decide(x, 0.01)
    assert verdict.status == KEEP and verdict.needs_confirmation
    assert "review the diff" in verdict.reason and "1.3" in verdict.reason
    modest = math.log(1 / 1.1) + np.random.default_rng(5).normal(0, 0.005, 40)
    assert "review" not in stats.decide(modest, 0.01).reason


def test_decide_refuses_too_few_pairs_and_broken_times():
    few = stats.decide(np.full(19, math.log(0.5)), 0.01)
    assert few.status == SAME and "too few pairs" in few.reason
    for bad in (math.nan, math.inf, -math.inf):
        x = np.full(30, math.log(0.5))
        x[7] = bad
        assert stats.decide(x, 0.01).status == FAIL


def test_budget_end_with_a_wide_ci_is_same_never_keep():
    rng = np.random.default_rng(6)
    x = math.log(0.96) + rng.normal(0, 0.02, 30)  # faster by more than delta, but a wide CI
    delta = 0.01
    assert stats.decide(x, delta).status == KEEP
    verdict = stats.decide(x, delta, budget_exhausted=True)
    assert verdict.status == SAME and verdict.reason == "budget ended before the CI was narrow enough"
    assert stats.decide(-x, delta, budget_exhausted=True).status == SAME
    # Not converged, yet decisive even for a CI twice as wide: a 5x gain is not discarded.
    far = math.log(0.2) + rng.normal(0, 0.1, 30)
    assert stats.decide(far, delta, budget_exhausted=True).status == KEEP
    # Converged (half-width under delta/2): the budget's end changes nothing.
    narrow = math.log(0.97) + rng.normal(0, 0.001, 30)
    assert stats.decide(narrow, delta, budget_exhausted=True).status == KEEP


def test_should_stop():
    rng = np.random.default_rng(7)
    narrow, wide = rng.normal(0, 0.001, 40), rng.normal(0, 0.1, 40)
    kw = dict(min_pairs=20, min_seconds=2.0, max_seconds=30.0)
    assert stats.should_stop(narrow, 0.01, elapsed_s=3.0, **kw)
    assert not stats.should_stop(narrow[:10], 0.01, elapsed_s=3.0, **kw)  # too few pairs
    assert not stats.should_stop(narrow, 0.01, elapsed_s=1.0, **kw)  # too little time
    assert not stats.should_stop(wide, 0.01, elapsed_s=3.0, **kw)
    assert stats.should_stop(wide, 0.01, elapsed_s=30.0, **kw)  # the budget
    broken = narrow.copy()
    broken[3] = math.nan
    assert stats.should_stop(broken, 0.01, elapsed_s=0.1, **kw)


# --- the rule on many simulated evaluations -------------------------------------------------
def test_no_false_keep_under_the_null():
    """200 A/A evaluations of 20-60 pairs on 10 simulated machines, delta from each machine's own
    A/A run as the protocol prescribes: not one KEEP, not one WORSE."""
    rng = np.random.default_rng(8)
    verdicts = []
    for machine in range(10):
        sigma = [0.002, 0.01, 0.03][machine % 3]
        delta = measured_delta(rng, sigma)
        for _ in range(20):
            pairs = simulate(rng, int(rng.integers(20, 61)), sigma=sigma)
            verdicts.append(stats.verdict_for(evaluation(pairs), delta).status)
    assert len(verdicts) == 200
    assert verdicts.count(KEEP) == 0 and verdicts.count(WORSE) == 0


@pytest.mark.parametrize("direction, expected", [(-1, KEEP), (+1, WORSE)])
def test_an_effect_of_twice_delta_is_detected(direction, expected):
    """The whole protocol, stop rule included, finds an effect of 2 x delta at least 95% of the time."""
    rng = np.random.default_rng(9 + direction)
    sigma = 0.01
    delta = measured_delta(rng, sigma)
    effect = math.log(1 + direction * 2 * delta)
    statuses = [run_like_the_runner(rng, effect, sigma, delta).status for _ in range(60)]
    assert statuses.count(expected) >= 0.95 * len(statuses)


def test_the_runner_loop_under_the_null_says_same():
    rng = np.random.default_rng(11)
    delta = measured_delta(rng, 0.01)
    statuses = [run_like_the_runner(rng, 0.0, 0.01, delta).status for _ in range(40)]
    assert statuses == [SAME] * 40


# --- verdict_for: every guard ---------------------------------------------------------------
def good_pairs(n=30, speedup=1.0):
    rng = np.random.default_rng(12)
    return [pair(i, UNIT_S * (1 + rng.normal(0, 1e-3)), UNIT_S / speedup * (1 + rng.normal(0, 1e-3)), block=i // 5)
            for i in range(n)]


def test_verdict_for_passes_the_runner_status_through():
    for status in (FAIL, CRASH, TIMEOUT):
        verdict = stats.verdict_for(evaluation([], status=status, reason="why"), 0.01)
        assert (verdict.status, verdict.reason) == (status, "why")


def test_verdict_for_build_and_check_failures():
    broken = Build(ok=False, source_hash="x", error="work.c:3: error: expected ';'")
    verdict = stats.verdict_for(evaluation(good_pairs(), candidate_build=broken), 0.01)
    assert verdict.status == FAIL and "expected ';'" in verdict.reason
    verdict = stats.verdict_for(evaluation(good_pairs(), incumbent_build=broken), 0.01)
    assert verdict.status == CRASH and "incumbent" in verdict.reason
    check = Check(passed=False, items=[CheckItem("seed_1", True), CheckItem("seed_2", False, detail="got 3, want 4")])
    verdict = stats.verdict_for(evaluation(good_pairs(), check=check), 0.01)
    assert verdict.status == FAIL and "seed_2: got 3, want 4" in verdict.reason and "seed_1" not in verdict.reason


def test_verdict_for_no_samples():
    verdict = stats.verdict_for(evaluation([]), 0.01)
    assert (verdict.status, verdict.reason) == (FAIL, "harness returned no samples")


def test_verdict_for_wrong_timed_outputs():
    pairs = good_pairs()
    pairs[4].candidate.ok = False
    verdict = stats.verdict_for(evaluation(pairs), 0.01)
    assert verdict.status == FAIL and "own outputs were wrong" in verdict.reason and "4" in verdict.reason


def test_verdict_for_less_work():
    pairs = good_pairs(speedup=2.0)
    for p in pairs:
        p.candidate.work = {"steps": 5}
    verdict = stats.verdict_for(evaluation(pairs), 0.01)
    assert verdict.status == FAIL and "did less/different work" in verdict.reason and "steps" in verdict.reason


def test_verdict_for_faster_than_light():
    pairs = good_pairs(speedup=2.0)
    assert stats.verdict_for(evaluation(pairs), 0.01, speed_of_light_seconds=UNIT_S / 4).status == KEEP
    verdict = stats.verdict_for(evaluation(pairs), 0.01, speed_of_light_seconds=UNIT_S * 0.6)
    assert verdict.status == FAIL and "faster than physically possible" in verdict.reason


def test_verdict_for_broken_time_after_a_json_round_trip():
    pairs = good_pairs()
    pairs[2].candidate.seconds = math.nan
    loaded = Evaluation.from_dict(json.loads(evaluation(pairs).to_json()))
    assert loaded.pairs[2].candidate.seconds is None
    verdict = stats.verdict_for(loaded, 0.01, speed_of_light_seconds=UNIT_S / 100)
    assert verdict.status == FAIL and "not a number" in verdict.reason


def test_timer_disagreement_device_longer_than_wall():
    pairs = good_pairs()
    pairs[3].incumbent.wall_seconds = UNIT_S / 2  # the device "took" 10 ms inside 5 ms of wall time
    assert "timer disagreement" in stats.verdict_for(evaluation(pairs), 0.01).reason
    pairs[3].incumbent.wall_seconds = 0.0  # not recorded: nothing to compare
    assert stats.verdict_for(evaluation(pairs), 0.01).status == SAME


def test_timer_disagreement_work_off_the_timer():
    pairs = good_pairs(speedup=10.0)
    for p in pairs:  # the timed stream got 10x faster; the wall clock says no
        p.candidate.wall_seconds = p.incumbent.wall_seconds
    verdict = stats.verdict_for(evaluation(pairs), 0.01)
    assert verdict.status == FAIL and "timer disagreement" in verdict.reason


def test_timer_rule_spares_host_heavy_units_and_single_hiccups():
    pairs = good_pairs(speedup=1.1)
    for p in pairs:  # a launch-bound harness: device time is a tenth of wall on both sides
        p.incumbent.wall_seconds = p.incumbent.seconds * 10
        p.candidate.wall_seconds = p.candidate.seconds * 10
    pairs[5].candidate.wall_seconds = 1.0  # one host hiccup of a second
    assert stats.verdict_for(evaluation(pairs), 0.01).status == KEEP


def test_throttled_blocks_are_dropped_and_counted():
    pairs = good_pairs(n=40, speedup=1.1)
    for p in pairs[10:15]:  # block 2 ran hot and its candidate looks 2x faster
        p.candidate.seconds = p.candidate.wall_seconds = p.incumbent.seconds / 2
    telemetry = [TelemetryBlock(index=i, throttled=(i == 2), reasons=["hw_thermal"] if i == 2 else [])
                 for i in range(8)]
    verdict = stats.verdict_for(evaluation(pairs, telemetry=telemetry), 0.01)
    assert verdict.status == KEEP and verdict.dropped_pairs == 5 and verdict.pairs == 35
    assert verdict.speedup == pytest.approx(1.1, rel=0.01)
    hot = [TelemetryBlock(index=i, throttled=True) for i in range(8)]
    verdict = stats.verdict_for(evaluation(pairs, telemetry=hot), 0.01)
    assert (verdict.status, verdict.reason, verdict.dropped_pairs) == (SAME, "all blocks throttled", 40)


def test_verdict_for_infers_the_budget_end_from_a_wide_ci():
    rng = np.random.default_rng(13)
    pairs = [pair(i, 1.0, float(0.97 * math.exp(rng.normal(0, 0.02))), block=i // 5) for i in range(30)]
    verdict = stats.verdict_for(evaluation(pairs), 0.01)
    assert verdict.status == SAME and "budget" in verdict.reason


def test_noise_report_is_plain_json():
    rng = np.random.default_rng(14)
    x = stats.log_ratios(simulate(rng, 50))
    blocks = [TelemetryBlock(index=0), TelemetryBlock(index=1, throttled=True)]
    report = stats.noise_report(x, blocks)
    assert json.loads(json.dumps(report)) == report
    assert report["pairs"] == 50 and report["blocks"] == 2 and report["throttled_blocks"] == 1
    assert report["noise_floor"] == stats.noise_floor(x)
    assert report["delta"] == stats.delta_for(report["noise_floor"])
    assert 0 < report["iqr"] and 0 < report["sd"] and 0 < report["mde"]


def test_a_confirmed_keep_says_so_and_an_unconfirmed_one_is_same():
    from lab.stats import BIG_GAIN, confirm, decide

    keep = decide(np.full(40, -0.7) + np.linspace(-0.01, 0.01, 40), 0.01)
    assert keep.status == "KEEP" and "confirm in a fresh process" in keep.reason and math.exp(0.7) > BIG_GAIN
    again = decide(np.full(40, -0.65) + np.linspace(-0.01, 0.01, 40), 0.01)
    confirmed = confirm(keep, again)
    assert confirmed.status == "KEEP" and confirmed.median == keep.median
    assert confirmed.reason.startswith("confirmed in a fresh process on fresh seeds (1.92x there)")
    assert "review the diff and confirm" not in confirmed.reason and "; confirm" not in confirmed.reason
    assert confirm(keep, decide(np.zeros(40) + np.linspace(-0.01, 0.01, 40), 0.01)).reason == \
        "not confirmed: the confirming run said SAME"
    refused = confirm(keep, again, "the confirming run ran on another machine (cpu.model)")
    assert (refused.status, refused.reason) == ("SAME", "not confirmed: the confirming run ran on another machine (cpu.model)")
