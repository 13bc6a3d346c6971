"""`lab report`: the progress plot drawn from a run's events (issue 18: verdict colours,
rejections as marks, integer ticks, outliers clipped, an empty run says so)."""

import math

import pytest

from lab.report import progress_points, write_report, y_limits
from lab.store import RunFolder

pytest.importorskip("matplotlib", reason="the [plot] extra (matplotlib) is not installed")


def _evaluated(folder, number, status, speed=None, half_width=0.01):
    verdict = {"status": status, "median": None, "ci_low": None, "ci_high": None, "pairs": 0}
    if speed is not None:
        m = -math.log(speed)
        verdict.update(median=m, ci_low=m - half_width, ci_high=m + half_width, pairs=30)
    folder.append("evaluated", number=number, status="keep" if status == "KEEP" else "discard",
                  verdict=verdict, description=f"idea {number}")


def small_run(tmp_path):
    folder = RunFolder.create(tmp_path, "cdot-test-run", {"id": "cdot-test-run", "harness": "cdot"})
    folder.append("noise_floor", noise_floor=0.004, delta=0.008, pairs=20)
    _evaluated(folder, 1, "KEEP", 1.12)
    folder.append("kept", number=1, commit="abc", speedup=1.12, cumulative_speedup=1.12)
    _evaluated(folder, 2, "SAME", 1.002)
    folder.append("rejected", number=3, reason="outside the editable surface", description="x")
    _evaluated(folder, 4, "FAIL")
    _evaluated(folder, 5, "WORSE", 0.09)  # a wild outlier: clipped, not flattening the band
    _evaluated(folder, 6, "WORSE", 0.97)
    _evaluated(folder, 7, "TIMEOUT")
    return folder


def test_points_separate_timed_untimed_and_rejected(tmp_path):
    pts = progress_points(small_run(tmp_path).events())
    assert pts["x"] == [1, 2, 5, 6] and pts["verdict"] == ["KEEP", "SAME", "WORSE", "WORSE"]
    assert pts["untimed"] == [(4, "FAIL"), (7, "TIMEOUT")] and pts["rejected"] == [3]
    assert pts["best_y"] == [1.0, 1.12]


def test_outlier_is_clipped_and_band_stays_visible(tmp_path):
    pts = progress_points(small_run(tmp_path).events())
    bottom, top = y_limits(pts["speedup"] + pts["best_y"], pts["delta"])
    assert bottom > 0.09 and top >= 1.12
    assert bottom < 1 / 1.008 and top > 1.008


def test_png_written_for_a_run_and_for_an_empty_one(tmp_path):
    out = write_report(small_run(tmp_path).path, tmp_path / "run.png")
    assert out.stat().st_size > 10_000
    empty = RunFolder.create(tmp_path, "cdot-empty", {"id": "cdot-empty", "harness": "cdot"})
    out = write_report(empty.path, tmp_path / "empty.png")
    assert out.stat().st_size > 1_000
