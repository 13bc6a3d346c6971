"""Where does the per-pair spread of wavegru's A/A timing come from? Runs the runner's own
`time_pairs` (the pristine kernel against itself) under variants that switch off one part of the
sample path each, and prints the per-pair standard deviation of log ratios, the 99% CI half-width
and the median sample time of each. A diagnostic for the GPU machine, never a verdict.

    python3 scripts/wavegru/noise_probe.py --seconds 15 [--variants as_is,fixed_offset,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lab import runner, stats  # noqa: E402
from lab.harness import load  # noqa: E402


def _device_module(harness):
    import importlib

    return importlib.import_module(type(harness).__module__.rsplit(".", 1)[0] + ".device")


@contextlib.contextmanager
def variant(harness, name: str):
    dev = _device_module(harness)
    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if name == "fixed_offset":  # every arena at offset 0: no placement drawn per launch
        class _Fixed:
            @staticmethod
            def randrange(*a, **k):
                return 0

            getrandbits = staticmethod(dev.random.getrandbits)
        patch(dev, "random", _Fixed)
    elif name == "no_post_checks":  # no guards, no pristine compare, no scrub after a launch
        patch(dev.Arena, "guard_problems", lambda self: [])
        patch(dev.Arena, "scrub", lambda self: None)
        patch(dev.DeviceWeights, "problems", lambda self: [])
    elif name == "no_rotate":
        patch(type(harness), "rotate_placement", False)
    elif name != "as_is":
        raise SystemExit(f"unknown variant {name}")
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--variants", default="as_is,fixed_offset,no_post_checks,no_rotate,as_is")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    harness = load(ROOT / "harnesses" / "wavegru")
    out = Path(tempfile.mkdtemp())
    t0 = time.monotonic()
    build = harness.build(harness.root, out / "build")
    assert build.ok, build.error
    print(f"build {time.monotonic() - t0:.1f} s", flush=True)
    results = []
    for i, name in enumerate(args.variants.split(",")):
        with variant(harness, name):
            t0 = time.monotonic()
            pairs, _, timing_s = runner.time_pairs(harness, build, build, seed=1000 + i, delta=0.005,
                                                   min_pairs=10_000, min_seconds=0.0,
                                                   max_seconds=args.seconds)
        ok = all(p.incumbent.ok and p.candidate.ok for p in pairs)
        x = stats.log_ratios(pairs)
        secs = [s.seconds for p in pairs for s in (p.incumbent, p.candidate)]
        row = {"variant": name, "pairs": len(pairs), "all_ok": ok, "seconds": round(time.monotonic() - t0, 1),
               "sd_pct": round(float(np.std(x, ddof=1)) * 100, 3),
               "median_pct": round(float(np.median(x)) * 100, 3),
               "half_width_pct": round(stats._half_width(x, stats.DEFAULT_CONFIDENCE) * 100, 3),
               "sample_ms_median": round(float(np.median(secs)) * 1e3, 3),
               "sample_ms_p10_p90": [round(float(np.percentile(secs, q)) * 1e3, 3) for q in (10, 90)],
               "pair_s": round(timing_s / max(1, len(pairs)), 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
