"""Lifecycle: listen with stickylb's own protocol, run until SIGTERM/SIGINT, stop gracefully.

``Server`` listens for one ``Balancer``: every accepted connection gets a
``wire.client.ClientConnection``, and every request it reads goes through the balancer's
pipeline. The listening sockets are stickylb's own (bound here, or handed over by
``--workers``), and so is accepting (``Acceptor``: the loop's ``add_reader`` and
``connect_accepted_socket``), so that running out of file descriptors is handled the same way
on every loop: accepting pauses for a second, with one log line, and the connections that
arrive meanwhile wait in the kernel's backlog instead of being taken only to fail. A request
that could not get a socket to its backend pauses accepting the same way.

On the first SIGTERM or SIGINT the listening sockets close, idle keep-alive connections are
dropped, open WebSockets get 1001 (going away) at once, or 1012 spread over
``websocket.drainTimeout`` when that is set, and in-flight requests get up to
``shutdownTimeout`` to finish; then health checks and the mail queue stop and the process exits
0. A second signal exits at once. SIGHUP reloads the config file (``control.py``) and drops
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .access_log import AccessLog
from .app import Balancer
from .config import Config
from .control import ControlError
from .tls import HANDSHAKE_TIMEOUT, redirect_app, server_context
from .wire.client import Front, FrontLimits

log = logging.getLogger("stickylb")

EXIT_AT_ONCE = 130
GC_GEN0_THRESHOLD = 20_000
BACKLOG = 1024
ACCEPT_PAUSE = 1.0  # seconds without accepting after running out of file descriptors
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class StartupError(Exception):
    """The balancer could not start; the message is one line for the operator."""


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port`` (every address the host resolves to)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Accepts connections on one listening socket and gives each a protocol."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        server: Server,
    ) -> None:
        self._sock = sock
        self._factory = factory
        self._listener = server  # told when out of file descriptors, and when that is over
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._handshakes: set[asyncio.Task[None]] = set()
        self.tls: ssl.SSLContext | None = None  # HTTPS: each new connection's handshake

    def start(self) -> None:
        if not self._reading and self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._ready)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _ready(self) -> None:
        for _ in range(BACKLOG):  # what is waiting, in one go; the loop gets its turn after
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._listener.pause_accepting(exc.strerror or "out of resources")
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we took it
                raise
            conn.setblocking(False)
            if self._listener.starved:
                self._listener.accepting_again()
            task = self._loop.create_task(self._connect(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            if self.tls is None:
                await self._loop.connect_accepted_socket(self._factory, conn)
            else:
                await self._loop.connect_accepted_socket(
                    self._factory, conn, ssl=self.tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
                )
        except OSError:  # a client that left, or failed its TLS handshake (ssl.SSLError)
            conn.close()


class Server:
    """One balancer listening with stickylb's wire protocol.

    >>> # as ``serve`` does, or next to other things on one event loop:
    >>> # server = Server(config); await server.start(); ...; await server.stop()
    """

    def __init__(
        self,
        config: Config,
        balancer: Balancer | None = None,
        *,
        access_log: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.balancer = balancer if balancer is not None else Balancer(config)
        self.front = Front(
            self.balancer.pipeline.exchange,
            self.balancer.sweeper,
            front_limits(config),
            scheme=b"https" if config.tls is not None else b"http",
            access_log=access_log_for(config, access_log),
            stats=self.balancer.stats,
        )
        self.balancer.pipeline.on_local_error = self.pause_accepting
        self.balancer.reconfigured.append(self._reconfigure)
        self.starved = False  # out of file descriptors since the last accept that worked
        self._sockets: list[socket.socket] = []
        self._acceptors: list[Acceptor] = []
        self._resume: asyncio.TimerHandle | None = None
        self._stopping = False
        self._redirect: web.AppRunner | None = None

    def _reconfigure(self, config: Config) -> None:
        """A reload: new limits and timeouts for the connections' next requests."""
        self.config = config
        self.front.configure(front_limits(config))
        if config.tls is not None:  # new handshakes get the new certificate; open ones keep theirs
            context = server_context(config.tls)
            for acceptor in self._acceptors:
                if acceptor.tls is not None:
                    acceptor.tls = context

    @property
    def addresses(self) -> list[str]:
        scheme = "https" if self.config.tls is not None else "http"
        return [_address(sock.getsockname(), scheme) for sock in self._sockets]

    async def start(self, sockets: list[socket.socket] | None = None) -> list[str]:
        """Start the balancer and listen (on ``sockets`` when given, as workers do)."""
        config = self.config
        if sockets:
            for sock in sockets:
                sock.setblocking(False)
            self._sockets = list(sockets)
        else:
            try:
                self._sockets = listening_sockets(config.host, config.port)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"port {config.port} on {config.host} is already in use"
                    ) from None
                raise StartupError(
                    f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
                ) from None
        access_log = self.front.access_log
        if access_log is not None and access_log.writer is not None:
            try:
                access_log.writer.start()
            except OSError as exc:
                raise StartupError(
                    f"accessLog.path: cannot open {config.access_log.path}: {exc.strerror}"
                ) from None
        self.balancer.listening = self.addresses
        await self.balancer.start()
        self._acceptors = [Acceptor(sock, self.front, self) for sock in self._sockets]
        context = server_context(config.tls) if config.tls is not None else None
        for acceptor in self._acceptors:
            acceptor.tls = context
            acceptor.start()
        if config.tls is not None and config.tls.redirect_http_port is not None:
            await self._start_redirect(config.tls.redirect_http_port)
        return self.addresses

    async def _start_redirect(self, port: int) -> None:
        """``tls.redirectHttpPort``: plain HTTP there answers 308 to HTTPS."""
        https_port = self._sockets[0].getsockname()[1]
        runner = web.AppRunner(redirect_app(https_port), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            # reuse_port: with --workers, every worker listens there too
            await web.TCPSite(runner, self.config.host or None, port, reuse_port=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"tls.redirectHttpPort {port}: {exc.strerror}") from None
        self._redirect = runner

    def pause_accepting(self, why: str = "out of file descriptors") -> None:
        """Out of file descriptors: stop accepting for a moment (new connections wait in the
        kernel's backlog) rather than take them only to fail their requests."""
        if self._resume is not None or self._stopping:
            return
        if not self.starved:  # one line when it starts, one when it is over
            self.starved = True
            log.warning("%s: accepting paused, retried every %gs", why, ACCEPT_PAUSE)
        for acceptor in self._acceptors:
            acceptor.pause()
        self._resume = asyncio.get_running_loop().call_later(ACCEPT_PAUSE, self._resume_accepting)

    def accepting_again(self) -> None:
        self.starved = False
        log.info("accepting connections again")

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._stopping:
            for acceptor in self._acceptors:
                acceptor.start()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, end idle connections and tunnels, give in-flight requests up to
        ``grace`` seconds (``shutdownTimeout``), then stop the balancer."""
        self._stopping = True
        if self._resume is not None:
            self._resume.cancel()
        for acceptor in self._acceptors:
            acceptor.pause()
        for sock in self._sockets:
            sock.close()
        if self._redirect is not None:
            await self._redirect.cleanup()
            self._redirect = None
        front = self.front
        front.close_idle()
        self.balancer.events.close()  # event streams end now; nobody waits for a dashboard
        pipeline = self.balancer.pipeline
        limit = self.config.shutdown_timeout if grace is None else grace
        within = self.config.websocket.drain_timeout
        if within is None:
            pipeline.close_tunnels()
        else:  # 1012 spread over drainTimeout (within the grace), so clients come back gently
            pipeline.close_tunnels_spread(pipeline.tunnels_of(), min(within, limit) * 0.9, 1012)
        try:
            async with asyncio.timeout(limit):
                await front.drained()
                await pipeline.tunnels_closed()
        except TimeoutError:
            log.warning("shutdown: %d request(s) cut after %gs", len(front.connections), limit)
        for connection in list(front.connections):
            if connection.transport is not None:
                connection.transport.abort()
        await asyncio.sleep(0)
        await self.balancer.stop()
        access_log = self.front.access_log
        if access_log is not None and access_log.writer is not None:
            await access_log.writer.stop()


def access_log_for(config: Config, logger: logging.Logger | None) -> AccessLog | None:
    """The access log: to ``logger`` when one is given, else as ``accessLog`` says."""
    settings = config.access_log
    if logger is not None:
        return AccessLog.to_logger(logger, settings.format)
    if settings.enabled:
        return AccessLog.to_path(settings.path, settings.format)
    return None


def front_limits(config: Config) -> FrontLimits:
    timeouts, limits = config.timeouts, config.limits
    return FrontLimits(
        max_head=limits.max_head_size,
        max_line=limits.max_header_size,
        max_headers=limits.max_headers,
        head_timeout=timeouts.head,
        keep_alive=timeouts.keep_alive,
        body_timeout=timeouts.client_body,
        send_timeout=timeouts.read,
    )


async def serve(
    config: Config,
    balancer: Balancer | None = None,
    *,
    access_log: logging.Logger | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Run the balancer until SIGTERM or SIGINT (on ``sockets`` when given, as workers do);
    SIGHUP reloads the config file (when the balancer was given a ``loader``)."""
    loop = asyncio.get_running_loop()
    server = Server(config, balancer, access_log=access_log)
    addresses = await server.start(sockets)
    # Everything built so far lives as long as the process: keep it out of every GC pass, and
    # collect young objects less often (a request allocates many short-lived ones).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    log.info(
        "stickylb listening on %s (strategy %s, %d backend%s)",
        ", ".join(addresses),
        config.strategy,
        len(server.balancer.pool.backends),
        "" if len(server.balancer.pool.backends) == 1 else "s",
    )
    if on_ready is not None:
        on_ready(addresses)

    stop = asyncio.Event()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            log.warning("second %s: exiting at once", signame)
            os._exit(EXIT_AT_ONCE)
        log.info(
            "%s received: shutting down (up to %gs for in-flight requests)",
            signame,
            config.shutdown_timeout,
        )
        stop.set()

    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        log.info("SIGHUP received: reloading the config")
        task = loop.create_task(reload(server.balancer))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await stop.wait()
    finally:
        try:
            await server.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    log.info("stickylb stopped")


async def reload(balancer: Balancer) -> None:
    """What SIGHUP does: an error is logged (by ``Control.reload``) and the old config stays."""
    # Not passed on to other workers: the supervisor sends each of them the signal itself.
    with contextlib.suppress(ControlError):
        await balancer.control.execute({"op": "reload"}, by="SIGHUP", local=False)


def _address(sockname: Any, scheme: str = "http") -> str:
    host, port = sockname[0], sockname[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"
