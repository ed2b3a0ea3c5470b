"""Theory of operation: every timeout of every connection, kept by one periodic sweep.

A connection that can time out has a ``deadline`` (loop time; ``inf`` when nothing is timed)
and an ``expired(now)`` method. Moving a deadline is one float assignment, so the hot path can
move it on every read without creating, cancelling or re-sorting timers; one ``Sweeper`` per
balancer looks at all of them every ``period`` and calls ``expired`` on those whose time has
come. A timeout therefore fires up to one period late, never early; the period is a quarter of
the shortest configured timeout, between 50 ms and 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Protocol

log = logging.getLogger("stickylb")

NEVER = math.inf
MIN_PERIOD = 0.05
MAX_PERIOD = 1.0


class Timed(Protocol):
    deadline: float

    def expired(self, now: float) -> None: ...


def period_for(shortest_timeout: float) -> float:
    """A quarter of the shortest timeout, between ``MIN_PERIOD`` and ``MAX_PERIOD``."""
    return min(MAX_PERIOD, max(MIN_PERIOD, shortest_timeout / 4))


class Sweeper:
    def __init__(self, shortest_timeout: float) -> None:
        self.period = period_for(shortest_timeout)
        self._watched: set[Timed] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.period, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def watch(self, item: Timed) -> None:
        self._watched.add(item)

    def forget(self, item: Timed) -> None:
        self._watched.discard(item)

    def __len__(self) -> int:
        return len(self._watched)

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        due = [item for item in self._watched if item.deadline <= now]
        for item in due:
            try:
                item.expired(now)
            except Exception:  # one broken connection must not stop every other timeout
                log.exception("timeout handling failed")
        self._handle = self._loop.call_later(self.period, self._sweep)
