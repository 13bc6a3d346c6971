"""Numbers as a person reads them: speedups in x, fractions in %, rates and durations rounded to
what they mean. One place for these, so that the live view, the commands and the verdicts agree
(a verdict's CI is measured to about a tenth of a percent: more digits are noise)."""

from __future__ import annotations

import math

from . import records


def speedup(x: float | None) -> str:
    """2.0 -> '2.00x'; near 1 one more digit, since a 0.5 % delta must stay visible (1.004x)."""
    if x is None or not math.isfinite(x):
        return "?"
    return f"{x:.3f}x" if 0.9 < x < 1.1 else f"{x:.2f}x"


def percent(fraction: float | None, signed: bool = False) -> str:
    """0.0097 -> '0.97%'; two significant digits below 10 %, whole percent above."""
    if fraction is None or not math.isfinite(fraction):
        return "?"
    value = fraction * 100
    digits = 2 if abs(value) < 1 else 1 if abs(value) < 10 else 0
    return f"{value:+.{digits}f}%" if signed else f"{value:.{digits}f}%"


def number(value: float | None, unit: str = "") -> str:
    """A measured quantity to four significant digits, thousands grouped: 4423.158 -> '4,423'."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "?"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}".strip()


def duration(seconds: float | None) -> str:
    """90 -> '1 min 30 s', 5400 -> '1.50 h', 4.2 -> '4.2 s'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    return f"{seconds / 3600:.2f} h"


def ci_of(verdict: dict) -> tuple[float, float] | None:
    """A verdict's CI as speedups (low, high), from its log-ratio bounds; None without one."""
    return records.speedup_ci(verdict.get("ci_low"), verdict.get("ci_high"))


def speedup_of(verdict: dict) -> float | None:
    return records.speedup(verdict.get("median"))


def ci(low: float, high: float, confidence: str = "99%") -> str:
    """'99% CI 1.79-1.83x'."""
    return f"{confidence} CI {speedup(low).rstrip('x')}-{speedup(high)}"


def speedup_and_ci(v: dict) -> str:
    """A verdict's measurement: '1.23x (99% CI 1.20-1.26x, 40 pairs, delta 1.0%)'; "" when it
    has no speedup (a FAIL, a check)."""
    gain, bounds = speedup_of(v), ci_of(v)
    if gain is None:
        return ""
    details = [ci(*bounds)] if bounds else []
    if v.get("pairs"):
        details.append(f"{v['pairs']} pairs")
    if v.get("delta") is not None:
        details.append(f"delta {percent(v['delta'])}")
    return speedup(gain) + (f" ({', '.join(details)})" if details else "")


def verdict(v: dict) -> str:
    """'KEEP 1.23x (99% CI 1.20-1.26x, 40 pairs, delta 1.0%)', or the status alone."""
    text = str(v.get("status", "?"))
    measured = speedup_and_ci(v)
    return f"{text} {measured}" if measured else text


def noise_rows(report: dict) -> list[list[str]]:
    """`lab noise`'s table: log ratios as % changes of the time, fractions as %, the rest as is."""
    def change(log_ratio):
        return percent(math.expm1(log_ratio), signed=True)

    return [
        ["pairs", str(report["pairs"])],
        ["A/A median change", f"{change(report['median'])} (99% CI {change(report['ci_low'])} to "
                              f"{change(report['ci_high'])})"],
        ["noise floor", percent(report["noise_floor"])],
        ["delta (decision threshold)", percent(report["delta"])],
        ["smallest detectable effect", percent(report["mde"])],
        ["spread (IQR, SD)", f"{percent(math.expm1(report['iqr']))}, {percent(math.expm1(report['sd']))}"],
        ["telemetry blocks", f"{report['blocks']} ({report['throttled_blocks']} throttled)"],
        ["sandbox", str(report["sandbox"])],
        ["record", str(report["record"])],
    ]
