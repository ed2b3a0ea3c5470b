"""Theory of operation: the front door of ``python -m stickylb``, a lean server protocol for
the common request, with aiohttp's server for everything else.

Profiled under load, aiohttp's server (request and response objects, router, middleware and
signal plumbing, the per-connection task loop) costs about as much per proxied request as the
proxying itself. Most requests a load balancer sees need none of it, so each connection starts
with ``FrontProtocol``, which handles *plain* requests itself: no body, no upgrade, no
``Expect``, an origin-form target outside the admin prefix. For those it finds the end of the
head, parses it with aiohttp's C request parser (the same parser and limits aiohttp's server
uses), chooses a backend and sends the request exactly as ``HttpProxy.handle`` would (the
``admit`` and ``send`` steps are shared), and writes the answer itself: the head with the
body when all of it came with the backend's head (one write), otherwise piece by piece as it
arrives, chunked when the backend gave no length, pausing while the client's socket is full.
The head is serialized like the request to the backend (``headers.serialize_head``), so header
bytes that are not UTF-8 reach the client unchanged.

Everything else (a body, a WebSocket, the admin endpoints, a head the parser rejects, a
user-supplied ``unavailable.handler``) hands the connection to aiohttp's own request handler
for the rest of its life: the transport gets aiohttp's protocol and aiohttp parses the same
bytes again from the start of that request, so both paths answer alike. One request is served
at a time per connection; bytes that arrive meanwhile (pipelining) wait, bounded, in a buffer.

Only a ``web.Application`` that is exactly one balancer (``build_app``) gets the fast path; an
app with routes, middlewares or response hooks of its own is served by aiohttp throughout.
``--access-log`` lines come from aiohttp's ``AccessLogger`` on both paths, in the same format.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, NamedTuple

from aiohttp import hdrs, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import HttpVersion, HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_log import AccessLogger
from multidict import CIMultiDict, CIMultiDictProxy

from .app import BALANCER_KEY, handler_args
from .config import Config
from .errors import StickyLBError
from .headers import downstream_headers, serialize_head
from .proxy import MID_RESPONSE_ERRORS, NO_BODY, Answer, Exchange, HttpProxy, Incoming
from .streaming import LAST_CHUNK, framed_chunk, read_piece

log = logging.getLogger("stickylb.front")

HEAD_END = b"\r\n\r\n"
# A pipelining client may send ahead at most this much while a request is in progress.
MAX_BUFFERED = 1 << 16


class HandOver(Exception):
    """This request is for aiohttp's server (raised before anything was written)."""


