"""Wiring: one ``Balancer`` built from a ``Config``, and the ways to run it.

The config flows one way: ``Balancer`` reads it once and builds the running pieces (the pool,
the request pipeline, the connections to each backend, the health checker, the mail queue);
none of them looks at the config again. ``start()`` and ``stop()`` open and close what lives as
long as the balancer; nothing is module-level.

Two ways to serve it, one pipeline: ``server.Server`` (what ``python -m stickylb`` and
``serve`` use) listens with stickylb's own wire protocol; ``install(app, config)`` /
``build_app(config)`` put the balancer inside an aiohttp application, whose requests reach the
same pipeline through ``embed.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from .admin import AdminAccess, AdminEndpoints
from .alerts import AlertMailer
from .config import Config, build_config
from .core.admission import Admission
from .core.affinity import StickyCookie
from .core.headers import Forwarding, parse_networks
from .core.pool import Pool
from .health import HealthChecker
from .pipeline import Internal, Pipeline
from .protocol_log import PROTOCOL_LOGGER
from .unavailable import UnavailableHandler, fixed_answer
from .wire.backend import Connections, ConnectionSettings, socketpair_opener, tcp_opener
from .wire.deadlines import Sweeper


class Balancer:
    """All running pieces of one load balancer, created from its (frozen) config."""

    def __init__(self, config: Config, *, send_alerts: bool = True) -> None:
        self.config = config
        self.pool = Pool.from_config(config)
        self.cookie = StickyCookie(config.cookie)
        self.admission = Admission(config.max_connections, config.max_queue, config.queue_timeout)
        timeouts, limits = config.timeouts, config.limits
        self.sweeper = Sweeper(
            min(
                (
                    value
                    for value in (
                        timeouts.connect,
                        timeouts.read,
                        timeouts.keep_alive,
                        timeouts.head,
                        timeouts.client_body,
                        timeouts.backend_keep_alive,
                        timeouts.websocket_idle,
                    )
                    if value > 0
                ),
                default=1.0,
            )
        )
        self.connection_settings = ConnectionSettings(
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read or None,
            keep_alive=timeouts.backend_keep_alive,
            max_idle=limits.max_idle_per_backend,
            max_head=limits.max_head_size,
        )
        self.connections = {
            backend.key: Connections(
                f"backend {backend.id}",
                tcp_opener(
                    backend.url.raw_host or "",
                    backend.url.port or 80,
                    backend.url.scheme == "https",
                ),
                self.connection_settings,
                self.sweeper,
            )
            for backend in self.pool.backends
        }
        self.access = AdminAccess(config)
        self.admin = AdminEndpoints(config, self.pool, self.access)
        self.pipeline = Pipeline(
            pool=self.pool,
            cookie=self.cookie,
            admission=self.admission,
            connections=self.connections,
            sweeper=self.sweeper,
            sticky=config.sticky,
            backend_header=config.backend_header,
            forwarding=Forwarding(
                preserve_host=config.preserve_host,
                trusted_proxies=parse_networks(config.trusted_proxies),
            ),
            retries=config.retries,
            max_body=limits.max_body_size,
            max_message=config.websocket.max_message_size,
            websocket_idle=timeouts.websocket_idle,
            admin_prefix=config.admin.prefix,
            admin_allowed=self.access,
            unavailable=fixed_answer(config.unavailable),
            keep_backend_connections=timeouts.backend_keep_alive > 0,
        )
        self.checker = HealthChecker(config, self.pool)
        self.alerts = AlertMailer(config, self.pool) if config.email and send_alerts else None
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        """Open what lives as long as the balancer: timers, its own endpoints, checks, mail."""
        self.sweeper.start()
        self.pipeline.admin_link = await self._internal("the admin endpoints", self.admin.app())
        unavailable = self.config.unavailable
        if unavailable is not None and unavailable.handler is not None:
            app = UnavailableHandler(unavailable).app()
            self.pipeline.unavailable_link = await self._internal("unavailable.handler", app)
        if self.alerts is not None:
            await self.alerts.start()
        await self.checker.start()

    async def stop(self) -> None:
        await self.checker.stop()
        if self.alerts is not None:
            await self.alerts.stop()
        self.pipeline.close_tunnels()
        for connections in self.connections.values():
            connections.close()
        for link in (self.pipeline.admin_link, self.pipeline.unavailable_link):
            if link is not None:
                link.connections.close()
        self.pipeline.admin_link = self.pipeline.unavailable_link = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.sweeper.stop()

    async def _internal(self, name: str, app: web.Application) -> Internal:
        """Serve ``app`` in-process; the pipeline reaches it over socket pairs."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        server = runner.server
        assert server is not None
        opener = socketpair_opener(server)
        return Internal(name, Connections(name, opener, self.connection_settings, self.sweeper))

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx`` when the balancer runs inside an aiohttp application."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()


BALANCER_KEY = web.AppKey("stickylb.balancer", Balancer)


def install(app: web.Application, config: Config, *, send_alerts: bool = True) -> Balancer:
    """Add a balancer for ``config`` to ``app``; routes added before it keep priority."""
    from .embed import handler

    balancer = Balancer(config, send_alerts=send_alerts)
    app[BALANCER_KEY] = balancer
    balancer.admin.routes(app, check_access=True)
    app.router.add_route("*", "/{tail:.*}", handler(balancer.pipeline))
    app.cleanup_ctx.append(balancer.lifespan)
    return balancer


def build_app(config: Config | Mapping[str, Any], *, send_alerts: bool = True) -> web.Application:
    """A ``web.Application`` that is one load balancer (served by aiohttp; ``serve`` serves the
    same balancer with stickylb's own protocol, which is faster).

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
        "max_line_size": config.limits.max_header_size,
        "max_headers": config.limits.max_headers,
        "keepalive_timeout": config.timeouts.keep_alive,
        "logger": PROTOCOL_LOGGER,
    }
