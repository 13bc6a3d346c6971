"""The live view of a run, drawn from its events: the budget left and the pace, the incumbent,
the noise floor and delta, spend, the latest experiments with their verdicts, speedups and CIs,
and what the lab or the agent is doing now. On a terminal a rich panel redrawn in place, with
each finished experiment also printed above it; elsewhere (a log file, CI) one timestamped line
per activity and per finished experiment. Numbers go through lab.fmt."""

from __future__ import annotations

import sys
import time
from typing import Any

from . import fmt
from .records import KEEP
from .store import event_status
from .progress import clock_line, showing

RECENT = 8  # experiments shown in the panel's table


class LiveView:
    """The loop's `say` and the progress sink of `lab run` (the runner's stages land in "now")."""

    def __init__(self, budget_s: float | None = None, *, console=None, tty: bool | None = None):
        from rich.console import Console

        self.console = console or Console(soft_wrap=True)
        self.tty = (self.console.is_terminal and sys.stdout.isatty()) if tty is None else tty
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.lab = None
        self.activity = "starting"
        self._printed = 0  # events already told as lines
        self._live = None
        self._showing = None

    # --- what the loop and the runner say ----------------------------------------------------
    def __call__(self, text: str) -> None:
        """The loop's `say`: tell what finished since the last call, then the new activity."""
        self._tell_new_events()
        self.activity = text
        self._line(text)

    def stage(self, text: str) -> None:
        """A stage of the evaluation in flight (from the runner, through lab.progress)."""
        self.activity = f"{self._current_experiment()}{text}"
        self._line(self.activity)

    def _current_experiment(self) -> str:
        """'#7: ' while experiment 7 is evaluated (the runner's stages name no experiment)."""
        if self.lab is None:
            return ""
        for e in reversed(self.lab.folder.events()):
            if e["type"] == "evaluating":
                return f"#{e['number']}: "
            if e["type"] in ("evaluated", "rejected", "noise_floor"):
                return ""
        return ""

    def _line(self, text: str) -> None:
        if self._live is None:  # on a terminal the panel shows the activity
            self.console.print(clock_line(text), markup=False, highlight=False)

    def _tell_new_events(self) -> None:
        if self.lab is None:
            return
        events = self.lab.folder.events()
        for e in events[self._printed:]:
            line = event_line(e, unit=self.lab.harness.metric.unit)
            if line:
                self.console.print(clock_line(line), markup=False, highlight=False)
        self._printed = len(events)

    # --- the run's extent ----------------------------------------------------------------------
    def __enter__(self):
        self._showing = showing(self)
        self._showing.__enter__()
        if self.tty:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        self._showing.__exit__(*exc)
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        self._tell_new_events()
        return False

    def render(self):
        if self.lab is None:
            from rich.panel import Panel

            return Panel(self.activity, title="lab run")
        lab = self.lab
        return run_panel(lab.folder.events(), lab.folder.meta, elapsed_s=time.monotonic() - self.started,
                         budget_s=self.budget_s, max_usd=lab.settings.max_usd,
                         unit=lab.harness.metric.unit, activity=self.activity)


