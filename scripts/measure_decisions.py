"""How often does the lab's decision rule get it wrong on a real harness? (issue: honest measurement)

    python scripts/measure_decisions.py HARNESS --slower PATCH [--aa 50] [--slow 20] --json OUT

Loads the baseline twice (two modules: an honest A/A) and the baseline with PATCH applied (a
change that adds a known amount of work), then runs many evaluations exactly as the runner times
them (lab.runner.time_pairs: interleaved pairs, random order, the adaptive stop rule) and
decides each with lab.stats.verdict_for:

- the A/A noise floor and delta from one calibration evaluation;
- N A/A evaluations: every KEEP (and WORSE) is a false decision;
- M evaluations of the slowed candidate: how many say WORSE.

The evaluations share one process and one build (no oracle between them): this measures the
timing and the statistics, which is what decides; the oracle is tested elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import stats  # noqa: E402
from lab.harness import load, stage_editable  # noqa: E402
from lab.records import Build, Evaluation  # noqa: E402
from lab.runner import _telemetry_for, build_cached, default_cache, time_pairs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("harness")
    ap.add_argument("--slower", required=True, help="patch (relative to the harness folder) that adds work")
    ap.add_argument("--aa", type=int, default=50)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=540.0, help="stop starting evaluations after this many s")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    started = time.monotonic()
    h = load(a.harness)
    tmp = Path(tempfile.mkdtemp())
    stage_editable(h, h.root, tmp / "base")
    shutil.copytree(tmp / "base", tmp / "slow")
    subprocess.run(["git", "apply", str(h.root / a.slower)], cwd=tmp / "slow", check=True)
    base = build_cached(h, tmp / "base", default_cache())
    slow = build_cached(h, tmp / "slow", default_cache())
    assert base.ok and slow.ok, (base.error, slow.error)
    base_again = Build.from_dict(base.to_dict())  # a second module of the same build: honest A/A
    telemetry = _telemetry_for(h, 0)
    rng = random.SystemRandom()

    def evaluation(candidate: Build, delta: float) -> tuple[Evaluation, object]:
        pairs, blocks, secs = time_pairs(h, base, candidate, seed=rng.getrandbits(63), delta=delta,
                                         min_pairs=h.min_pairs, min_seconds=h.min_timing_seconds,
                                         max_seconds=h.max_timing_seconds, telemetry=telemetry)
        ev = Evaluation(harness=h.name, pairs=pairs, telemetry=blocks, timing_seconds=secs, work=h.workload())
        return ev, stats.verdict_for(ev, delta, speed_of_light_seconds=h.speed_of_light_seconds)

    calib, _ = evaluation(base_again, stats.MIN_DELTA)
    ratios = stats.log_ratios(calib.pairs)
    noise = stats.noise_floor(ratios)
    delta = stats.delta_for(noise)
    report = {"harness": h.name, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "noise": stats.noise_report(ratios, calib.telemetry), "delta": delta,
              "aa": [], "slow": [], "unit_seconds_median": sorted(p.incumbent.seconds for p in calib.pairs)[len(calib.pairs) // 2]}
    plan = [("aa", base_again)] * a.aa + [("slow", slow)] * a.slow
    random.Random(0).shuffle(plan)  # interleave the two kinds: drift hits both alike
    for kind, cand in plan:
        if time.monotonic() - started > a.deadline:
            report["stopped_early"] = f"deadline of {a.deadline:.0f} s reached"
            break
        ev, v = evaluation(cand, delta)
        report[kind].append({"status": v.status, "median": v.median, "ci_low": v.ci_low, "ci_high": v.ci_high,
                             "pairs": v.pairs, "dropped": v.dropped_pairs, "seconds": ev.timing_seconds})
        print(f"{kind:4s} {v.status:5s} speedup {v.speedup or float('nan'):.4f} pairs {v.pairs} {v.reason}",
              flush=True)
    count = lambda rows, s: sum(1 for r in rows if r["status"] == s)  # noqa: E731
    report["summary"] = {
        "aa_runs": len(report["aa"]), "aa_keep": count(report["aa"], "KEEP"), "aa_worse": count(report["aa"], "WORSE"),
        "slow_runs": len(report["slow"]), "slow_detected_worse": count(report["slow"], "WORSE"),
        "slow_median_slowdown": (sorted(-r["median"] for r in report["slow"])[len(report["slow"]) // 2]
                                 if report["slow"] else None),
        "noise_floor": noise, "delta": delta, "mde": report["noise"].get("mde"),
        "seconds": time.monotonic() - started,
    }
    try:
        from lab.system.fingerprint import collect

        report["fingerprint"] = collect()
    except Exception as exc:  # the numbers stand without it
        report["fingerprint"] = {"error": str(exc)}
    Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
