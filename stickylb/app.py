"""Wiring: one ``Balancer`` built from a ``Config``, installed into an aiohttp application.

``build_app(config)`` gives a ready ``web.Application``; ``install(app, config)`` adds the
balancer to an application you already have (its routes catch every path not routed before).
Resources that live as long as the app (the upstream connection pools, the health checker,
the mail queue) are opened and closed in one ``cleanup_ctx``; nothing is module-level.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from .admin import AdminEndpoints
from .admission import Admission
from .affinity import StickyCookie
from .alerts import AlertMailer
from .config import Config, build_config
from .health import HealthChecker
from .pool import Pool
from .protocol_log import PROTOCOL_LOGGER
from .proxy import Forwarding, HttpProxy
from .upstream import Upstream, UpstreamSettings
from .websocket import WebSocketRelay


class Balancer:
    """All running pieces of one load balancer, created from its (frozen) config."""

    def __init__(self, config: Config, *, send_alerts: bool = True) -> None:
        self.config = config
        self.pool = Pool.from_config(config)
        self.cookie = StickyCookie(config.cookie)
        self._upstream: Upstream | None = None
        self._routes = -1  # how many routes the app had once it was installed alone
        self.admission = Admission(config.max_connections, config.max_queue, config.queue_timeout)
        self.pool.on_release = self.admission.wake
        forwarding = Forwarding(config, self.cookie)
        self.websockets = WebSocketRelay(config, self.pool, forwarding, self.upstream)
        self.proxy = HttpProxy(
            config, self.pool, forwarding, self.upstream, self.websockets, self.admission
        )
        self.admin = AdminEndpoints(config, self.pool)
        self.checker = HealthChecker(config, self.pool)
        self.alerts = AlertMailer(config, self.pool) if config.email and send_alerts else None

    def owns(self, app: web.Application) -> bool:
        """Whether ``app`` is this balancer alone (no routes, middlewares or response hooks of
        its own), so that ``front.py`` may serve its plain requests."""
        return (
            self._routes == len(app.router.resources())
            and not app.middlewares
            and not app.on_response_prepare
        )

    def upstream(self) -> Upstream:
        if self._upstream is None:
            raise RuntimeError("the balancer is not running (its app has not started)")
        return self._upstream

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        limits = self.config.limits
        self._upstream = Upstream(
            self.pool.backends,
            UpstreamSettings(
                connect_timeout=self.config.timeouts.connect,
                read_timeout=self.config.timeouts.read or None,
                max_line_size=max(limits.max_header_size * 2, 8190),
                max_field_size=limits.max_header_size * 2,
                max_headers=max(limits.max_headers * 2, 128),
                keep_alive=self.config.timeouts.backend_keep_alive,
            ),
        )
        if self.alerts is not None:
            await self.alerts.start()
        await self.checker.start()
        try:
            yield
        finally:
            await self.checker.stop()
            if self.alerts is not None:
                await self.alerts.stop()
            self._upstream.close()
            self._upstream = None

    async def on_shutdown(self, app: web.Application) -> None:
        await self.websockets.close_all()


BALANCER_KEY = web.AppKey("stickylb.balancer", Balancer)


def install(app: web.Application, config: Config, *, send_alerts: bool = True) -> Balancer:
    """Add a balancer for ``config`` to ``app``; routes added before it keep priority."""
    balancer = Balancer(config, send_alerts=send_alerts)
    app[BALANCER_KEY] = balancer
    alone = not app.router.resources()
    balancer.admin.routes(app)
    app.router.add_route("*", "/{tail:.*}", balancer.proxy.handle)
    if alone:
        balancer._routes = len(app.router.resources())
    app.cleanup_ctx.append(balancer.lifespan)
    app.on_shutdown.append(balancer.on_shutdown)
    return balancer


def build_app(config: Config | Mapping[str, Any], *, send_alerts: bool = True) -> web.Application:
    """A ``web.Application`` that is one load balancer.

    >>> app = build_app({"port": 0, "backends": [{"id": 0, "url": "http://127.0.0.1:5000"}]})
    >>> app[BALANCER_KEY].config.strategy
    'round-robin'
    """
    if not isinstance(config, Config):
        config = build_config(config)
    app = web.Application(handler_args=handler_args(config))
    install(app, config, send_alerts=send_alerts)
    return app


def handler_args(config: Config) -> dict[str, Any]:
    """Per-connection settings of aiohttp's server for this config (pass them when embedding)."""
    return {
        "auto_decompress": False,  # request bodies pass through exactly as the client sent them
        "max_field_size": config.limits.max_header_size,
        "max_line_size": max(config.limits.max_header_size, 8190),
        "max_headers": config.limits.max_headers,
        "keepalive_timeout": config.timeouts.keep_alive,
        "logger": PROTOCOL_LOGGER,
    }