# --- the panel, from events alone ---------------------------------------------------------------
def run_panel(events: list[dict], meta: dict, *, elapsed_s: float, budget_s: float | None,
              max_usd: float = 0.0, unit: str = "", activity: str = ""):
    """The live view as a rich renderable: a pure function of the run's events and the clock."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    from .loop import RunState
    from .store import pace

    state = RunState.from_events(events, meta)
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold")
    rows.add_column()
    if budget_s:
        left = max(budget_s - elapsed_s, 0.0)
        rows.add_row("budget", f"{fmt.duration(elapsed_s)} of {fmt.duration(budget_s)}, {fmt.duration(left)} left")
    else:
        rows.add_row("elapsed", fmt.duration(elapsed_s))
    rate = pace(events)
    rows.add_row("pace", f"{rate['experiments']} experiment(s), {rate['per_hour']:.1f} an hour"
                 if rate["per_hour"] is not None else f"{rate['experiments']} experiment(s) so far")
    rows.add_row("incumbent", incumbent_text(state, events, unit))
    rows.add_row("noise", "not measured yet" if state.noise_floor is None else
                 f"floor {fmt.percent(state.noise_floor)}, delta {fmt.percent(state.delta)}")
    counts = dict(sorted(state.verdicts.items()))
    rejected = sum(1 for e in events if e["type"] == "rejected")
    if rejected:
        counts["rejected"] = rejected
    rows.add_row("verdicts", ", ".join(f"{k} {v}" for k, v in counts.items()) or "none yet")
    rows.add_row("spent", f"${state.spent_usd:.2f}" + (f" of ${max_usd:.2f}" if max_usd else " (no limit)"))
    for name, value in agent_rows(events):
        rows.add_row(name, value)
    rows.add_row("now", activity)
    parts: list[Any] = [rows]
    recent = [e for e in events if e["type"] in ("evaluated", "rejected")][-RECENT:]
    if recent:
        table = Table(box=None, padding=(0, 1), show_edge=False)
        columns: tuple[tuple[str, Any], ...] = (("#", "right"), ("verdict", "left"), ("speedup", "right"),
                                                 ("99% CI", "right"), ("what", "left"))
        for column, justify in columns:
            table.add_column(column, justify=justify, no_wrap=column != "what")
        for e in recent:
            table.add_row(*experiment_cells(e))
        parts += ["", table]
    return Panel(Group(*parts), title=f"lab run {meta.get('id', '')}".strip())


def incumbent_text(state, events: list[dict], unit: str = "") -> str:
    """'base 1a2b3c4d5e (baseline 4,423 tokens/s)' or 'a1b2c3d4e5, #7: 1.23x over the baseline'."""
    baseline = next((e for e in events if e["type"] == "baseline"), None)
    measured = f"{baseline.get('metric_name', '')} {fmt.number(baseline.get('metric'), unit)}".strip() \
        if baseline and baseline.get("metric") is not None else ""
    if not state.kept:
        return f"the base {state.base_commit[:10]}" + (f" (baseline {measured})" if measured else "")
    last = state.kept[-1]
    return (f"{last['commit'][:10]} (#{last['number']}), {fmt.speedup(state.best_speedup)} over the baseline"
            + (f" ({measured})" if measured else "") + f"; {len(state.kept)} kept")


def experiment_cells(e: dict) -> list[str]:
    """One row of the experiments table: number, verdict, speedup, CI, description."""
    what = (e.get("description") or "").replace("\n", " ")[:60]
    if e["type"] == "rejected":
        return [str(e.get("number", "?")), "REJECTED", "", "", f"{what} ({e.get('reason', '')})"]
    v = e.get("verdict") or {}
    gain, bounds = fmt.speedup_of(v), fmt.ci_of(v)
    status = v.get("status", "?") + (" (kept)" if event_status(e) == KEEP else "")
    return [str(e.get("number", "?")), status, fmt.speedup(gain) if gain else "",
            f"{fmt.speedup(bounds[0]).rstrip('x')}-{fmt.speedup(bounds[1])}" if bounds else "", what]


def event_line(e: dict, unit: str = "") -> str:
    """A finished step as one line (experiments, keeps, the noise floor, canaries); "" for the rest."""
    t = e["type"]
    if t == "evaluated":
        v = e.get("verdict") or {}
        reason = v.get("reason") or e.get("reason") or ""
        return (f"#{e.get('number', '?')} {fmt.verdict(v)}: {(e.get('description') or '')[:80]}"
                + (f" — {reason[:300]}" if reason else ""))
    if t == "rejected":
        return f"#{e.get('number', '?')} REJECTED ({e.get('reason', '')}): {(e.get('description') or '')[:80]}"
    if t == "kept":
        return (f"#{e.get('number', '?')} kept as {e.get('commit', '')[:10]}: {fmt.speedup(e.get('speedup'))}, "
                f"{fmt.speedup(e.get('cumulative_speedup'))} over the baseline")
    if t == "baseline":
        return f"baseline {e.get('metric_name', '')} {fmt.number(e.get('metric'), unit)}"
    if t == "noise_floor" and e.get("pairs"):
        return (f"A/A noise floor {fmt.percent(e.get('noise_floor'))}, delta {fmt.percent(e.get('delta'))} "
                f"({e['pairs']} pairs)")
    if t == "canary":
        return e.get("text", "A/A canary")
    return ""


def agent_rows(events: list[dict]) -> list[tuple[str, str]]:
    """The agent's side of the run: the API's state (waiting out an outage, or how many waits so
    far), faults by kind, draft checks, changes of approach."""
    rows = []
    waits = [i for i, e in enumerate(events) if e["type"] == "api_wait"]
    if waits:
        last = events[waits[-1]]
        recovered = any(e["type"] in ("api_recovered", "proposed", "agent_failed") for e in events[waits[-1] + 1:])
        now = "" if recovered else f"now: {last.get('text', '')}; "
        rows.append(("api", f"{now}{len(waits)} wait(s) so far"))
    faults: dict[str, int] = {}
    for e in events:
        if e["type"] == "agent_fault":
            faults[e.get("kind", "?")] = faults.get(e.get("kind", "?"), 0) + 1
    if faults:
        rows.append(("faults", ", ".join(f"{k} {n}" for k, n in sorted(faults.items()))))
    checks = [e for e in events if e.get("kind") == "draft_check"]
    changes = sum(1 for e in events if e.get("kind") == "change_approach")
    failed = sum(1 for e in events if e["type"] == "agent_failed")
    if checks or changes or failed:
        rows.append(("agent", f"{len(checks)} draft check(s) ({sum(1 for e in checks if e.get('passed'))} passed), "
                              f"{failed} failed proposal(s), {changes} change(s) of approach"))
    return rows