class FrontServer:
    """The protocol factory the listening sites use, in place of aiohttp's ``web.Server``
    (which it wraps: connections handed over are aiohttp's, shut down by it)."""

    def __init__(
        self,
        aiohttp_server: web.Server,
        proxy: HttpProxy,
        config: Config,
        access_log: AccessLogger | None,
    ) -> None:
        self.aiohttp = aiohttp_server
        self.access_log = access_log
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        limits = handler_args(config)  # the very limits aiohttp's server applies
        self.max_field_size: int = limits["max_field_size"]
        self.max_line_size: int = limits["max_line_size"]
        self.max_headers: int = limits["max_headers"]
        # The most a head can be before the parser rejects it: past that, aiohttp answers.
        self.max_head = self.max_line_size + self.max_headers * (self.max_field_size + 2) + 4
        self.keep_alive = config.timeouts.keep_alive
        self.admin_prefix = config.admin.prefix
        self.connections: set[FrontProtocol] = set()

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def plain(self, message: RawRequestMessage) -> bool:
        """Whether the fast path serves this request (else aiohttp's server does)."""
        headers = message.headers
        path = message.url.path  # decoded, as aiohttp's router matches it
        prefix = self.admin_prefix
        return (
            not message.upgrade
            and not message.chunked
            and headers.get(hdrs.CONTENT_LENGTH, "0") == "0"
            and hdrs.UPGRADE not in headers
            and hdrs.EXPECT not in headers
            and message.path.startswith("/")
            and not (path == prefix or path.startswith(prefix + "/"))
        )

    def hand_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """Give a connection to aiohttp's server, starting with ``data`` (unparsed bytes)."""
        handler = self.aiohttp()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)
        transport.resume_reading()

    def pre_shutdown(self) -> None:
        for connection in list(self.connections):
            connection.close()
        self.aiohttp.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (web.Server's)
        await asyncio.gather(
            *(connection.shutdown(timeout) for connection in list(self.connections)),
            self.aiohttp.shutdown(timeout),
        )


class FrontProtocol(BaseProtocol):
    """One client connection while it sends plain requests."""

    def __init__(self, front: FrontServer) -> None:
        super().__init__(front.loop)
        self._front = front
        # The parser points back at this protocol, so it is dropped when the connection ends:
        # without the cycle a closed connection is freed at once rather than by a rare full
        # GC pass.
        self._request_parser: HttpRequestParser | None = HttpRequestParser(
            self,
            front.loop,
            1 << 16,
            max_line_size=front.max_line_size,
            max_field_size=front.max_field_size,
            max_headers=front.max_headers,
        )
        self._buffer = b""
        self._peer: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._buffer_full = False
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._answered: tuple[int, CIMultiDict[str]] | None = None  # status and headers
        self._sent = 0  # bytes of the answer written so far

    # --- the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tcp_keepalive(transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        self._front.connections.add(self)
        self._idle_since = self._loop.time()
        if self._front.keep_alive > 0:
            self._idle_timer = self._loop.call_later(self._front.keep_alive, self._check_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._forget()
        if self._task is not None:
            self._task.cancel()  # the client went away: release its backend at once

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next_request()
        elif len(self._buffer) > MAX_BUFFERED and not self._buffer_full:
            self._buffer_full = True
            self._pause_transport_reading()

    def eof_received(self) -> None:
        pass  # the transport closes itself; a request in progress is cancelled then

    def _forget(self) -> None:
        self._front.connections.discard(self)
        self._request_parser = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: a request only records when it ended.
        self._idle_timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        due = self._idle_since + self._front.keep_alive
        if self._task is not None:
            due = now + self._front.keep_alive  # never while a request is in progress
        elif now >= due:
            self.transport.close()
            return
        self._idle_timer = self._loop.call_at(due, self._check_idle)

    def _next_request(self) -> None:
        parser = self._request_parser
        if self._closing or parser is None:  # None: closed or handed over
            return
        buffer = self._buffer
        end = buffer.find(HEAD_END)
        if end < 0:
            if len(buffer) > self._front.max_head or b"\n\n" in buffer:
                self._hand_over()  # aiohttp answers (431, 400, or a bare-LF head it accepts)
            return
        head = buffer[: end + len(HEAD_END)]
        try:
            messages, upgraded, _ = parser.feed_data(head)
        except HttpProcessingError:
            self._hand_over()
            return
        if len(messages) != 1 or upgraded or messages[0][1] is not EMPTY_PAYLOAD:
            self._hand_over()
            return
        message = messages[0][0]
        if not self._front.plain(message):
            self._hand_over()
            return
        self._buffer = buffer[len(head) :]
        self._task = self._loop.create_task(self._serve(message, head, self._loop.time()))

    def _hand_over(self, head: bytes = b"") -> None:
        transport = self.transport
        if transport is None:
            return
        self._forget()
        self._front.hand_over(transport, head + self._buffer)
        self._buffer = b""
        self.transport = None  # the connection is no longer ours

    async def _serve(self, message: RawRequestMessage, head: bytes, started: float) -> None:
        keep_alive = False
        self._sent = 0
        try:
            keep_alive = await self._respond(message)
            if keep_alive and self.writing_paused:
                await self._drain_helper()  # the next answer waits until this one has left
        except HandOver:
            self._task = None
            self._hand_over(head)
            return
        except ConnectionResetError:
            log.debug("%s %s: client disconnected", message.method, message.path)
        except Exception:
            log.exception("%s %s: unexpected error", message.method, message.path)
        finally:
            self._task = None
            answered, self._answered = self._answered, None
            if self._front.access_log is not None and answered is not None:
                self._log_access(message, answered, self._sent, started)
        transport = self.transport
        if transport is None:
            return
        if not keep_alive or self._closing:
            transport.close()
            return
        self._idle_since = self._loop.time()
        if self._buffer_full:
            self._buffer_full = False
            self._resume_transport_reading()
        if self._buffer:
            self._next_request()

    # --- one request -------------------------------------------------------------------------

    async def _respond(self, message: RawRequestMessage) -> bool:
        """Proxy one plain request; True if the connection may serve another."""
        proxy = self._front.proxy
        choice = await proxy.admit(message.headers)
        if choice is None:
            return await self._unavailable(message)
        try:
            incoming = Incoming(message.method, message.path, message.headers, self._peer, "http")
            try:
                exchange = await proxy.send(incoming, message.path, choice, None)
            except StickyLBError as exc:
                return self._answer(message, Answer.error(exc))
            try:
                return await self._relay(message, exchange)
            finally:
                exchange.end()
        finally:
            proxy.admission.leave()

    async def _unavailable(self, message: RawRequestMessage) -> bool:
        unavailable = self._front.proxy.unavailable
        if unavailable.has_handler:
            raise HandOver()  # the user's handler takes an aiohttp request
        return self._answer(message, unavailable.fixed)

    def _answer(self, message: RawRequestMessage, answer: Answer) -> bool:
        headers = CIMultiDict({hdrs.CONTENT_TYPE: answer.content_type})
        headers[hdrs.CONTENT_LENGTH] = str(len(answer.body))
        head, keep_alive = self._head(message, answer.status, "", headers, not message.should_close)
        self._send(head, b"" if message.method == "HEAD" else answer.body)
        return keep_alive

    async def _relay(self, message: RawRequestMessage, exchange: Exchange) -> bool:
        upstream = exchange.response
        headers = downstream_headers(upstream.headers)
        self._front.proxy.forwarding.mark(headers, exchange.choice)
        reader = upstream.content
        status, reason = upstream.status, upstream.reason
        keep_alive = not message.should_close
        bodiless = message.method == "HEAD" or status in NO_BODY
        if bodiless or reader.is_eof():
            # The whole answer is here (typical for small ones): head and body in one write.
            body = b""
            if not bodiless:
                body = reader.read_nowait()
                headers[hdrs.CONTENT_LENGTH] = str(len(body))
            head, keep_alive = self._head(message, status, reason, headers, keep_alive)
            self._send(head, body)
            return keep_alive
        chunked = False
        if hdrs.CONTENT_LENGTH not in headers:
            if message.version >= HttpVersion11:
                headers[hdrs.TRANSFER_ENCODING] = "chunked"
                chunked = True
            else:
                keep_alive = False  # an HTTP/1.0 client reads the body until we close
        head, keep_alive = self._head(message, status, reason, headers, keep_alive)
        return await self._stream(message, exchange, head, chunked) and keep_alive

    async def _stream(
        self, message: RawRequestMessage, exchange: Exchange, head: bytes, chunked: bool
    ) -> bool:
        """Relay a body piece by piece as it arrives, the head with the first piece; False
        when the backend failed midway."""
        reader = exchange.response.content
        while True:
            try:
                piece = await read_piece(reader)
            except MID_RESPONSE_ERRORS as exc:
                self._front.proxy.failed_mid_response(
                    exc, message.method, message.path, exchange.choice.backend
                )
                return False  # closing shows the client its answer was cut short
            if not piece:
                break
            if chunked:
                self._send(head, *framed_chunk(piece))
            elif head:
                self._send(head, piece)
            else:
                self._send(piece)  # alone, so not copied into a joined buffer
            head = b""
            if self.writing_paused:
                await self._drain_helper()
        self._send(head, LAST_CHUNK if chunked else b"")
        return True

    def _head(
        self,
        message: RawRequestMessage,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
        keep_alive: bool,
    ) -> tuple[bytes, bool]:
        """The status line and headers, with the connection headers set; and whether to keep
        the connection."""
        if keep_alive and message.version < HttpVersion11:
            headers[hdrs.CONNECTION] = "keep-alive"
        elif not keep_alive and message.version >= HttpVersion11:
            headers[hdrs.CONNECTION] = "close"
        self._answered = (status, headers)
        return serialize_head(_status_line(message, status, reason), headers), keep_alive

    def _send(self, *parts: bytes) -> None:
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client disconnected")
        for part in parts:
            self._sent += len(part)
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)

    def _log_access(
        self,
        message: RawRequestMessage,
        answered: tuple[int, CIMultiDict[str]],
        sent: int,
        started: float,
    ) -> None:
        assert self._front.access_log is not None
        status, headers = answered
        request = _LoggedRequest(
            self._peer, message.method, message.path, message.version, message.headers
        )
        answer = _LoggedAnswer(status, sent, headers)
        self._front.access_log.log(request, answer, self._loop.time() - started)  # type: ignore[arg-type]

    # --- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the request in progress, if any, then close."""
        self._closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (as aiohttp's)
        self.close()
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            if self.transport is not None:
                self.transport.close()


class _LoggedRequest(NamedTuple):
    """What aiohttp's ``AccessLogger`` reads of a request (``%r`` is method, path, version)."""

    remote: str | None
    method: str
    path_qs: str
    version: HttpVersion
    headers: CIMultiDictProxy[str]


class _LoggedAnswer(NamedTuple):
    """What it reads of the answer: ``%b`` counts every byte written, as aiohttp's does."""

    status: int
    body_length: int
    headers: CIMultiDict[str]


def _status_line(message: RawRequestMessage, status: int, reason: str) -> str:
    version = message.version
    return f"HTTP/{version.major}.{version.minor} {status} {reason or _reason(status)}"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class FrontRunner(web.AppRunner):
    """An ``AppRunner`` whose sites listen with ``FrontServer`` when the app is one balancer."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        logger = kwargs.get("access_log")
        self._access_log = AccessLogger(logger) if logger is not None else None
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        balancer = self.app.get(BALANCER_KEY)
        if balancer is None or not balancer.owns(self.app):
            return server
        front = FrontServer(server, balancer.proxy, balancer.config, self._access_log)
        return front  # type: ignore[return-value]
