"""The live view of a run: elapsed of budget, experiments by verdict, best with its CI, spend, and
what the lab or the agent is doing now. On a terminal a rich panel redrawn in place; elsewhere
(a log file, CI) one plain line per activity."""

from __future__ import annotations

import sys
import time

from .records import KEEP
from .stats import speedup, speedup_ci
from .store import event_status


class LiveView:
    def __init__(self, budget_s: float | None = None):
        from rich.console import Console

        self.console = Console()
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.lab = None
        self.activity = "starting"
        self._live = None

    def __call__(self, text: str) -> None:
        """The loop's `say`: record the activity and redraw."""
        self.activity = text
        if self._live is not None:
            self._live.update(self.render())
        else:
            self.console.log(text)

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.live import Live

            self._live = Live(self.render(), console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        return False

    def render(self):
        from rich.panel import Panel
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        elapsed = time.monotonic() - self.started
        budget = f" of {self.budget_s / 3600:.2f} h" if self.budget_s else ""
        table.add_row("elapsed", f"{elapsed / 3600:.2f} h{budget}")
        if self.lab is not None:
            state = self.lab.state()
            table.add_row("experiments", ", ".join(f"{k} {v}" for k, v in sorted(state.verdicts.items())) or "none yet")
            table.add_row("best", f"{state.best_speedup:.4f}x over the baseline" + _last_ci(self.lab))
            table.add_row("noise", "not measured" if state.noise_floor is None else
                          f"floor {state.noise_floor * 100:.2f}%, delta {state.delta * 100:.2f}%")
            limit = self.lab.settings.max_usd
            table.add_row("spent", f"${state.spent_usd:.2f}" + (f" of ${limit:.2f}" if limit else " (no limit)"))
            for name, value in agent_rows(self.lab.folder.events()):
                table.add_row(name, value)
        table.add_row("now", self.activity)
        title = f"lab run {self.lab.folder.meta['id']}" if self.lab is not None else "lab run"
        return Panel(table, title=title)


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


def _last_ci(lab) -> str:
    kept = [e for e in lab.folder.events() if e["type"] == "evaluated" and event_status(e) == KEEP]
    if not kept or kept[-1]["verdict"].get("ci_low") is None:
        return ""
    v = kept[-1]["verdict"]
    low, high = speedup_ci(v["ci_low"], v["ci_high"])
    return f" (last keep {speedup(v['median']):.4f}x, 99% CI {low:.4f}-{high:.4f})"
