"""The balancer's own endpoints under ``admin.prefix`` (``/_lb`` by default), as an aiohttp app.

``GET /_lb/health`` answers with the JSON of smart-stick-loadbalancer, extended with each
backend's state details. Access is limited to ``admin.allow`` networks or a bearer
``admin.token``; anyone else gets a 404, as if the path did not exist. Nothing under the prefix is
ever proxied, and no header value or secret is ever part of an answer.

The endpoints are an ordinary ``web.Application``. ``python -m stickylb`` serves it in-process
through aiohttp's public API: the request pipeline checks access, then sends the request to the
app's ``web.Server`` over a socket pair (``wire.backend.socketpair_opener``), exactly as it would
to a backend. An embedding application gets the same routes added to it (``install``), and then
the routes check access themselves.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import hdrs, web

from .config import Config
from .core.headers import parse_networks, peer_in
from .core.pool import Backend, Pool


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def backend_status(backend: Backend) -> dict[str, Any]:
    tracker = backend.tracker
    return {
        "id": backend.id,
        "url": backend.config.url,
        "healthy": backend.healthy,
        "state": "up" if backend.healthy else "down",
        "weight": int(backend.weight) if backend.weight.is_integer() else backend.weight,
        "requests": backend.requests,
        "activeConnections": backend.active,
        "maxConnections": backend.config.max_connections,
        "lastChecked": iso(backend.last_checked),
        "lastChange": iso(backend.last_change),
        "lastFailureReason": tracker.last_reason,
        "consecutiveSuccesses": tracker.successes,
        "consecutiveFailures": tracker.failures,
        "healthCheck": backend.health.public(),
    }


def health_payload(config: Config, pool: Pool) -> dict[str, Any]:
    healthy, unhealthy = pool.counts()
    return {
        "timestamp": iso(datetime.now(UTC).timestamp()),
        "strategy": config.strategy,
        "total": len(pool.backends),
        "healthy": healthy,
        "unhealthy": unhealthy,
        "backends": [backend_status(backend) for backend in pool.backends],
    }


class AdminAccess:
    """Who may see the endpoints: a peer in ``admin.allow``, or one with the bearer token."""

    def __init__(self, config: Config) -> None:
        self._allow = parse_networks(config.admin.allow)
        token = config.admin.token
        self._token = f"Bearer {token.get_secret_value()}".encode() if token else None

    def __call__(self, peer: str | None, authorization: bytes | str | None) -> bool:
        if peer_in(peer, self._allow):
            return True
        if self._token is None or authorization is None:
            return False
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(authorization, self._token)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminEndpoints:
    def __init__(self, config: Config, pool: Pool, access: AdminAccess) -> None:
        self._config = config
        self._pool = pool
        self._access = access

    def routes(self, app: web.Application, *, check_access: bool) -> None:
        """Add the endpoints to ``app``; ``check_access`` when nothing in front checked it."""
        prefix = self._config.admin.prefix
        guard = self._guarded if check_access else _unguarded
        app.router.add_get(f"{prefix}/health", guard(self.health), allow_head=True)
        app.router.add_route("*", f"{prefix}/{{tail:.*}}", self.not_found)
        app.router.add_route("*", prefix, self.not_found)

    def app(self) -> web.Application:
        """The endpoints alone, for the request pipeline (which has checked access)."""
        app = web.Application()
        self.routes(app, check_access=False)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    def allowed(self, request: web.Request) -> bool:
        return self._access(request.remote, request.headers.get(hdrs.AUTHORIZATION))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.allowed(request):
                return await self.not_found(request)
            return await handler(request)

        return guarded

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            health_payload(self._config, self._pool), headers={"Cache-Control": "no-store"}
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "Not found."}, status=404)


def _unguarded(handler: Handler) -> Handler:
    return handler
