"""`lab report RUN`: a progress plot of a run as PNG, drawn from its events alone.

Every evaluated experiment's speedup against the incumbent it was timed against (with its 99%
CI), the running best (cumulative speedup over the baseline), and the noise band (+-delta):
a person sees at a glance which keeps cleared the noise and by how much.
"""

from __future__ import annotations

import math
from pathlib import Path

from .extras import require
from .store import RunFolder


def progress_points(events: list[dict]) -> dict:
    xs, speed, lo, hi, colors, best_x, best_y = [], [], [], [], [], [0], [1.0]
    delta = None
    colour = {"keep": "tab:green", "discard": "tab:gray", "fail": "tab:red", "crash": "tab:red"}
    for e in events:
        if e["type"] == "noise_floor":
            delta = e["delta"]
        elif e["type"] == "evaluated" and e["verdict"].get("median") is not None:
            v = e["verdict"]
            xs.append(e["number"])
            speed.append(math.exp(-v["median"]))
            lo.append(math.exp(-v["ci_high"]) if v.get("ci_high") is not None else speed[-1])
            hi.append(math.exp(-v["ci_low"]) if v.get("ci_low") is not None else speed[-1])
            colors.append(colour.get(e["status"], "tab:gray"))
        elif e["type"] == "kept":
            best_x.append(e["number"])
            best_y.append(e["cumulative_speedup"])
    return {"x": xs, "speedup": speed, "lo": lo, "hi": hi, "colors": colors,
            "best_x": best_x, "best_y": best_y, "delta": delta}


def write_report(run_path: Path, out: Path | None = None) -> Path:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    folder = RunFolder.open(run_path)
    pts = progress_points(folder.events())
    out = out or folder.path / "progress.png"
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    if pts["delta"]:
        ax.axhspan(1 - pts["delta"], 1 + pts["delta"], color="tab:blue", alpha=0.12,
                   label=f"noise band (delta {pts['delta'] * 100:.2f}%)")
    ax.axhline(1.0, color="black", lw=0.6)
    if pts["x"]:
        yerr = [[s - l for s, l in zip(pts["speedup"], pts["lo"])], [h - s for s, h in zip(pts["speedup"], pts["hi"])]]
        ax.errorbar(pts["x"], pts["speedup"], yerr=yerr, fmt="none", ecolor="lightgray", lw=1)
        ax.scatter(pts["x"], pts["speedup"], c=pts["colors"], s=22, zorder=3,
                   label="experiment vs its incumbent (99% CI)")
    last = max(pts["x"] + pts["best_x"] + [1])
    ax.step(pts["best_x"] + [last], pts["best_y"] + [pts["best_y"][-1]], where="post", color="tab:green",
            lw=2, label="best so far (vs baseline)")
    meta = folder.meta
    ax.set_title(f"{meta.get('id', '')}: {meta.get('harness', '')}")
    ax.set_xlabel("experiment")
    ax.set_ylabel("speedup (x)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
