"""Theory of operation: the runtime state of the backends, and who gets the next client.

``Pool`` owns everything that changes while the balancer runs: the set of backends (runtime
control adds, updates and removes them), each ``Backend``'s health, admin state (``ready``,
``drain``, ``maint``), effective weight, request and active-connection counters, and passive
failure history. The config models stay frozen; a change replaces a backend's model.

Invariants this module owns:
- ``choose`` returns the pinned backend while it can take the request (up, not full, not in
  ``maint``: a drained backend keeps its clients); otherwise it balances with the strategy over
  the backends that are up, ``ready``, not full and of positive weight.
- A backend in slow start has its weight ramped from 10% to 100% (``ramp``), never below.
- ``active`` counts in-flight HTTP requests and open WebSockets. Every ``acquire`` is paired
  with exactly one ``release`` by the request that made it (``RequestCycle._release_backend``,
  its one place for that), so it is never negative and returns to zero when traffic ends.
- A state change (from active checks, passive detection or an admin) is reported once to every
  listener.

No I/O happens here; the health checker and the request pipeline feed it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from yarl import URL

from ..config import BackendConfig, Config, HealthSettings
from .affinity import StickyCookie
from .health_rules import HealthTracker
from .stats import BackendStats
from .strategies import STRATEGIES, Strategy, rendezvous

log = logging.getLogger("stickylb.health")


READY, DRAIN, MAINT = "ready", "drain", "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)
SLOW_START_FLOOR = 0.1  # a backend in slow start begins at this share of its weight


@dataclass(eq=False, slots=True)
class Backend:
    """One backend's config plus its runtime state."""

    config: BackendConfig
    token: str  # the current cookie token; ``tokens`` adds those of older secrets
    health: HealthSettings
    url: URL
    tracker: HealthTracker
    # Read on every request: plain attributes, not properties over the config.
    key: Hashable = None
    id: int | str = 0
    weight: float = 1.0  # effective: the configured (or API-set) weight, during slow start less
    base: str = ""  # scheme://authority/prefix, to which a health check's path is appended
    host_header: bytes = b""  # the Host a request to this backend carries (its authority)
    prefix: bytes = b""  # the URL's path, put in front of every request target
    pin: bytes = b""  # the Set-Cookie line that places a client here (empty when not sticky)
    id_line: bytes = b""  # the x-backend-id line of its answers (empty when turned off)
    connections: Any = None  # its ``wire.backend.Connections`` (set by the balancer)
    requests: int = 0
    active: int = 0
    last_checked: float | None = None
    last_change: float | None = None
    last_failure: float | None = None  # unix time of the last failed check or live failure
    passive_failures: deque[float] = field(default_factory=deque)
    # Runtime control (``control.py``): none of it changes per request.
    admin_state: str = READY
    weight_override: float | None = None  # set through the API; survives reloads
    source: str = "config"
    ttl: float | None = None  # registered backends: seconds without a heartbeat before removal
    expires_at: float | None = None  # unix time
    ramp_since: float | None = None  # monotonic time its slow start began
    removing: bool = False
    elsewhere: int = 0  # active connections of the other workers or cluster instances
    tokens: tuple[str, ...] = ()
    hash_id: bytes = b""  # what rendezvous hashing knows it by (``core/affinity_sources.py``)
    stats: BackendStats = field(default_factory=BackendStats)

    @property
    def healthy(self) -> bool:
        return self.tracker.healthy

    @property
    def full(self) -> bool:
        limit = self.config.max_connections
        return limit is not None and self.active + self.elsewhere >= limit

    @property
    def available(self) -> bool:
        """May serve the clients pinned to it (a drained backend still does)."""
        return self.tracker.healthy and not self.full and self.admin_state != MAINT

    @property
    def set_weight(self) -> float:
        """The weight before slow start: the API's when one was set, else the config's."""
        return self.config.weight if self.weight_override is None else self.weight_override


def authority_of(url: URL) -> str:
    authority = url.raw_host or ""
    if ":" in authority:  # IPv6 literal
        authority = f"[{authority}]"
    if url.explicit_port is not None:
        authority = f"{authority}:{url.explicit_port}"
    return authority


class Choice(NamedTuple):
    backend: Backend
    repinned: bool  # the client must be (re)told which backend it is on
    held: bool = False  # the client's own backend (its cookie's, a learned session's)


