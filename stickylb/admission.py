"""Theory of operation: how many requests may be in flight, and who waits (HAProxy's maxconn).

``maxConnections`` caps in-flight proxied requests plus open WebSockets across all backends.
Beyond it a request waits in a bounded queue (``maxQueue``) for up to ``queueTimeout``, then
gets the "unavailable" response. The same queue serves clients pinned to a backend that is at
its own ``maxConnections``: they wait for a slot on *their* backend rather than losing their
session. Every release wakes the waiters, which re-check their own condition; queues are small,
so waking all is simpler than bookkeeping per condition and costs little.

Connections that never complete a request (slow or idle clients) do not hold a slot: those are
bounded by ``timeouts.keepAlive`` in the HTTP server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Admission:
    def __init__(self, max_active: int | None, max_queue: int, queue_timeout: float) -> None:
        self._max_active = max_active
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self.active = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def enter(self) -> bool:
        """Take a global slot, waiting in the queue if needed; False means give up (503)."""
        limit = self._max_active
        if (
            limit is not None
            and self.active >= limit
            and not await self.wait_until(lambda: self.active < limit)
        ):
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        """Something was released: let every waiter re-check its condition."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, ready: Callable[[], bool]) -> bool:
        """Wait (in the bounded queue, up to ``queueTimeout``) until ``ready()``; False if not."""
        if ready():
            return True
        if len(self._waiters) >= self._max_queue:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0 or len(self._waiters) >= self._max_queue:
                return False
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), remaining)
            except TimeoutError:
                return ready()
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True
