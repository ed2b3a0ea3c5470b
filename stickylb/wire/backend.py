"""Theory of operation: connections to one backend, and the pool that owns them.

``BackendConnection`` is the protocol of one connection: it writes one request at a time and
parses the answer with httptools' response parser (llhttp, through its public callback API),
handing each event to the exchange that leased it (``Exchange`` below). ``Connections`` owns a
backend's connections: it opens them, keeps idle ones for reuse, and closes them.

Invariants this module owns:
- A connection serves one exchange at a time; it is leased by ``take`` or ``open`` and comes
  back through ``release``, which keeps it only when the exchange ended cleanly on both sides
  (the request all written, the answer all read, and nothing after it). Two requests' bytes
  never share a connection's stream.
- An idle connection must stay silent: any byte from the backend (an unsolicited answer, which
  would otherwise be served to the next, unrelated client) or its half-close closes it for
  good. Reuse is last in, first out, at most ``maxIdlePerBackend`` connections wait, and one
  idle for ``timeouts.backendKeepAlive`` is closed.
- Events reach the exchange in order: ``response_head``, then ``response_body`` pieces as they
  arrive, then ``response_end`` (or ``response_upgrade`` after a 101, or one
  ``backend_failed``). ``response_end`` is always the last thing a read does, so an exchange
  that releases the connection there can never see the rest of that read.
- The answer's head is bounded (``limits.maxHeadSize``); the rest of a body whose length is
  known bypasses the parser, each read relayed as it came, without a copy.
- While an exchange waits on the backend (the request is all written, or the backend stopped
  reading it), ``timeouts.read`` of silence fails it with a timeout: an idle gap, reset by every
  read and every drain, never a cap on the whole exchange.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from ..core.errors import (
    LocalResourceError,
    UpgradeRefused,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from ..core.headers import Header
from ..durations import format_ms
from .deadlines import NEVER, Sweeper
from .http1 import NO_BODY, UNTIL_CLOSE, response_framing

log = logging.getLogger("stickylb.proxy")

# Our own process is out of a resource: not the backend's fault, and retrying elsewhere fails too.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
CONNECT_ERRNOS = {
    errno.ECONNREFUSED: "connect refused",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
}


class Exchange(Protocol):
    """What a connection tells the exchange it serves (``pipeline.RequestCycle``)."""

    def response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[Header],
        framing: int,
        length: int,
    ) -> None: ...

    def response_body(self, piece: bytes) -> None: ...

    def response_end(self, trailers: list[Header] | None) -> None: ...

    def response_upgrade(
        self, connection: BackendConnection, reason: bytes, headers: list[Header], early: bytes
    ) -> None: ...

    def backend_failed(self, error: UpstreamError) -> None: ...

    def backend_writable(self, writable: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    connect_timeout: float
    read_timeout: float | None
    keep_alive: float  # seconds an idle connection is kept; 0: never reused
    max_idle: int
    max_head: int


Opener = Callable[[Callable[[], "BackendConnection"]], Awaitable["BackendConnection"]]


def tcp_opener(host: str, port: int, tls: bool) -> Opener:
    """Opens TCP (or TLS, verified against the system's CAs) connections to host:port."""
    context = ssl.create_default_context() if tls else None

    async def open_tcp(factory: Callable[[], BackendConnection]) -> BackendConnection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                factory, host, port, ssl=context, server_hostname=host if context else None
            )
        except socket.gaierror:
            raise UpstreamConnectError(f"DNS lookup failed for {host}") from None
        return protocol

    return open_tcp


def socketpair_opener(server: Callable[[], asyncio.Protocol]) -> Opener:
    """Opens connections to an in-process server (a protocol factory, such as aiohttp's
    ``web.Server``) over a socket pair: no port, no file, nobody else can connect."""

    async def open_pair(factory: Callable[[], BackendConnection]) -> BackendConnection:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            await loop.connect_accepted_socket(server, theirs)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        try:
            _, protocol = await loop.create_unix_connection(factory, sock=ours)
        except BaseException:
            ours.close()
            raise
        return protocol

    return open_pair


