"""`lab report RUN`: a progress plot of a run as PNG, drawn from its events alone.

Every timed experiment's speedup against the incumbent it was timed against (with its 99% CI),
coloured by verdict; experiments that never got a speed (FAIL, CRASH, TIMEOUT) and proposals the
lab rejected before running anything as marks along the bottom; the running best (cumulative
speedup over the baseline); the noise band (+-delta). The y axis is logarithmic (1.1x and 1/1.1x
lie equally far from 1) and clipped to the bulk of the points, so that one wild outlier does not
flatten the band: clipped points sit on the edge as triangles labelled with their value.
"""

from __future__ import annotations

import math
from pathlib import Path

from .extras import require
from .stats import speedup, speedup_ci
from .store import RunFolder

VERDICT_COLOURS = {"KEEP": "tab:green", "SAME": "tab:gray", "WORSE": "tab:orange",
                   "FAIL": "tab:red", "CRASH": "darkred", "TIMEOUT": "tab:purple"}
NICE_TICKS = (0.1, 0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 3, 5,
              10, 20, 50, 100)
UNTIMED_MARKS = {"FAIL": "x", "CRASH": "X", "TIMEOUT": "v"}


def progress_points(events: list[dict]) -> dict:
    """The plot's data: timed experiments, untimed ones, rejections, the best-so-far steps."""
    timed: dict[str, list] = {"x": [], "speedup": [], "lo": [], "hi": [], "verdict": []}
    untimed: list[tuple[int, str]] = []
    rejected: list[int] = []
    best_x, best_y = [0], [1.0]
    delta = None
    for e in events:
        if e["type"] == "noise_floor":
            delta = e["delta"]
        elif e["type"] == "evaluated":
            v = e.get("verdict", {})
            status = v.get("status", "?")
            if v.get("median") is None:
                untimed.append((e["number"], status))
                continue
            speed = speedup(v["median"])
            low, high = speedup_ci(v.get("ci_low"), v.get("ci_high")) or (speed, speed)
            timed["x"].append(e["number"])
            timed["speedup"].append(speed)
            timed["lo"].append(low)
            timed["hi"].append(high)
            timed["verdict"].append(status)
        elif e["type"] == "rejected":
            rejected.append(e.get("number", 0))
        elif e["type"] == "kept":
            best_x.append(e["number"])
            best_y.append(e["cumulative_speedup"])
    return {**timed, "untimed": untimed, "rejected": rejected, "best_x": best_x, "best_y": best_y,
            "delta": delta}


def y_limits(values: list[float], delta: float | None) -> tuple[float, float]:
    """Bounds that hold the noise band and the bulk of the points: Tukey's fences (quartiles
    +- 1.5 IQR) on log speedup; points beyond them are clipped to the edge and labelled."""
    band = math.log1p(delta or 0.01) * 2
    logs = sorted(math.log(v) for v in values if v > 0)
    if not logs:
        return math.exp(-band), math.exp(band)
    q1, q3 = _quantile(logs, 0.25), _quantile(logs, 0.75)
    fence = max(1.5 * (q3 - q1), 0.02)
    low = max(logs[0], q1 - fence)
    high = min(logs[-1], q3 + fence)
    pad = 0.15 * max(high - low, 0.02)
    return math.exp(min(low - pad, -band)), math.exp(max(high + pad, band))


def y_ticks(bottom: float, top: float) -> list[float]:
    """Round speedups within the limits, no two closer than a ninth of the axis (always 1x)."""
    gap = math.log(top / bottom) / 9
    ticks = [1.0]
    for side in (sorted(t for t in NICE_TICKS if 1 < t <= top),
                 sorted((t for t in NICE_TICKS if bottom <= t < 1), reverse=True)):
        last = 1.0
        for t in side:
            if abs(math.log(t / last)) >= gap:
                ticks.append(t)
                last = t
    return sorted(ticks)


def _quantile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    i = int(position)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (position - i)


def write_report(run_path: Path, out: Path | None = None) -> Path:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    folder = RunFolder.open(run_path)
    pts = progress_points(folder.events())
    out = out or folder.path / "progress.png"
    fig, ax = plt.subplots(figsize=(10.5, 4.8), dpi=120)
    meta = folder.meta
    ax.set_title(f"{meta.get('id', '')}: {meta.get('harness', '')}")
    ax.set_xlabel("experiment")
    ax.set_ylabel("speedup vs incumbent (x, log scale)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    numbers = pts["x"] + [n for n, _ in pts["untimed"]] + pts["rejected"]
    if not numbers:
        ax.text(0.5, 0.5, "no experiments yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=14, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out

    ax.set_yscale("log")
    bottom, top = y_limits(pts["speedup"] + pts["best_y"], pts["delta"])
    if pts["delta"]:
        ax.axhspan(1 / (1 + pts["delta"]), 1 + pts["delta"], color="tab:blue", alpha=0.12,
                   label=f"noise band (delta {pts['delta'] * 100:.2f}%)")
    ax.axhline(1.0, color="black", lw=0.6)
    _draw_timed(ax, pts, bottom, top)
    mark_y = bottom * (top / bottom) ** 0.04  # a row just above the bottom edge
    for status, marker in UNTIMED_MARKS.items():
        xs = [n for n, s in pts["untimed"] if s == status]
        if xs:
            ax.scatter(xs, [mark_y] * len(xs), marker=marker, color=VERDICT_COLOURS[status], s=36,
                       zorder=3, label=f"{status} (no timing)")
    if pts["rejected"]:
        ax.scatter(pts["rejected"], [mark_y] * len(pts["rejected"]), marker="|", color="black", s=60,
                   zorder=3, label="rejected before running")
    last = max(numbers + pts["best_x"])
    ax.step(pts["best_x"] + [last], pts["best_y"] + [pts["best_y"][-1]], where="post",
            color="tab:green", lw=2, alpha=0.7, label="best so far (vs baseline)")
    ax.set_ylim(bottom, top)
    ax.set_xlim(0.5, last + 0.5)
    ax.yaxis.set_major_locator(FixedLocator(y_ticks(bottom, top)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="y", color="0.9", lw=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _draw_timed(ax, pts: dict, bottom: float, top: float) -> None:
    """Each timed experiment with its CI, coloured by verdict; outliers clipped to the edge."""
    for status, colour in VERDICT_COLOURS.items():
        idx = [i for i, v in enumerate(pts["verdict"]) if v == status]
        if not idx:
            continue
        inside = [i for i in idx if bottom <= pts["speedup"][i] <= top]
        xs = [pts["x"][i] for i in inside]
        ys = [pts["speedup"][i] for i in inside]
        lo = [max(pts["lo"][i], bottom) for i in inside]
        hi = [min(pts["hi"][i], top) for i in inside]
        if inside:
            ax.errorbar(xs, ys, yerr=[[y - low for y, low in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]],
                        fmt="o", color=colour, ecolor=colour, elinewidth=1, alpha=0.9, ms=5, zorder=3,
                        label=f"{status} (99% CI)")
        for i in idx:
            y = pts["speedup"][i]
            if bottom <= y <= top:
                continue
            edge, marker, va = (top, "^", "top") if y > top else (bottom, "v", "bottom")
            ax.scatter([pts["x"][i]], [edge], marker=marker, color=colour, s=50, zorder=4, clip_on=False)
            ax.annotate(f"{y:.3g}x", (pts["x"][i], edge), textcoords="offset points",
                        xytext=(6, -10 if y > top else 4), fontsize=7, color=colour, va=va)
