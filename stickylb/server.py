"""Lifecycle: listen, run until SIGTERM/SIGINT, then shut down gracefully.

On the first signal the listening socket closes, idle keep-alive connections are dropped,
open WebSockets get 1001 (going away), and in-flight requests get up to ``shutdownTimeout`` to
finish; then health checks and the mail queue stop and the process exits 0. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .app import BALANCER_KEY, build_app
from .config import Config
from .front import FrontRunner

log = logging.getLogger("stickylb")

EXIT_AT_ONCE = 130
GC_GEN0_THRESHOLD = 20_000


class StartupError(Exception):
    """The balancer could not start; the message is one line for the operator."""


def runner_for(app: web.Application, config: Config, **extra: Any) -> web.AppRunner:
    return FrontRunner(
        app,
        handle_signals=False,
        access_log=extra.pop("access_log", None),
        handler_cancellation=True,  # a client that goes away releases its backend at once
        shutdown_timeout=config.shutdown_timeout,
        **extra,
    )


async def serve(
    config: Config,
    app: web.Application | None = None,
    *,
    access_log: logging.Logger | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Run the balancer until SIGTERM or SIGINT (on ``sock`` when given, as workers do)."""
    app = app if app is not None else build_app(config)
    runner = runner_for(app, config, access_log=access_log)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {config.port} on {config.host} is already in use") from None
        raise StartupError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
        ) from None

    # Everything built so far lives as long as the process: keep it out of every GC pass, and
    # collect young objects less often (a request allocates many short-lived ones).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    addresses = [_address(sock.getsockname()) for sock in _sockets(site)]
    balancer = app[BALANCER_KEY]
    log.info(
        "stickylb listening on %s (strategy %s, %d backends)",
        ", ".join(addresses),
        config.strategy,
        len(balancer.pool.backends),
    )
    if on_ready is not None:
        on_ready(addresses)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

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

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stickylb stopped")


def _sockets(site: web.BaseSite) -> list[Any]:
    server = site._server  # aiohttp exposes no public accessor for the bound sockets
    return list(getattr(server, "sockets", None) or [])


def _address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
