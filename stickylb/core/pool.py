"""Theory of operation: the runtime state of the backends, and who gets the next client.

``Pool`` owns everything that changes while the balancer runs: each ``Backend``'s health, request
and active-connection counters, and passive failure history. The config models stay frozen.

Invariants this module owns:
- ``choose`` returns the pinned backend while it can take the request; otherwise it balances
  with the strategy over the backends that are up, not full and of positive weight.
- ``active`` counts in-flight HTTP requests and open WebSockets. Every ``acquire`` is paired
  with exactly one ``release`` by the request that made it (``RequestCycle._release_backend``,
  its one place for that), so it is never negative and returns to zero when traffic ends.
- A state change (from active checks or passive detection) is reported once to every listener.

No I/O happens here; the health checker and the request pipeline feed it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from yarl import URL

from ..config import BackendConfig, Config, HealthSettings
from .affinity import StickyCookie
from .health_rules import HealthTracker
from .strategies import STRATEGIES, Strategy

log = logging.getLogger("stickylb.health")


@dataclass(eq=False, slots=True)
class Backend:
    """One backend's config plus its runtime state."""

    config: BackendConfig
    token: str
    health: HealthSettings
    url: URL
    tracker: HealthTracker
    # Read on every request: plain attributes, not properties over the config.
    key: Hashable = None
    id: int | str = 0
    weight: float = 1.0
    base: str = ""  # scheme://authority/prefix, to which a health check's path is appended
    host_header: bytes = b""  # the Host a request to this backend carries (its authority)
    prefix: bytes = b""  # the URL's path, put in front of every request target
    requests: int = 0
    active: int = 0
    last_checked: float | None = None
    last_change: float | None = None
    passive_failures: deque[float] = field(default_factory=deque)

    @property
    def healthy(self) -> bool:
        return self.tracker.healthy

    @property
    def full(self) -> bool:
        limit = self.config.max_connections
        return limit is not None and self.active >= limit

    @property
    def available(self) -> bool:
        return self.tracker.healthy and not self.full


class Choice(NamedTuple):
    backend: Backend
    repinned: bool  # the client must be (re)told which backend it is on


class StateChange(NamedTuple):
    backend: Backend
    healthy: bool
    reason: str | None
    at: float  # unix time


Listener = Callable[[StateChange], None]


class Pool:
    """The backends and the balancing decision.

    >>> from stickylb.config import build_config
    >>> pool = Pool.from_config(build_config(port=0, backends=[
    ...     {"id": "a", "url": "http://127.0.0.1:1"}, {"id": "b", "url": "http://127.0.0.1:2"}]))
    >>> first = pool.choose(None)
    >>> pool.choose(first.backend.token).backend is first.backend
    True
    """

    def __init__(
        self, backends: Iterable[Backend], strategy: Strategy, *, max_fails: int, fail_window: float
    ) -> None:
        self.backends = list(backends)
        self._by_token = {backend.token: backend for backend in self.backends}
        self._strategy = strategy
        self._max_fails = max_fails
        self._fail_window = fail_window
        self._listeners: list[Listener] = []
        # Who may get new clients changes only with health (``_announce``), so it is worked out
        # then, not per request; only connection limits still need a look per request.
        self._balanced = self._up_and_weighted()
        self._limited = any(b.config.max_connections is not None for b in self.backends)

    @classmethod
    def from_config(cls, config: Config) -> Pool:
        cookie = StickyCookie(config.cookie)
        backends = []
        for backend_config in config.backends:
            health = config.health_for(backend_config)
            url = URL(backend_config.url)
            authority = url.raw_host or ""
            if ":" in authority:  # IPv6 literal
                authority = f"[{authority}]"
            if url.explicit_port is not None:
                authority = f"{authority}:{url.explicit_port}"
            backends.append(
                Backend(
                    config=backend_config,
                    key=backend_config.id,
                    id=backend_config.id,
                    weight=backend_config.weight,
                    token=cookie.token_for(backend_config.id),
                    health=health,
                    url=url,
                    tracker=HealthTracker(rise=health.rise, fall=health.fall),
                    base=f"{url.scheme}://{authority}{url.raw_path.rstrip('/')}",
                    host_header=authority.encode("idna" if not authority.isascii() else "ascii"),
                    prefix=url.raw_path.rstrip("/").encode(),
                )
            )
        return cls(
            backends,
            STRATEGIES[config.strategy](),
            max_fails=config.health.max_fails,
            fail_window=config.health.fail_window,
        )

    # --- balancing ------------------------------------------------------------------------

    def pinned(self, token: str | None) -> Backend | None:
        return self._by_token.get(token) if token else None

    def choose(self, token: str | None, exclude: tuple[Backend, ...] = ()) -> Choice | None:
        """The backend for a request carrying ``token`` (None when nothing can take it)."""
        pinned = self._by_token.get(token) if token else None
        if pinned is not None and pinned.available and pinned not in exclude:
            return Choice(pinned, repinned=False)
        candidates: Sequence[Backend] = self._balanced
        if self._limited or exclude:
            candidates = [b for b in candidates if not b.full and b not in exclude]
        if not candidates:
            return None
        return Choice(self._strategy.pick(candidates), repinned=True)

    def can_choose(self, token: str | None) -> bool:
        """Whether ``choose(token)`` would find a backend, without choosing one: asking moves
        no strategy's state (a round-robin turn, a tie-break), so a queue may ask freely."""
        pinned = self._by_token.get(token) if token else None
        if pinned is not None and pinned.available:
            return True
        if self._limited:
            return any(not b.full for b in self._balanced)
        return bool(self._balanced)

    @staticmethod
    def acquire(backend: Backend) -> None:
        backend.requests += 1
        backend.active += 1

    @staticmethod
    def release(backend: Backend) -> None:
        backend.active -= 1

    # --- health ---------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def record_check(self, backend: Backend, ok: bool, reason: str | None = None) -> None:
        """An active check finished; rise/fall decide whether the state changes."""
        now = time.time()
        backend.last_checked = now
        if backend.tracker.record(ok, reason):
            if ok:
                backend.passive_failures.clear()
            self._announce(backend, now)

    def record_passive_failure(self, backend: Backend, reason: str) -> None:
        """A proxied request could not reach ``backend``: enough of them mark it down now."""
        if self._max_fails <= 0 or not backend.healthy:
            return
        now = time.monotonic()
        failures = backend.passive_failures
        failures.append(now)
        while failures and now - failures[0] > self._fail_window:
            failures.popleft()
        if len(failures) >= self._max_fails:
            failures.clear()
            reason = f"{reason} ({self._max_fails} failures in live traffic)"
            if backend.tracker.force_down(reason):
                self._announce(backend, time.time())

    def _up_and_weighted(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.healthy and b.weight > 0)

    def _announce(self, backend: Backend, now: float) -> None:
        backend.last_change = now
        self._balanced = self._up_and_weighted()
        change = StateChange(backend, backend.healthy, backend.tracker.last_reason, now)
        if change.healthy:
            log.info("backend %s is UP (%s)", backend.id, backend.url)
        else:
            log.warning("backend %s is DOWN (%s): %s", backend.id, backend.url, change.reason)
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # a faulty listener must not stop the others or the checker
                log.exception("state-change listener failed")

    def counts(self) -> tuple[int, int]:
        healthy = sum(1 for b in self.backends if b.healthy)
        return healthy, len(self.backends) - healthy
