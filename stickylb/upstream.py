"""Theory of operation: the proxy's own HTTP/1.1 client for talking to backends.

Why not aiohttp's ``ClientSession``: profiled under load, building its ``ClientRequest`` and
``ClientResponse`` and going through its connector was ~45 % of a proxied request, for features
a proxy never uses (cookies, redirects, auth, URL joining, tracing). What this module keeps from
aiohttp is the part that matters: ``BackendConnection``, the protocol aiohttp's own client uses,
which brings the C response parser, read flow control, the read timeout (rearmed on every
chunk received) and the ``StreamReader`` the body arrives in.

Per backend, ``Connections`` keeps idle keep-alive connections, most recently used first; one
idle for ``timeouts.backendKeepAlive`` is closed (by default shorter than Node's 5 s server
default, so a backend rarely closes a connection just as we reuse it). A request takes an idle
connection or opens one, writes its head in one write, streams its body in a task (with the
client's own framing: Content-Length as sent, otherwise chunked) and waits for the response
head. A reused connection that fails before answering is retried once on a fresh connection
when the request can be replayed (idempotent method, no body): the usual keep-alive race, not
a backend failure.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from .durations import format_ms
from .errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from .headers import serialize_head
from .pool import Backend
from .streaming import LAST_CHUNK, framed_chunk

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose bodyless requests still say "Content-Length: 0" (as aiohttp and curl send).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# How much of a backend's answer may wait for a slow client before reading from the backend
# pauses (twice this is the high-water mark). aiohttp 3.14's default, 256 KiB, let up to
# 768 KiB wait per connection; 64 KiB paused and resumed so often that asyncio's loop relayed
# 1 MiB answers ~20 % slower. 128 KiB was the fastest of the three on both loops
# (``benchmarks/``, CPU per MiB relayed).
BODY_BUFFER = 128 * 1024
_CONNECT_ERRNOS = {111: "connect refused", 113: "no route to host", 101: "network unreachable"}


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float
    read_timeout: float | None
    max_line_size: int
    max_field_size: int
    max_headers: int
    keep_alive: float  # seconds an idle connection is kept; 0: never reused


def describe_client_error(
    exc: BaseException, connect_timeout: float, read_timeout: float | None
) -> UpstreamError:
    """Map an aiohttp client (or socket) exception to our tree, with a short secret-free reason."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectError(f"connect timeout after {format_ms(connect_timeout)} ms")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(_CONNECT_ERRNOS.get(exc.os_error.errno or 0, "connect failed"))
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(
            f"timeout after {format_ms(read_timeout or 0)} ms", request_sent=True
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamError("backend closed the connection", request_sent=True)
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return UpstreamError("connection reset", request_sent=True)
    if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):
        return UpstreamError("invalid HTTP response", request_sent=True)
    return UpstreamError(type(exc).__name__, request_sent=True)


class BackendConnection(ResponseHandler):
    """aiohttp's client protocol with three costs per request taken out.

    The read timeout: aiohttp starts a new timer on every read; here one timer per connection
    stays armed and, when it fires early, re-arms for the current deadline. The response
    parser: aiohttp makes one per request; a kept connection keeps its own (one for HEAD, one
    for everything else, since a HEAD answer has no body to read). Resuming reads: only when
    they were paused. And closing it leaves no reference cycle behind.
    """

    __slots__ = ("_deadline", "parser_for_head")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._deadline: float | None = None  # None: not waiting for the backend
        self.parser_for_head: bool | None = None  # None: no parser yet

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = None
            return
        self._deadline = self._loop.time() + timeout
        if self._read_timeout_handle is None:
            self._read_timeout_handle = self._loop.call_at(self._deadline, self._on_read_timeout)

    def _drop_timeout(self) -> None:
        self._deadline = None  # an armed timer finds nothing to do when it fires

    def _on_read_timeout(self) -> None:
        self._read_timeout_handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._read_timeout_handle = self._loop.call_at(deadline, self._on_read_timeout)
            return
        super()._on_read_timeout()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's body reader calls this after every read and at the end of every body;
        # only a connection that was paused has anything to resume.
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def close(self) -> None:
        super().close()
        # Answers still queued (one arriving just as its request was abandoned) will never be
        # read, and each points back at this protocol: dropped, the connection is freed now
        # instead of at the next full GC pass, with whatever body it had buffered.
        self._buffer.clear()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._read_timeout_handle is not None:
            self._read_timeout_handle.cancel()
            self._read_timeout_handle = None