class Connections:
    """One backend's connections: how to open them, and the idle ones kept for reuse."""

    def __init__(
        self, name: str, opener: Opener, settings: ConnectionSettings, sweeper: Sweeper
    ) -> None:
        self.name = name
        self.settings = settings
        self.sweeper = sweeper
        self._opener = opener
        self._idle: dict[BackendConnection, None] = {}  # insertion order: oldest first
        self._open: set[BackendConnection] = set()

    def take(self) -> BackendConnection | None:
        """The most recently released idle connection, if any (last in, first out)."""
        idle = self._idle
        while idle:
            connection = idle.popitem()[0]
            transport = connection.transport
            if transport is not None and not transport.is_closing():  # not closed meanwhile
                connection.deadline = NEVER
                return connection
        return None

    async def open(self) -> BackendConnection:
        """A new connection; ``UpstreamConnectError`` (the backend's fault) or
        ``LocalResourceError`` (ours) when it cannot be had."""
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                connection = await self._opener(lambda: BackendConnection(self))
        except TimeoutError:
            raise UpstreamConnectError(f"connect timeout after {format_ms(timeout)} ms") from None
        except ssl.SSLError:
            raise UpstreamConnectError("TLS handshake failed") from None
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                name = errno.errorcode[exc.errno]
                raise LocalResourceError(f"cannot open a socket: {name}") from None
            reason = CONNECT_ERRNOS.get(exc.errno or 0, "connect failed")
            raise UpstreamConnectError(reason) from None
        return connection

    def release(self, connection: BackendConnection, reusable: bool) -> None:
        """Take back a connection whose exchange is over: kept if it may serve another."""
        connection.user = None
        settings, idle = self.settings, self._idle
        keep = reusable and settings.keep_alive and settings.max_idle
        if not keep or connection.transport is None:
            connection.close()
            return
        if len(idle) >= settings.max_idle:
            oldest = next(iter(idle))  # the least recently used one makes room
            del idle[oldest]
            oldest.close()
        idle[connection] = None
        connection.idle_since(settings.keep_alive)

    def made(self, connection: BackendConnection) -> None:
        self._open.add(connection)
        self.sweeper.watch(connection)

    def lost(self, connection: BackendConnection) -> None:
        self._idle.pop(connection, None)
        self._open.discard(connection)
        self.sweeper.forget(connection)

    def detach(self, connection: BackendConnection) -> None:
        """The connection became a tunnel: no longer ours to keep, time or close."""
        self.lost(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()

    def retire(self) -> None:
        """No more requests will come here (the backend was removed or moved): idle
        connections close now, busy ones when their exchange ends."""
        self.settings = dataclasses.replace(self.settings, max_idle=0)
        for connection in list(self._idle):
            connection.close()


class BackendConnection(asyncio.Protocol):
    """One connection to a backend (see the module's invariants)."""

    __slots__ = (
        "_complete",
        "_extra",
        "_failure",
        "_final",
        "_framing",
        "_head_bytes",
        "_head_request",
        "_headers",
        "_keep",
        "_left",
        "_loop",
        "_parser",
        "_read_paused",
        "_reason",
        "_received",
        "_request_done",
        "_served",
        "_stale_parser",
        "_status",
        "_trailers",
        "_transfer_encoding",
        "_upgrade_expected",
        "_write_paused",
        "connection",
        "content_length",
        "deadline",
        "pool",
        "transport",
        "user",
    )

    def __init__(self, pool: Connections) -> None:
        self.pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.user: Exchange | None = None
        self.deadline = NEVER
        self._parser = httptools.HttpResponseParser(self)
        # After a head with a Content-Length, reads past the first go around the parser, which
        # then has to be replaced before the next answer (it still waits for that body).
        self._stale_parser = False
        self._served = 0  # exchanges this connection has served
        self._head_request = False
        self._upgrade_expected = False
        self._reset()

    def _reset(self) -> None:
        self._headers: list[Header] = []
        self._trailers: list[Header] | None = None
        self._status = 0
        self._reason = b""
        self.content_length: bytes | None = None
        self.connection = b""  # the answer's Connection values, lower-cased
        self._transfer_encoding: bytes | None = None
        self._head_bytes = 0  # -1 once the head is complete
        self._final = False  # the head of the final (non-1xx) answer has arrived
        self._complete = False
        self._framing = NO_BODY
        self._left = 0  # bytes of a Content-Length body still to come, past the parser
        self._keep = False
        self._received = False
        self._extra = False  # bytes came after the answer ended
        self._failure: UpstreamError | None = None
        self._request_done = False
        self._read_paused = False
        self._write_paused = False

    # --- the exchange's side ---------------------------------------------------------------

    @property
    def reused(self) -> bool:
        return self._served > 1

    @property
    def received(self) -> bool:
        """Whether any byte of the current answer has arrived."""
        return self._received

    @property
    def reusable(self) -> bool:
        """Whether the connection may serve another exchange once this one is over."""
        return (
            self._complete
            and self._keep
            and not self._extra
            and self._failure is None
            and self._framing != UNTIL_CLOSE
        )

    def start(self, user: Exchange, head: bytes, *, head_request: bool, upgrade: bool) -> None:
        """Lease the connection to ``user`` and write its request head."""
        self._reset()
        self._served += 1
        self.user = user
        self._head_request = head_request
        self._upgrade_expected = upgrade
        if self._stale_parser:
            self._stale_parser = False
            self._parser = httptools.HttpResponseParser(self)
        transport = self.transport
        assert transport is not None
        transport.write(head)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def writelines(self, parts: tuple[bytes, ...] | list[bytes]) -> None:
        transport = self.transport
        if transport is not None:
            transport.writelines(parts)

    def request_done(self) -> None:
        """The whole request is written: from now on the exchange waits on the backend."""
        self._request_done = True
        timeout = self.pool.settings.read_timeout
        if timeout and not self._read_paused and not self._complete:
            self.deadline = self._loop.time() + timeout

    def pause_reading(self) -> None:
        """The client cannot take more: stop reading the answer (and do not time it)."""
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
            self._rearm()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
            self._rearm()

    def idle_since(self, keep_alive: float) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()  # an idle connection must notice what arrives
        self.deadline = self._loop.time() + keep_alive

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _rearm(self) -> None:
        # Timed while waiting on the backend: for its answer, or for it to read our request.
        timeout = self.pool.settings.read_timeout
        waiting = (
            self.user is not None
            and not self._complete
            and not self._read_paused
            and (self._request_done or self._write_paused)
        )
        if waiting and timeout:
            self.deadline = self._loop.time() + timeout
        else:
            self.deadline = NEVER

    def expired(self, now: float) -> None:
        if self.user is None:  # idle past backendKeepAlive
            self.close()
            return
        timeout = self.pool.settings.read_timeout or 0
        self._fail(UpstreamTimeout(f"timeout after {format_ms(timeout)} ms", request_sent=True))

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.pool.made(self)

    def data_received(self, data: bytes) -> None:
        user = self.user
        if user is None:
            log.warning(
                "backend %s sent %d bytes on an idle connection; closed it, never reused",
                self.pool.name,
                len(data),
            )
            self.close()
            return
        self._received = True
        if self._left:  # the rest of a body of known length: no parsing, no copy
            left = self._left
            if len(data) > left:
                self._extra = True
                data = data[:left]
            self._left = left - len(data)
            user.response_body(data)
            if not self._left:
                self._complete = True
                self._finish()
            elif self.deadline != NEVER:
                self._rearm()
            return
        if self._head_bytes >= 0:  # the head is bounded: parse no more of it than that
            room = self.pool.settings.max_head - self._head_bytes
            if len(data) > room:
                self._head_bytes += room
                self._feed(data[:room], data, 0)
                if self._head_bytes >= 0 and self._failure is None and self.user is not None:
                    self._failure = UpstreamError("answer head too large", request_sent=True)
                elif self.user is not None and self._failure is None:
                    self._feed(data[room:], data, room)
            else:
                self._head_bytes += len(data)
                self._feed(data, data, 0)
        else:
            self._feed(data, data, 0)
        if self.user is None:  # handed over to a tunnel
            return
        if self._failure is not None:
            self._fail(self._failure)
            return
        if self._complete:
            self._finish()
            return
        if self._left:
            self._stale_parser = True  # the rest of this body goes around the parser
        if self.deadline != NEVER:
            self._rearm()

    def _feed(self, data: bytes, whole: bytes, offset: int) -> None:
        """Parse ``data`` (``whole[offset:]``, for the bytes past an upgrade)."""
        user = self.user
        if user is None or self._failure is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._failure is None and self._status == 101 and self._upgrade_expected:
                self.user = None
                self.deadline = NEVER
                self.pool.detach(self)
                self._parser = _SPENT_PARSER  # nothing of this protocol outlives the handover
                early = whole[offset + upgrade.args[0] :]
                user.response_upgrade(self, self._reason, self._headers, early)
                return
            self._failure = self._failure or UpstreamError(
                "unexpected 101 answer", request_sent=True
            )
        except httptools.HttpParserCallbackError as error:
            if self._failure is None:  # not ours to blame on the backend: a bug of ours
                log.error("answer from %s broke the proxy", self.pool.name, exc_info=error)
                self._failure = UpstreamError("internal error", request_sent=True)
        except httptools.HttpParserError:
            self._failure = self._failure or UpstreamError(
                "invalid HTTP response", request_sent=True
            )

    def eof_received(self) -> bool:
        user = self.user
        if user is not None:
            if self._final and self._framing == UNTIL_CLOSE and self._failure is None:
                self._complete = True  # a body without framing ends here, whole
                self._finish()
            else:
                self._fail(UpstreamError("backend closed the connection", request_sent=True))
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._parser = _SPENT_PARSER  # it holds our callbacks: no cycle once we are gone
        self.pool.lost(self)
        user = self.user
        if user is not None and not self._complete:
            self.user = None
            reason = "connection reset" if exc is not None else "backend closed the connection"
            self._failure = self._failure or UpstreamError(reason, request_sent=True)
            user.backend_failed(self._failure)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._rearm()
        if self.user is not None:
            self.user.backend_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._rearm()
        if self.user is not None:
            self.user.backend_writable(True)

    # --- ending an exchange ------------------------------------------------------------------

    def _finish(self) -> None:
        """The answer is complete: the last thing a read does (see the module's invariants)."""
        user = self.user
        self.deadline = NEVER
        if user is not None:
            user.response_end(self._trailers)

    def _fail(self, error: UpstreamError) -> None:
        self._failure = error
        user, self.user = self.user, None
        self.deadline = NEVER
        self.close()
        if user is not None:
            user.backend_failed(error)

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True  # a second answer to one request: never relayed

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._complete:
            return
        lname = name.lower()
        if self._final:  # after the head: a trailer of a chunked body
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((lname, name, value))
            return
        if lname == b"content-length":
            self.content_length = value
        elif lname == b"connection":
            self.connection = (
                value.lower()
                if not self.connection
                else b",".join((self.connection, value.lower()))
            )
        elif lname == b"transfer-encoding":
            if self._transfer_encoding is not None:
                self._transfer_encoding += b"," + value
            else:
                self._transfer_encoding = value
        self._headers.append((lname, name, value))

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and status != 101:  # informational (100, 103): the real one follows
            self._headers = []
            self._reason = b""
            self.content_length = self._transfer_encoding = None
            self.connection = b""
            return
        user = self.user
        if user is None:
            return
        if status > 599 or (status == 101 and not self._upgrade_expected):
            self._failure = UpstreamError(f"unexpected status {status}", request_sent=True)
            raise _Stop()
        if self._upgrade_expected and status != 101:
            self._failure = UpgradeRefused(
                f"backend refused the upgrade (status {status})", request_sent=True
            )
            raise _Stop()
        try:
            framing, length = response_framing(
                self._head_request, status, self.content_length, self._transfer_encoding
            )
        except UpstreamError as exc:
            self._failure = exc
            raise _Stop() from None
        self._final = True
        self._head_bytes = -1
        self._status = status
        self._framing = framing
        self._keep = parser.should_keep_alive()
        if status == 101:
            return  # the parser stops here; the upgrade is handed over after the read
        user.response_head(status, self._reason, self._headers, framing, length)
        if framing == NO_BODY:
            self._complete = True
            if self._head_request:
                self._stale_parser = True  # it would wait for the body HEAD does not get
        else:
            self._left = length  # counted down by on_body; past this read, the parser rests

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._extra = True  # bytes after a HEAD answer, or after the end
            return
        user = self.user
        if self._left:
            self._left -= len(body)
        if user is not None:
            user.response_body(body)

    def on_message_complete(self) -> None:
        if not self._final or self._complete:
            return
        self._complete = True
        self._left = 0


_SPENT_PARSER = httptools.HttpResponseParser(object())


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the reason is in ``_failure``)."""
