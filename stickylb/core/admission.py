"""Theory of operation: how many requests may be in flight, and who waits (HAProxy's maxconn).

``maxConnections`` caps in-flight proxied requests plus open WebSockets across all backends.
Beyond it a request waits in a bounded queue (``maxQueue``) for up to ``queueTimeout``, then
gets the "unavailable" answer. The same queue serves clients pinned to a backend that is at its
own ``maxConnections``: they wait for a slot on *their* backend rather than losing their session.

The queue is first come, first served: a waiter keeps its ticket when it has to wait again, and
a newcomer never overtakes earlier waiters for the same resource (``key``). Every release wakes
the waiters whose condition now holds, in ticket order; the first to run takes the slot (it
acquires without yielding), the others find their condition false again and keep their place.

Connections that never complete a request (slow or idle clients) hold no slot: those are bounded
by ``timeouts.keepAlive`` in the HTTP server.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

GLOBAL = "global"


@dataclass(order=True)
class _Waiter:
    ticket: int
    key: Hashable = field(compare=False)
    ready: Callable[[], bool] = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class Admission:
    def __init__(self, max_active: int | None, max_queue: int, queue_timeout: float) -> None:
        self._max_active = max_active
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._tickets = itertools.count()
        self._waiters: list[_Waiter] = []
        self.active = 0

    def configure(self, max_active: int | None, max_queue: int, queue_timeout: float) -> None:
        """New limits (a reload); waiters that may now go are woken."""
        self._max_active = max_active
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self.wake()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def enter(self) -> bool:
        """Take a global slot, waiting in the queue if needed; False means give up (503)."""
        limit = self._max_active
        if limit is not None and not await self.wait_until(lambda: self.active < limit, GLOBAL):
            return False
        self.active += 1
        return True

    def try_enter(self) -> bool:
        """Take a global slot if one is free and nobody queues (the usual case: no waiting)."""
        limit = self._max_active
        if limit is None or (self.active < limit and not self._waiters):
            self.active += 1
            return True
        return False

    def leave(self) -> None:
        self.active -= 1
        if self._waiters:
            self.wake()

    def wake(self) -> None:
        """Something was released: wake, in ticket order, the waiters whose condition holds."""
        for waiter in self._waiters:
            if not waiter.future.done() and waiter.ready():
                waiter.future.set_result(None)

    async def wait_until(self, ready: Callable[[], bool], key: Hashable) -> bool:
        """Wait in the queue until ``ready()`` (at most ``queueTimeout``); False if it never is."""
        if ready() and not any(w.key == key for w in self._waiters):
            return True
        if len(self._waiters) >= self._max_queue:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        ticket = next(self._tickets)
        while True:
            waiter = _Waiter(ticket, key, ready, loop.create_future())
            bisect.insort(self._waiters, waiter)
            try:
                remaining = deadline - loop.time()
                if remaining > 0:
                    await asyncio.wait_for(asyncio.shield(waiter.future), remaining)
            except TimeoutError:
                pass
            finally:
                self._waiters.remove(waiter)
            if ready():
                return True
            if loop.time() >= deadline:
                self.wake()  # pass on a wake-up this waiter may have received but cannot use
                return False
