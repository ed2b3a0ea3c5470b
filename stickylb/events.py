"""Theory of operation: ``GET /_lb/events``, a Server-Sent Events stream of what happens.

Every event is one JSON object on one ``data:`` line, with a ``type``:

- ``state``: a backend changed (``event``: down, up, drain, maint, ready, added, removed), with
  the reason and time; from the pool's listeners, as alerts are.
- ``reload``: the config was reloaded (what was added, removed, updated).
- ``alert``: an alert was sent, or failed (channel, result, what; never a secret).
- ``stats``: once a second, each backend's state, active HTTP and WebSocket connections,
  requests per second, error rate (5xx share), p50/p95 latency over the last minute, the last
  check, plus the affinity counters and the queue. The dashboard draws from these.

A new subscriber first gets ``hello`` with the last five minutes of ``stats`` (so sparklines
start full) and the last 50 other events. Each subscriber has a bounded queue; one that does not
keep up is dropped (it reconnects, as ``EventSource`` does by itself). A comment line every
15 s keeps idle proxies from cutting the stream. At shutdown every stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .core.pool import StateChange
from .core.stats import quantile
from .durations import iso
from .tasks import cancel

if TYPE_CHECKING:
    from .app import Balancer

HISTORY_SECONDS = 300
RECENT_EVENTS = 50
SUBSCRIBER_QUEUE = 256
LATENCY_WINDOW = 60  # seconds of history the percentiles look at


class Events:
    """The event hub of one balancer (see the module's docstring)."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_SECONDS)
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        # Per backend: (answers, 5xx, duration bucket counts) one tick ago and a minute ago.
        self._last: dict[str, tuple[int, int]] = {}
        self._windows: dict[str, deque[list[int]]] = {}
        self._task: asyncio.Task[None] | None = None
        balancer.pool.subscribe(self.on_change)

    # --- intake ---------------------------------------------------------------------------

    def on_change(self, change: StateChange) -> None:
        self.publish(
            {
                "type": "state",
                "backend": change.backend.id,
                "event": change.event,
                "reason": change.reason,
                "at": iso(change.at),
            }
        )

    def publish(self, event: dict[str, Any]) -> None:
        if event["type"] != "stats":
            self._recent.append(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # too slow: dropped; EventSource reconnects by itself
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    # --- the stream ---------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        queue.put_nowait(
            {
                "type": "hello",
                "history": list(self._history),
                "recent": list(self._recent),
                "prefix": self._balancer.config.admin.prefix,
            }
        )
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """Shutdown: every stream ends now (nobody waits for a dashboard)."""
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()

    # --- stats, once a second -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick_forever(), name="stickylb-events")

    async def stop(self) -> None:
        self.close()
        task, self._task = self._task, None
        await cancel(task)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            snapshot = self.snapshot()
            self._history.append(snapshot)
            self.publish(snapshot)

    def snapshot(self) -> dict[str, Any]:
        balancer = self._balancer
        backends = []
        seen = set()
        for backend in balancer.pool.backends:
            key = str(backend.id)
            seen.add(key)
            stats = backend.stats
            total, errors = sum(stats.answers), stats.answers[4]
            last_total, last_errors = self._last.get(key, (total, errors))
            self._last[key] = (total, errors)
            window = self._windows.get(key)
            if window is None:  # until a minute has passed, everything since start counts
                window = self._windows[key] = deque(maxlen=LATENCY_WINDOW + 1)
                window.append([0] * len(stats.durations.counts))
            window.append(list(stats.durations.counts))
            recent = [now - then for now, then in zip(window[-1], window[0], strict=True)]
            tunnels = stats.tunnels
            backends.append(
                {
                    "id": backend.id,
                    "url": backend.config.url,
                    "healthy": backend.healthy,
                    "adminState": backend.admin_state,
                    "weight": round(backend.weight, 3),
                    "http": backend.active - tunnels,
                    "websockets": tunnels,
                    "rps": total - last_total,
                    "errorRate": (errors - last_errors) / (total - last_total)
                    if total > last_total
                    else 0.0,
                    "p50": _ms(quantile(recent, 0.5)),
                    "p95": _ms(quantile(recent, 0.95)),
                    "lastChecked": iso(backend.last_checked),
                    "lastCheckOk": backend.tracker.failures == 0 if backend.last_checked else None,
                    "lastFailureReason": backend.tracker.last_reason,
                    "requests": backend.requests,
                }
            )
        for gone in set(self._last) - seen:
            self._last.pop(gone, None)
            self._windows.pop(gone, None)
        return {
            "type": "stats",
            "at": iso(time.time()),
            "strategy": balancer.config.strategy,
            "backends": backends,
            "affinity": balancer.stats.affinity_results(),
            "placed": balancer.stats.placed_by(),
            **(balancer.cluster.public() if balancer.cluster is not None else {}),
            "queue": balancer.admission.queued,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def sse(event: dict[str, Any] | None) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
