"""The balancer's own endpoints under ``admin.prefix`` (``/_lb`` by default).

``GET /_lb/health`` answers with the JSON of smart-stick-loadbalancer, extended with each
backend's state details. Access is limited to ``admin.allow`` networks or a bearer
``admin.token``; anyone else gets a 404, as if the path did not exist. Nothing under the prefix is
ever proxied, and no header value or secret is ever part of an answer.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

from aiohttp import hdrs, web

from .config import Config
from .headers import parse_networks, peer_in
from .pool import Backend, Pool


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


class AdminEndpoints:
    def __init__(self, config: Config, pool: Pool) -> None:
        self._config = config
        self._pool = pool
        self._allow = parse_networks(config.admin.allow)
        token = config.admin.token
        self._token = f"Bearer {token.get_secret_value()}".encode() if token else None

    def routes(self, app: web.Application) -> None:
        prefix = self._config.admin.prefix
        app.router.add_get(f"{prefix}/health", self.health, allow_head=True)
        app.router.add_route("*", f"{prefix}/{{tail:.*}}", self.not_found)
        app.router.add_route("*", prefix, self.not_found)

    def allowed(self, request: web.Request) -> bool:
        if peer_in(request.remote, self._allow):
            return True
        if self._token is None:
            return False
        offered = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "replace")
        return hmac.compare_digest(offered, self._token)

    async def health(self, request: web.Request) -> web.Response:
        if not self.allowed(request):
            raise web.HTTPNotFound()
        return web.json_response(
            health_payload(self._config, self._pool), headers={"Cache-Control": "no-store"}
        )

    async def not_found(self, request: web.Request) -> web.Response:
        raise web.HTTPNotFound()