class UpstreamResponse:
    """A backend's answer: status, headers and a streamed body. ``release()`` when done."""

    __slots__ = ("_connections", "_protocol", "_writer", "content", "headers", "reason", "status")

    def __init__(
        self,
        connections: Connections,
        protocol: BackendConnection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._connections = connections
        self._protocol = protocol
        self._writer = writer
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    def release(self) -> None:
        """Give the connection back for reuse if the exchange ended cleanly, else close it."""
        writer = self._writer
        done = writer is None or (writer.done() and not writer.cancelled())
        if done and self.content.is_eof() and not self._protocol.should_close:
            self._connections.keep(self._protocol)
        else:
            self.close()

    def detach(self) -> BackendConnection:
        """Take the connection over (after a 101); it is then the caller's to close."""
        return self._protocol

    def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._protocol.close()


class Connections:
    """One backend's keep-alive connections and how to open new ones."""

    def __init__(self, backend: Backend, settings: UpstreamSettings) -> None:
        url = backend.url
        self._host = url.raw_host or ""
        self._port = url.port or 80  # yarl fills in the scheme default; never None here
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.raw_path.rstrip("/")
        self._settings = settings
        self._idle: list[tuple[BackendConnection, float]] = []
        self._sweep: asyncio.TimerHandle | None = None

    def target(self, origin_form: str) -> str:
        return self._prefix + origin_form

    def reuse(self) -> BackendConnection | None:
        """The most recently kept connection that is still open, if any."""
        while self._idle:
            protocol, _ = self._idle.pop()
            if protocol.is_connected():
                return protocol
        return None

    async def open(self) -> BackendConnection:
        loop = asyncio.get_running_loop()
        timeout = self._settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: BackendConnection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connect timeout after {format_ms(timeout)} ms") from None
        except ssl.SSLError:
            raise UpstreamConnectError("TLS handshake failed") from None
        except OSError as exc:
            raise UpstreamConnectError(
                _CONNECT_ERRNOS.get(exc.errno or 0, "connect failed")
            ) from None
        return protocol

    def keep(self, protocol: BackendConnection) -> None:
        loop = asyncio.get_running_loop()
        keep_alive = self._settings.keep_alive
        if not keep_alive:
            protocol.close()
            return
        self._idle.append((protocol, loop.time()))
        if self._sweep is None:
            self._sweep = loop.call_later(keep_alive, self._close_stale)

    def _close_stale(self) -> None:
        loop = asyncio.get_running_loop()
        keep_alive = self._settings.keep_alive
        cutoff = loop.time() - keep_alive
        stale = 0
        while stale < len(self._idle) and self._idle[stale][1] <= cutoff:
            self._idle[stale][0].close()
            stale += 1
        del self._idle[:stale]
        self._sweep = None
        if self._idle:  # next sweep when the oldest remaining one expires
            self._sweep = loop.call_at(self._idle[0][1] + keep_alive, self._close_stale)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for protocol, _ in self._idle:
            protocol.close()
        self._idle.clear()


class Upstream:
    """Sends requests to backends over pooled keep-alive connections."""

    def __init__(self, backends: list[Backend], settings: UpstreamSettings) -> None:
        self._settings = settings
        self._connections = {backend.key: Connections(backend, settings) for backend in backends}

    async def request(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        Raises ``UpstreamError`` (or one of its subclasses) when the backend cannot be reached
        or fails before answering (also when reading the client's body failed: the caller
        knows whether that was its limit).
        """
        connections = self._connections[backend.key]
        if body is not None:
            if "Content-Length" not in headers:
                headers["Transfer-Encoding"] = "chunked"
        elif method in _BODY_METHODS:
            headers.setdefault("Content-Length", "0")
        if not self._settings.keep_alive:
            headers["Connection"] = "close"
        head = serialize_head(f"{method} {connections.target(target)} HTTP/1.1", headers)
        replayable = body is None and method in IDEMPOTENT_METHODS
        protocol = connections.reuse()
        reused = protocol is not None
        if protocol is None:
            protocol = await connections.open()
        try:
            return await self._exchange(connections, protocol, method, head, headers, body)
        except UpstreamError as exc:
            if not (reused and replayable and type(exc) is UpstreamError):
                raise
        # A kept connection the backend had already closed: once more, on a new connection.
        protocol = await connections.open()
        return await self._exchange(connections, protocol, method, head, headers, body)

    async def _exchange(
        self,
        connections: Connections,
        protocol: BackendConnection,
        method: str,
        head: bytes,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        settings = self._settings
        for_head = method == "HEAD"
        if protocol.parser_for_head is not for_head:
            protocol.set_response_params(
                skip_payload=for_head,
                read_until_eof=True,  # no length, not chunked: it ends when the backend closes
                auto_decompress=False,
                read_timeout=settings.read_timeout,
                max_line_size=settings.max_line_size,
                max_field_size=settings.max_field_size,
                max_headers=settings.max_headers,
                read_bufsize=BODY_BUFFER,
            )
            protocol.parser_for_head = for_head
        transport = protocol.transport
        if transport is None:
            raise UpstreamError("backend closed the connection", request_sent=False)
        transport.write(head)
        writer = None
        if body is not None:
            chunked = "Transfer-Encoding" in headers
            writer = asyncio.get_running_loop().create_task(
                _write_body(protocol, body, chunked=chunked)
            )
        protocol.start_timeout()
        try:
            while True:
                message, payload = await protocol.read()
                # Informational answers (100, 103) come before the real one; 101 is final.
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except BaseException as exc:
            if writer is not None:
                writer.cancel()
            protocol.close()
            if isinstance(exc, Exception):
                raise describe_client_error(
                    exc, settings.connect_timeout, settings.read_timeout
                ) from None
            raise
        return UpstreamResponse(
            connections, protocol, message.code, message.reason, message.headers, payload, writer
        )

    def close(self) -> None:
        for connections in self._connections.values():
            connections.close()


async def _write_body(
    protocol: BackendConnection, body: AsyncIterator[bytes], *, chunked: bool
) -> None:
    """Stream the client's body to the backend, waiting whenever the socket's buffer is full.

    A failure (the client went away, the body grew past the limit) is handed to the protocol so
    the request waiting for the response head sees it.
    """
    try:
        async for chunk in body:
            transport = protocol.transport
            if transport is None:
                raise ConnectionResetError("backend closed the connection")
            if chunked:
                if not chunk:
                    continue
                transport.writelines(framed_chunk(chunk))
            else:
                transport.write(chunk)
            await protocol._drain_helper()
        if chunked and protocol.transport is not None:
            protocol.transport.write(LAST_CHUNK)
    except Exception as exc:
        protocol.set_exception(exc)
