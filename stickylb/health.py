"""Theory of operation: active health checks, one independent loop per backend.

Each backend gets its own task, so a backend that hangs until its timeout never delays the
checks of another. Every loop checks at once on startup, then sleeps ``health.interval``
(``health.downInterval`` while the backend is down), stretched or shrunk by a random
``health.jitter`` so checks of many backends do not fire in lock-step.

A probe is either the backend's custom callable or an HTTP request judged by its
``ResponseRule``; its verdict goes to ``Pool.record_check``, where rise/fall decide the state.
The checker has its own client session: its connections never mix with the proxy's pool.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from .config import Config, HealthCallable, HealthSettings
from .core.pool import Backend, Pool
from .durations import format_ms
from .tasks import cancel
from .wire.backend import CONNECT_ERRNOS

log = logging.getLogger("stickylb.health")

_MAX_BODY = 64 * 1024  # what expectBody looks at


@dataclass(frozen=True, slots=True)
class BackendView:
    """What a custom check callable sees of a backend: read-only, no runtime counters."""

    id: int | str
    url: str
    weight: float
    owner: str | None
    path: str
    method: str
    timeout: float  # seconds
    headers: Mapping[str, str]

    @property
    def health_url(self) -> str:
        return self.url + self.path


def probe_failure(exc: BaseException, timeout: float) -> str:
    """A short, secret-free reason for a failed HTTP probe."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | TimeoutError):
        return f"timeout after {format_ms(timeout)} ms"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, socket.gaierror):
            return f"DNS lookup failed for {exc.host}"
        return CONNECT_ERRNOS.get(exc.os_error.errno or 0, "connect failed")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "backend closed the connection"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid HTTP response"
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return "connection reset"
    return type(exc).__name__


def _wants_session(check: HealthCallable) -> bool:
    """Checks written for smart-stick-loadbalancer take one argument; ours may take two."""
    try:
        parameters = inspect.signature(check).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


class HealthChecker:
    def __init__(self, config: Config, pool: Pool) -> None:
        self._config = config.health
        self._pool = pool
        self._tasks: dict[Backend, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self._running = False
        # Told when a check's answer carries the agent header (``health.agentHeader``).
        self.on_agent: Callable[[Backend, str], None] = lambda backend, value: None

    async def start(self) -> None:
        self._running = True
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
        )
        for backend in self._pool.backends:
            self.watch(backend)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel(*tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def configure(self, config: Config) -> None:
        """A reload: new settings apply from each backend's next check; turning checks off
        or on stops or starts the loops."""
        self._config = config.health
        if self._config.enabled:
            for backend in self._pool.backends:
                if backend not in self._tasks:
                    self.watch(backend)
        else:
            for backend in list(self._tasks):
                self.unwatch(backend)

    def watch(self, backend: Backend) -> None:
        """Check ``backend`` from now on, the first time at once (again, if it was watched)."""
        if not self._running or not self._config.enabled:
            return
        self.unwatch(backend)
        self._tasks[backend] = asyncio.create_task(
            self._loop(backend), name=f"stickylb-health-{backend.id}"
        )

    def unwatch(self, backend: Backend) -> None:
        task = self._tasks.pop(backend, None)
        if task is not None:
            task.cancel()

    async def _loop(self, backend: Backend) -> None:
        while True:
            try:
                ok, reason = await self.probe(backend)
            except Exception:  # a bug in a probe must never end the loop
                log.exception("health check of backend %s crashed", backend.id)
                ok, reason = False, "health check crashed"
            log.debug("backend %s check: %s", backend.id, "ok" if ok else reason)
            self._pool.record_check(backend, ok, reason)
            await asyncio.sleep(self._next_delay(backend))

    def _next_delay(self, backend: Backend) -> float:
        interval = self._config.interval
        if not backend.healthy and self._config.down_interval:
            interval = self._config.down_interval
        jitter = self._config.jitter
        return interval * self._rng.uniform(1 - jitter, 1 + jitter)

    async def probe(self, backend: Backend) -> tuple[bool, str | None]:
        """Run one check of ``backend``; returns (healthy, reason when not)."""
        settings = backend.health
        if settings.check is not None:
            return await self._call_check(backend, settings, settings.check)
        return await self._http_probe(backend, settings)

    async def _http_probe(
        self, backend: Backend, settings: HealthSettings
    ) -> tuple[bool, str | None]:
        assert self._session is not None
        path = settings.path if settings.path.startswith("/") else "/" + settings.path
        try:
            async with self._session.request(
                settings.method,
                backend.base + path,
                headers=dict(settings.headers),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=settings.timeout),
            ) as response:
                body = ""
                if settings.rule.needs_body:
                    raw = await response.content.read(_MAX_BODY)
                    body = raw.decode("utf-8", "replace")
                reason = settings.rule.judge(response.status, body)
                agent = self._config.agent_header
                if agent and agent in response.headers:
                    self.on_agent(backend, response.headers[agent])
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return False, probe_failure(exc, settings.timeout)
        return reason is None, reason

    async def _call_check(
        self, backend: Backend, settings: HealthSettings, check: HealthCallable
    ) -> tuple[bool, str | None]:
        assert self._session is not None
        view = BackendView(
            id=backend.id,
            url=backend.config.url,
            weight=backend.weight,
            owner=backend.config.owner,
            path=settings.path,
            method=settings.method,
            timeout=settings.timeout,
            headers=settings.headers,
        )
        args: tuple[Any, ...] = (view, self._session) if _wants_session(check) else (view,)
        try:
            async with asyncio.timeout(settings.timeout):
                if inspect.iscoroutinefunction(check):
                    result = await check(*args)
                else:
                    # Sync callables run in a thread so a slow one never stalls proxying.
                    result = await asyncio.to_thread(check, *args)
                if inspect.isawaitable(result):
                    result = await result
        except TimeoutError:
            return False, f"timeout after {format_ms(settings.timeout)} ms"
        except Exception as exc:
            return False, f"check raised {type(exc).__name__}"
        if result:
            return True, None
        return False, f"check returned {result!r}"[:80]
