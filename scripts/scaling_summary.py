"""Summarise run folders of A/A and slowdown replays (scripts/aa_replay.py) for docs/scaling.md.

Per run: slots (GPU and CPUs), experiments per hour (lab.store.pace), the A/A noise floor the
run measured at its start, the 99% CI half-width of each A/A experiment (the noise floor the
loop actually saw), pairs and seconds per evaluation, and the verdicts by kind: A/A must never
be KEEP or WORSE, a slowdown must be WORSE.

    python3 scripts/scaling_summary.py RUN [RUN ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.store import RunFolder, experiments, pace  # noqa: E402


def kind_of(description: str) -> str:
    return "aa" if description.startswith("A/A") else "slow" if description.startswith("slowdown") else "other"


def summarise(path: Path) -> dict:
    folder = RunFolder.open(path)
    events = folder.events()
    done = experiments(events)
    workers = next((e for e in events if e["type"] == "workers"), None)
    noise = next((e for e in events if e["type"] == "noise_floor"), {})
    verdicts: dict[str, dict[str, int]] = {}
    half_widths, pairs, seconds = [], [], []
    for e in done:
        v = e.get("verdict", {})
        kind = kind_of(e.get("description", ""))
        verdicts.setdefault(kind, {}).setdefault(v.get("status", "?"), 0)
        verdicts[kind][v.get("status", "?")] += 1
        if v.get("ci_low") is not None:
            pairs.append(v.get("pairs", 0))
            if kind == "aa":
                half_widths.append((v["ci_high"] - v["ci_low"]) / 2)
        seconds.append(e.get("seconds", 0.0))
    return {
        "run": path.name,
        "slots": workers["slots"] if workers else [{"gpu": folder.meta.get("settings", {}).get("gpu_index", 0)}],
        "pace": pace(events),
        "noise_floor_at_start": noise.get("noise_floor"), "delta": noise.get("delta"),
        "aa_ci_half_width_median": statistics.median(half_widths) if half_widths else None,
        "aa_ci_half_width_max": max(half_widths) if half_widths else None,
        "pairs_median": statistics.median(pairs) if pairs else None,
        "evaluation_seconds_median": round(statistics.median(seconds), 1) if seconds else None,
        "verdicts": verdicts,
        "canaries": [e.get("verdict", {}).get("status") for e in events if e["type"] == "canary"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [summarise(p) for p in args.runs]
    for r in rows:
        gpus = ",".join(str(s.get("gpu")) for s in r["slots"])
        hw = r["aa_ci_half_width_median"]
        print(f"{r['run']}: GPUs {gpus}; {r['pace']['experiments']} experiments, {r['pace']['per_hour']} per hour; "
              f"noise floor at start {r['noise_floor_at_start']}; A/A CI half-width median "
              f"{'n/a' if hw is None else f'{hw * 100:.3f}%'}; pairs median {r['pairs_median']}; "
              f"verdicts {r['verdicts']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