class Seeking(Protocol):
    """What an affinity source found for a client without a usable cookie
    (``core/affinity_sources.Sought``)."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def held(self) -> Backend | None: ...


class StateChange(NamedTuple):
    backend: Backend
    healthy: bool
    reason: str | None
    at: float  # unix time
    admin: str | None = None  # an admin state change (ready, drain, maint, removed), not health

    @property
    def event(self) -> str:
        """What happened, in one word: down, up, or the admin change."""
        return self.admin or ("up" if self.healthy else "down")


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
        self._by_token = {t: b for b in self.backends for t in (b.token, *b.tokens)}
        self._by_id = {str(b.id): b for b in self.backends}
        self._strategy = strategy
        self.strategy_name = ""
        self._max_fails = max_fails
        self._fail_window = fail_window
        self._listeners: list[Listener] = []
        # Who may get new clients changes only with health, admin state and weights (see
        # ``_refresh``), so it is worked out then, not per request; only connection limits
        # still need a look per request.
        self._balanced: tuple[Backend, ...] = ()
        self._limited = False
        self._refresh()

    @classmethod
    def from_config(cls, config: Config) -> Pool:
        cookie = StickyCookie(config.cookie)
        pool = cls(
            [new_backend(b, config.health_for(b), cookie) for b in config.backends],
            STRATEGIES[config.strategy](),
            max_fails=config.health.max_fails,
            fail_window=config.health.fail_window,
        )
        pool.strategy_name = config.strategy
        return pool

    def configure(self, config: Config) -> None:
        """A reload: the strategy (kept when unchanged, with its state) and passive checks."""
        if config.strategy != self.strategy_name:
            self._strategy = STRATEGIES[config.strategy]()
            self.strategy_name = config.strategy
        self._max_fails = config.health.max_fails
        self._fail_window = config.health.fail_window

    # --- the set of backends (runtime control) -----------------------------------------------

    def find(self, backend_id: object) -> Backend | None:
        """The backend whose id reads as ``backend_id`` (ids 1 and "1" are the same)."""
        return self._by_id.get(str(backend_id))

    def add(self, backend: Backend) -> None:
        self.backends.append(backend)
        self._by_id[str(backend.id)] = backend
        for token in (backend.token, *backend.tokens):
            self._by_token[token] = backend
        self._refresh()
        self._tell(StateChange(backend, backend.healthy, None, time.time(), admin="added"))

    def remove(self, backend: Backend) -> None:
        """Gone: its pinned clients are balanced again on their next request. Requests still
        in flight on it finish and release it as usual."""
        if backend in self.backends:
            self.backends.remove(backend)
        if self._by_id.get(str(backend.id)) is backend:
            del self._by_id[str(backend.id)]
        for token in (backend.token, *backend.tokens):
            if self._by_token.get(token) is backend:
                del self._by_token[token]
        self._refresh()
        self._tell(StateChange(backend, backend.healthy, None, time.time(), admin="removed"))

    def update(self, backend: Backend, config: BackendConfig, health: HealthSettings) -> None:
        """New settings for a backend that stays: a new URL serves new requests."""
        backend.config = config
        backend.health = health
        _point(backend, URL(config.url))
        backend.tracker.rise, backend.tracker.fall = health.rise, health.fall
        self._reweigh(backend)

    def retoken(self, cookie: StickyCookie) -> None:
        """The cookie secret changed: every backend's token with it."""
        for backend in self.backends:
            backend.token, *older = cookie.tokens_for(backend.id)
            backend.tokens = tuple(older)
        self._by_token = {t: b for b in self.backends for t in (b.token, *b.tokens)}

    def set_state(self, backend: Backend, state: str, reason: str, *, tell: bool = True) -> bool:
        """Set the admin state; False when it already was that. ``tell``: report it to the
        listeners (not for a state restored at startup: nothing changed for anyone)."""
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown state {state!r}")
        if backend.admin_state == state:
            return False
        was = backend.admin_state
        backend.admin_state = state
        if was == MAINT:
            self._start_ramp(backend)
        self._refresh()
        if tell:
            self._tell(StateChange(backend, backend.healthy, reason, time.time(), admin=state))
        return True

    def set_weight(self, backend: Backend, weight: float | None) -> None:
        """An API-set weight (None: back to the config's)."""
        backend.weight_override = weight
        self._reweigh(backend)

    def ramp(self, now: float) -> bool:
        """Move every slow start on to ``now`` (monotonic); True while one is under way."""
        ramping = False
        for backend in self.backends:
            if backend.ramp_since is not None:
                self._reweigh(backend, now)
                ramping = ramping or backend.ramp_since is not None
        return ramping

    def _start_ramp(self, backend: Backend) -> None:
        others_up = any(
            b is not backend and b.healthy and b.admin_state == READY for b in self.backends
        )
        if backend.health.slow_start > 0 and others_up:
            backend.ramp_since = time.monotonic()
        self._reweigh(backend)

    def _reweigh(self, backend: Backend, now: float | None = None) -> None:
        weight = backend.set_weight
        if backend.ramp_since is not None:
            elapsed = (time.monotonic() if now is None else now) - backend.ramp_since
            share = elapsed / backend.health.slow_start
            if share >= 1:
                backend.ramp_since = None
            else:
                weight *= max(SLOW_START_FLOOR, share)
        if weight != backend.weight:
            backend.weight = weight
            self._refresh()

    def _refresh(self) -> None:
        self._balanced = tuple(
            b for b in self.backends if b.healthy and b.weight > 0 and b.admin_state == READY
        )
        self._limited = any(b.config.max_connections is not None for b in self.backends)

    # --- balancing ------------------------------------------------------------------------

    def pinned(self, token: str | None) -> Backend | None:
        return self._by_token.get(token) if token else None

    def choose(
        self, token: str | None, exclude: tuple[Backend, ...] = (), sought: Seeking | None = None
    ) -> Choice | None:
        """The backend for a request carrying ``token`` (None when nothing can take it), or
        when that names none that can, what an affinity source ``sought`` for it."""
        pinned = self._by_token.get(token) if token else None
        if pinned is not None and pinned.available and pinned not in exclude:
            # A token of an older secret keeps its backend and gets the current one.
            return Choice(pinned, repinned=token != pinned.token, held=True)
        if sought is not None:
            held = sought.held
            if held is not None and held.available and held not in exclude:
                return Choice(held, repinned=True, held=True)
        candidates: Sequence[Backend] = self._balanced
        if self._limited or exclude:
            candidates = [b for b in candidates if not b.full and b not in exclude]
        if not candidates:
            return None
        if sought is not None and sought.key is not None:
            return Choice(rendezvous(sought.key, candidates), repinned=True)
        return Choice(self._strategy.pick(candidates), repinned=True)

    def can_choose(self, token: str | None, sought: Seeking | None = None) -> bool:
        """Whether ``choose(token, sought=sought)`` would find a backend, without choosing one:
        asking moves no strategy's state (a round-robin turn, a tie-break), so a queue may ask
        freely."""
        pinned = self._by_token.get(token) if token else None
        if pinned is not None and pinned.available:
            return True
        held = sought.held if sought is not None else None
        if held is not None and held.available:
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

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def record_check(self, backend: Backend, ok: bool, reason: str | None = None) -> None:
        """An active check finished; rise/fall decide whether the state changes."""
        now = time.time()
        backend.last_checked = now
        if ok:
            backend.stats.checks_passed += 1
        else:
            backend.stats.checks_failed += 1
            backend.last_failure = now
        if backend.tracker.record(ok, reason):
            if ok:
                backend.passive_failures.clear()
                self._start_ramp(backend)
            self._announce(backend, now)

    def record_passive_failure(self, backend: Backend, reason: str) -> None:
        """A proxied request could not reach ``backend``: enough of them mark it down now."""
        backend.stats.passive_failures += 1
        backend.last_failure = time.time()
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

    def _announce(self, backend: Backend, now: float) -> None:
        backend.last_change = now
        self._refresh()
        change = StateChange(backend, backend.healthy, backend.tracker.last_reason, now)
        if change.healthy:
            log.info("backend %s is UP (%s)", backend.id, backend.url)
        else:
            log.warning("backend %s is DOWN (%s): %s", backend.id, backend.url, change.reason)
        self._tell(change)

    def _tell(self, change: StateChange) -> None:
        change.backend.stats.changes[change.event] += 1
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # a faulty listener must not stop the others or the checker
                log.exception("state-change listener failed")

    def counts(self) -> tuple[int, int]:
        healthy = sum(1 for b in self.backends if b.healthy)
        return healthy, len(self.backends) - healthy


def new_backend(
    config: BackendConfig,
    health: HealthSettings,
    cookie: StickyCookie,
    *,
    source: str = "config",
    checked: bool = False,
) -> Backend:
    """A backend as it starts: up until its first check says otherwise, except one added while
    running (``checked``), which takes traffic only after its first passing check."""
    url = URL(config.url)
    tracker = HealthTracker(rise=health.rise, fall=health.fall)
    if checked:
        tracker.healthy = False
    backend = Backend(
        config=config,
        key=config.id,
        id=config.id,
        weight=config.weight,
        token=cookie.token_for(config.id),
        tokens=cookie.tokens_for(config.id)[1:],
        health=health,
        url=url,
        tracker=tracker,
        source=source,
        hash_id=f"{config.id}\0".encode(),
    )
    _point(backend, url)
    return backend


def _point(backend: Backend, url: URL) -> None:
    """Everything a request to ``backend`` needs of its address, worked out once."""
    authority = authority_of(url)
    backend.url = url
    backend.base = f"{url.scheme}://{authority}{url.raw_path.rstrip('/')}"
    backend.host_header = authority.encode("idna" if not authority.isascii() else "ascii")
    backend.prefix = url.raw_path.rstrip("/").encode()
