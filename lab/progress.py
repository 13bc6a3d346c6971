"""What a long step is doing while it does it: a build, a check, a timing, a reproduction.

One channel for every process of the lab. Code that works for a while says so with
`stage("building llama.cpp: compiling")`. In the lab's own process that goes to the progress in
force (`Progress`: a spinner with the elapsed time on a terminal, plain timestamped lines
elsewhere, with a "still ..." line when a stage is silent for long); in a runner, which has no
progress of its own, it goes to stderr as a line starting with PREFIX, which the lab relays from
the runner's stderr as it comes (`relay`). With no progress in force, nothing is shown: a test or
a library caller sees no output it did not ask for.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Literal

PREFIX = "[lab] "  # a runner's stderr line that is progress, not diagnostics
HEARTBEAT_S = 30.0  # a stage silent this long gets a "still ..." line (plain output only)

_sinks: list = []  # the progress in force in this process, innermost last
_lock = threading.RLock()


def stage(text: str) -> None:
    """Say what this process is doing now (a new stage of the work in hand)."""
    with _lock:
        sink = _sinks[-1] if _sinks else None
    if sink is not None:
        sink.stage(text)
    elif _in_runner():
        print(PREFIX + text, file=sys.stderr, flush=True)


def relay(line: str) -> None:
    """One line of a runner's stderr: shown as a stage when it is progress, else dropped (the
    record keeps the stderr tail for diagnostics)."""
    if line.startswith(PREFIX):
        stage(line[len(PREFIX):].rstrip("\n"))


def _in_runner() -> bool:
    """The runner (python -m lab.runner) reports through stderr; any other process without a
    progress in force stays quiet."""
    main = sys.modules.get("__main__")
    return getattr(main, "__spec__", None) is not None and main.__spec__.name == "lab.runner"


@contextmanager
def showing(sink):
    """Send every stage to `sink` (an object with `stage(text)`) inside the block."""
    with _lock:
        _sinks.append(sink)
    try:
        yield sink
    finally:
        with _lock:
            _sinks.remove(sink)


def _short(text: str, limit: int = 60) -> str:
    """A stage's text for a heartbeat line: its first `limit` characters, cut at a word."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(",:;") + "..."


def clock_line(text: str) -> str:
    """The plain form of one progress line: '[14:03:22] text'."""
    return f"[{time.strftime('%H:%M:%S')}] {text}"


class Progress:
    """The progress of one command: on a terminal a spinner line (stage and elapsed time) under
    the stages done so far; elsewhere one timestamped line per stage, and a heartbeat line when a
    stage says nothing for `heartbeat_s`. Written to stderr, so --json output stays clean."""

    def __init__(self, title: str, *, file=None, tty: bool | None = None, heartbeat_s: float = HEARTBEAT_S):
        self.title = title
        self.file = file or sys.stderr
        self.tty = self.file.isatty() if tty is None else tty
        self.heartbeat_s = heartbeat_s
        self.current = ""
        self.started = self.stage_started = self.last_line = time.monotonic()
        self._live: Any = None
        self._spinner: Any = None
        self._stop = threading.Event()
        self._heartbeat: Any = None
        self._context: Any = None

    # --- the sink ----------------------------------------------------------------------------
    def stage(self, text: str) -> None:
        with _lock:
            self.current, self.stage_started = text, time.monotonic()
            self._line(text)

    def _line(self, text: str) -> None:
        self.last_line = time.monotonic()
        if self._live is not None:
            self._live.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)
            self._spinner.update(text=self._spinner_text())
        else:
            print(clock_line(text), file=self.file, flush=True)

    def _spinner_text(self) -> str:
        from . import fmt

        now = time.monotonic()
        return f"{self.title}: {self.current or 'starting'} ({fmt.duration(now - self.stage_started)}, " \
               f"{fmt.duration(now - self.started)} in all)"

    def _beat(self) -> None:
        """Plain output: a line when the stage has been silent for heartbeat_s; a terminal: the
        spinner's elapsed time."""
        interval = 0.5 if self._live is not None else min(self.heartbeat_s, 5.0)
        while not self._stop.wait(interval):
            with _lock:
                if self._live is not None:
                    self._spinner.update(text=self._spinner_text())
                elif time.monotonic() - self.last_line >= self.heartbeat_s:
                    from . import fmt

                    self._line(f"... still {_short(self.current or self.title)} "
                               f"({fmt.duration(time.monotonic() - self.stage_started)} so far)")

    # --- the command's extent ----------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self.tty:
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", text=self._spinner_text())
            self._live = Live(self._spinner, console=Console(file=self.file), transient=True,
                              refresh_per_second=4)
            self._live.__enter__()
        else:
            self._line(f"{self.title}: started")
        self._context = showing(self)
        self._context.__enter__()
        self._heartbeat = threading.Thread(target=self._beat, name="lab-progress", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> Literal[False]:
        from . import fmt

        self._stop.set()
        self._heartbeat.join(timeout=2)
        self._context.__exit__(*exc)
        with _lock:
            if self._live is not None:
                self._live.__exit__(*exc)
                self._live = None
            ended = "stopped" if exc[0] is not None else "done"
            self._line(f"{self.title}: {ended} after {fmt.duration(time.monotonic() - self.started)}")
        return False
