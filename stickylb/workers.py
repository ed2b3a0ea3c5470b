"""``--workers N``: N balancer processes sharing one listening socket.

The parent binds the socket, forks N children (before any event loop or thread exists), and
supervises them: a worker that dies is replaced; SIGTERM/SIGINT are passed on, and the parent
exits once every worker has stopped. A second signal is passed on too, so workers exit at once.
SIGHUP is passed on: every worker reloads its config.

Each worker is a complete balancer with its own connection counts, health checks and
passive-failure view. Stickiness holds across workers because the cookie alone names the
backend. Runtime changes made through one worker's API reach the others through the
supervisor, which also gives each worker the others' connection counts (``group.py``). Alert
mail is sent by worker 0 only, so owners get one mail per change, not N. With ``cluster`` each
worker is an instance of the cluster instead, and the alerting lease picks the sender.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

from .config import Config
from .group import Hub
from .server import listening_sockets

log = logging.getLogger("stickylb")

RESTART_BACKOFF = 1.0
POLL_SECONDS = 0.1


def run_workers(
    count: int,
    config: Config,
    run_worker: Callable[[int, list[socket.socket], socket.socket], int],
) -> int:
    """Fork ``count`` workers running ``run_worker(index, sockets, channel)``; return the exit
    status."""
    sockets = listening_sockets(config.host, config.port)
    host, port = sockets[0].getsockname()[:2]
    log.info(
        "stickylb listening on http://%s:%d with %d workers",
        f"[{host}]" if ":" in host else host,
        port,
        count,
    )
    children: dict[int, int] = {}  # pid -> worker index
    hub = Hub()
    signals_seen = 0

    def spawn(index: int) -> None:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            ours.close()
            hub.close_in_child()  # the other workers' channels are not this worker's business
            status = 1
            try:
                status = run_worker(index, sockets, theirs)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        theirs.close()
        hub.join(index, ours)
        children[pid] = index

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals_seen
        if signum != signal.SIGHUP:
            signals_seen += 1
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for index in range(count):
        spawn(index)
    worst = 0
    while children:
        hub.poll(POLL_SECONDS)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            if pid not in children:
                continue
            index = children.pop(pid)
            hub.leave(index)
            code = os.waitstatus_to_exitcode(status)
            if signals_seen:
                worst = max(worst, code)
                continue
            log.warning("worker %d (pid %d) exited with %d; starting a new one", index, pid, code)
            time.sleep(RESTART_BACKOFF)
            spawn(index)
    hub.close()
    for sock in sockets:
        sock.close()
    log.info("stickylb stopped (%d workers)", count)
    return worst
