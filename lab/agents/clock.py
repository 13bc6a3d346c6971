"""The time the agent layer and the loop wait on: the system's, or a test's compressed clock.

Everything that waits (the agent's back-off on a busy API) or reads the time against a budget
(the loop's deadline) asks `current()`, so a soak test can run eight hours of outages, back-offs
and budget in seconds (`use(FakeClock())`) while every subprocess keeps its real timeouts.
"""

from __future__ import annotations

import threading
import time

# Set by the loop's first Ctrl-C: whatever waits (an API back-off, a pause) returns at once, so a
# run asked to stop never sits out a 30-minute outage first.
stop_waiting = threading.Event()


class Clock:
    """now(): monotonic seconds; wall(): seconds since the epoch; sleep(s): wait."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            stop_waiting.wait(seconds)


SYSTEM = Clock()
_current: Clock = SYSTEM


def current() -> Clock:
    return _current


def use(clock: Clock | None) -> Clock:
    """Make `clock` the one everything waits on (None: the system's); returns the previous one."""
    global _current
    previous, _current = _current, clock or SYSTEM
    return previous
