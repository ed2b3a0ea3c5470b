"""Wiring: one ``Balancer`` built from a ``Config``, and the ways to run it.

The config flows one way: ``Balancer`` reads it and builds the running pieces (the pool, the
request pipeline, the connections to each backend, the health checker, the mail queue, runtime
control); none of them looks at the config again. A reload is the same flow once more: the new
config goes to each piece through ``Balancer.apply``. ``start()`` and ``stop()`` open and close
what lives as long as the balancer; nothing is module-level.

Two ways to serve it, one pipeline: ``server.Server`` (what ``python -m stickylb`` and
``serve`` use) listens with stickylb's own wire protocol; ``install(app, config)`` /
``build_app(config)`` put the balancer inside an aiohttp application, whose requests reach the
same pipeline through ``embed.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from .admin import AdminAccess, AdminEndpoints
from .alerts import Alerts
from .cluster import Cluster
from .config import BackendConfig, Config, build_config
from .control import Control
from .core.admission import Admission
from .core.affinity import StickyCookie
from .core.affinity_sources import Sources
from .core.headers import Forwarding, parse_networks
from .core.pool import Backend, Pool
from .core.stats import Stats
from .events import Events
from .health import HealthChecker
from .pipeline import Internal, Pipeline, PipelineSettings
from .protocol_log import PROTOCOL_LOGGER
from .unavailable import UnavailableHandler, fixed_answer
from .wire.backend import Connections, ConnectionSettings, socketpair_opener, tcp_opener
from .wire.deadlines import Sweeper, period_for


class Balancer:
    """All running pieces of one load balancer, created from its (frozen) config.

    ``apply`` hands a new config to every piece (a reload); ``add_backend``, ``update_backend``
    and ``drop_backend`` change the set of backends (runtime control, ``control.py``).
    """

    def __init__(
        self,
        config: Config,
        *,
        send_alerts: bool = True,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.pool = Pool.from_config(config)
        self.cookie = StickyCookie(config.cookie)
        self.admission = Admission(config.max_connections, config.max_queue, config.queue_timeout)
        self.sweeper = Sweeper(shortest_timeout(config))
        self.connection_settings = connection_settings(config)
        for backend in self.pool.backends:
            self._connect(backend)
        self.access = AdminAccess(config)
        self.sources = Sources(config.affinity)
        self.stats = Stats()
        self.pipeline = Pipeline(
            pool=self.pool,
            cookie=self.cookie,
            admission=self.admission,
            sweeper=self.sweeper,
            settings=pipeline_settings(config, self.access, self.sources),
            stats=self.stats,
        )
        self.checker = HealthChecker(config, self.pool)
        self.send_alerts = send_alerts
        self.cluster: Cluster | None = None
        self.alerts = self._alerts(config)
        self.control = Control(self, loader)
        self.checker.on_agent = self.control.agent_says
        if config.cluster is not None:
            self.cluster = Cluster(self, config.cluster)
        self.events = Events(self)
        self.admin = AdminEndpoints(self)
        # Told of every new config after the balancer's own pieces took it (the server's
        # client-side limits and timeouts).
        self.reconfigured: list[Callable[[Config], None]] = []
        self._runners: list[web.AppRunner] = []
        self.listening: list[str] = []  # where the server listens (its addresses), once it does

    @property
    def checking(self) -> bool:
        """Whether health checks run (then a backend added while running waits for one)."""
        return self.config.health.enabled

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
        self.control.start()
        if self.cluster is not None:
            self.cluster.start()
        self.events.start()
        await self.checker.start()

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
        await self.events.stop()
        await self.control.stop()
        await self.checker.stop()
        if self.alerts is not None:
            await self.alerts.stop()
        self.pipeline.close_tunnels()
        for backend in self.pool.backends:
            backend.connections.close()
        for link in (self.pipeline.admin_link, self.pipeline.unavailable_link):
            if link is not None:
                link.connections.close()
        self.pipeline.admin_link = self.pipeline.unavailable_link = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.sweeper.stop()

    # --- a new config (reload) ---------------------------------------------------------------

    async def apply(self, config: Config) -> None:
        """Every setting of ``config`` except the backends list (``Control.reload`` does that)
        takes effect now; requests in flight finish as they began."""
        old, self.config = self.config, config
        if config.cookie != old.cookie:
            self.cookie = StickyCookie(config.cookie)
            self.pool.retoken(self.cookie)
        self.pool.configure(config)
        self.admission.configure(config.max_connections, config.max_queue, config.queue_timeout)
        self.sweeper.period = period_for(shortest_timeout(config))
        self.connection_settings = connection_settings(config)
        for backend in self.pool.backends:
            backend.connections.settings = self.connection_settings
        for link in (self.pipeline.admin_link, self.pipeline.unavailable_link):
            if link is not None:
                link.connections.settings = self.connection_settings
        self.access = AdminAccess(config)
        # What was learned of application sessions stays, whatever else changed.
        self.sources = Sources(config.affinity, self.sources.learned)
        self.pipeline.configure(self.cookie, pipeline_settings(config, self.access, self.sources))
        self.checker.configure(config)
        if (config.email, config.webhooks, config.port) != (old.email, old.webhooks, old.port):
            if self.alerts is not None:
                await self.alerts.stop()
            self.alerts = self._alerts(config)
            if self.alerts is not None:
                await self.alerts.start()
        for listener in self.reconfigured:
            listener(config)

    def _alerts(self, config: Config) -> Alerts | None:
        if not self.send_alerts or (config.email is None and not config.webhooks):
            return None
        alerts = Alerts(config, self.pool, self.stats)
        alerts.on_result = lambda channel, result, what: self.events.publish(
            {"type": "alert", "channel": channel, "result": result, "what": what}
        )
        alerts.leading = self._leading
        return alerts

    def _leading(self) -> bool:
        """Whether this balancer sends the alerts: always, except in a cluster (the lease's)."""
        return self.cluster is None or self.cluster.leader

    # --- the set of backends (runtime control) ---------------------------------------------------

    def add_backend(self, backend: Backend) -> None:
        self._connect(backend)
        self.pipeline.dress(backend)
        self.pool.add(backend)
        self.checker.watch(backend)

    def update_backend(self, backend: Backend, config: BackendConfig) -> None:
        moved = config.url != backend.config.url
        self.pool.update(backend, config, self.config.health_for(config))
        if moved:  # requests in flight finish on the old address; new ones go to the new one
            backend.connections.retire()
            self._connect(backend)
            self.checker.watch(backend)  # checked at once, at its new address

    def drop_backend(self, backend: Backend) -> None:
        self.checker.unwatch(backend)
        self.pool.remove(backend)
        backend.connections.retire()

    def _connect(self, backend: Backend) -> None:
        url = backend.url
        backend.connections = Connections(
            f"backend {backend.id}",
            tcp_opener(url.raw_host or "", url.port or 80, url.scheme == "https"),
            self.connection_settings,
            self.sweeper,
        )

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


def shortest_timeout(config: Config) -> float:
    timeouts = config.timeouts
    values = (
        timeouts.connect,
        timeouts.read,
        timeouts.keep_alive,
        timeouts.head,
        timeouts.client_body,
        timeouts.backend_keep_alive,
        timeouts.websocket_idle,
    )
    return min((value for value in values if value > 0), default=1.0)


def connection_settings(config: Config) -> ConnectionSettings:
    timeouts, limits = config.timeouts, config.limits
    return ConnectionSettings(
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read or None,
        keep_alive=timeouts.backend_keep_alive,
        max_idle=limits.max_idle_per_backend,
        max_head=limits.max_head_size,
    )


def pipeline_settings(config: Config, access: AdminAccess, sources: Sources) -> PipelineSettings:
    return PipelineSettings(
        sticky=config.sticky,
        backend_header=config.backend_header,
        forwarding=Forwarding(
            preserve_host=config.preserve_host,
            trusted_proxies=parse_networks(config.trusted_proxies),
        ),
        retries=config.retries,
        max_body=config.limits.max_body_size,
        max_message=config.websocket.max_message_size,
        websocket_idle=config.timeouts.websocket_idle,
        admin_prefix=config.admin.prefix,
        admin_allowed=access,
        unavailable=fixed_answer(config.unavailable),
        keep_backend_connections=config.timeouts.backend_keep_alive > 0,
        request_id_header=config.request_id_header,
        sources=sources if config.affinity.sources else None,
        fail_closed=sources.fail_closed,
    )


BALANCER_KEY = web.AppKey("stickylb.balancer", Balancer)


def install(app: web.Application, config: Config, *, send_alerts: bool = True) -> Balancer:
    """Add a balancer for ``config`` to ``app``; routes added before it keep priority."""
    from .embed import handler

    balancer = Balancer(config, send_alerts=send_alerts)
    app[BALANCER_KEY] = balancer
    balancer.admin.routes(app, config.admin.prefix, check_access=True)
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
