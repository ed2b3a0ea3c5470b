"""Theory of operation: one client connection, from bytes to requests and from answers to bytes.

``ClientConnection`` owns a client's socket and an httptools request parser (llhttp, through
its public callback API). It turns bytes into ``Request`` objects and hands each one to a new
exchange (``Front.exchange``, a ``pipeline.RequestCycle``): the connection only reads requests
and writes the answers it is given, the exchange decides everything else. Every request takes
this one path: with or without a body, ``Expect: 100-continue``, WebSocket upgrades, and the
balancer's own endpoints.

Invariants this module owns:
- One request is served at a time. Requests that arrive behind it (pipelining) are parsed and
  queued, at most ``MAX_PIPELINED`` of them, and reading pauses while any wait; answers go out
  in order. A connection that pipelines more is closed once the queued ones are answered.
- A head is bounded: ``limits.maxHeadSize`` for the whole head, ``limits.maxHeaderSize`` per
  line, ``limits.maxHeaders`` fields. Past a bound the client gets 431 (414 for the request
  line) and the connection closes; nothing more is buffered. The parser works on each read as
  it comes, so finding the end of a head is linear in its size.
- Refusals are fixed answers that echo nothing, and close the connection: 400 for what llhttp
  rejects (ambiguous framing, control bytes, bare LF, obs-fold, ...), a second ``Host``,
  HTTP/0.9, or ``Transfer-Encoding`` from HTTP/1.0; 501 for other transfer codings, unknown
  methods and CONNECT; 505 for versions other than 1.x.
- ``Upgrade: websocket`` on a GET is an upgrade (with a body it is refused, 400); every other
  upgrade (``h2c``, ...) is ignored and the request served as plain HTTP, body included, and the
  requests behind it too.
- Timeouts, one at a time: ``timeouts.head`` for a whole head from its first byte (a new
  connection from its accept), ``timeouts.keepAlive`` between requests, ``timeouts.clientBody``
  for a gap in a request body, ``timeouts.read`` for a client that stops reading its answer.
- A client that half-closes after its request still gets the answer; one that leaves during
  its request body is the client's failure, never its backend's.
- The answer's head is written with its first body bytes (or its end) in one write; bodies of
  known length are relayed as they arrive, others are chunked for HTTP/1.1 clients and ended
  by closing for HTTP/1.0 ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol, cast

import httptools

from ..access_log import AccessLog, Details
from ..core.errors import (
    BadRequest,
    ClientError,
    ClientGone,
    HeadersTooLarge,
    InternalError,
    NotImplementedCoding,
    RequestTimeout,
    StickyLBError,
    UriTooLong,
    VersionNotSupported,
)
from ..core.headers import Header, tokens
from ..core.stats import Stats
from .deadlines import NEVER, Sweeper
from .http1 import (
    CHUNKED,
    CONTINUE,
    LENGTH,
    NO_BODY,
    Answer,
    chunk,
    last_chunk,
    request_framing,
    status_line,
)

protocol_log = logging.getLogger("stickylb.protocol")

MAX_PIPELINED = 16
# Closing with unread bytes from the client makes the kernel reset the connection, which can
# destroy the answer before the client reads it: after such an answer stickylb stops writing
# and reads (and discards) for a moment before it closes, as nginx's lingering close does.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
# Answers of at most this size are joined to their head and written at once.
JOIN_LIMIT = 64 * 1024
# Buffered in the kernel and the transport for a slow client before the backend is paused.
WRITE_HIGH_WATER = 256 * 1024


class Exchange(Protocol):
    """What the connection tells the exchange serving its current request."""

    def begin(self) -> None: ...

    def request_body(self, piece: bytes) -> None: ...

    def request_end(self, trailers: list[Header] | None) -> None: ...

    def client_writable(self, writable: bool) -> None: ...

    def client_failed(self, error: ClientError) -> None: ...

    def details(self, head_size: int) -> Details: ...


class Request:
    """One request as the client sent it; its body arrives through the exchange."""

    __slots__ = (
        "complete",
        "connection",
        "cookie",
        "early",
        "expect_continue",
        "framing",
        "head_size",
        "headers",
        "host",
        "keep_alive",
        "length",
        "method",
        "pending",
        "sink",
        "target",
        "trailers",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[Header] = []
        self.keep_alive = True
        self.upgrade: bytes | None = None  # b"websocket" for a WebSocket handshake
        self.framing = NO_BODY
        self.length = 0
        self.expect_continue = False
        self.host: bytes | None = None
        self.cookie: bytes | None = None
        self.connection = b""  # the Connection header's values, lower-cased
        self.pending: list[bytes] = []  # body pieces read before its exchange began
        self.complete = False  # the whole body (if any) has been read
        self.trailers: list[Header] | None = None
        self.early = b""  # bytes after a WebSocket handshake, for the tunnel
        self.sink: Exchange | None = None
        self.head_size = 0  # bytes of the head as received (for the access log)


class FrontLimits(NamedTuple):
    """What the config says about client connections (timeouts in seconds, 0: none)."""

    max_head: int
    max_line: int
    max_headers: int
    head_timeout: float
    keep_alive: float
    body_timeout: float
    send_timeout: float


class Front:
    """What every client connection of one listener shares: limits, timeouts, the exchange
    factory, and the set of open connections (for a graceful shutdown)."""

    def __init__(
        self,
        exchange: Callable[[ClientConnection, Request], Exchange],
        sweeper: Sweeper,
        limits: FrontLimits,
        *,
        scheme: bytes = b"http",
        access_log: AccessLog | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.exchange = exchange
        self.stats = stats if stats is not None else Stats()
        self.access_log = access_log
        self.sweeper = sweeper
        self.configure(limits)
        self.scheme = scheme
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self._drained: asyncio.Future[None] | None = None

    def configure(self, limits: FrontLimits) -> None:
        """Limits and timeouts (again on a reload: each connection's next request uses them)."""
        self.max_head = limits.max_head
        self.max_line = limits.max_line
        self.max_headers = limits.max_headers
        self.head_timeout = limits.head_timeout or NEVER
        self.keep_alive = limits.keep_alive or NEVER  # 0: idle connections are never closed
        self.body_timeout = limits.body_timeout or NEVER
        self.send_timeout = limits.send_timeout or NEVER

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def forget(self, connection: ClientConnection) -> None:
        """``connection`` is closed or became a tunnel: no longer one of ours."""
        self.connections.discard(connection)
        self.sweeper.forget(connection)
        drained = self._drained
        if not self.connections and drained is not None and not drained.done():
            drained.set_result(None)

    async def drained(self) -> None:
        """Until every connection has closed (after ``close_idle``)."""
        if self.connections:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def close_idle(self) -> None:
        """Shutdown: close every connection not serving a request; the others close after
        their answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()


_SPENT_PARSER = httptools.HttpRequestParser(object())


class _Refused(Exception):
    """Raised from a parser callback; the error to answer with is the connection's."""


class ClientConnection(asyncio.Protocol):
    """One client connection (see the module's invariants)."""

    __slots__ = (
        "_broken",
        "_chunked",
        "_content_length",
        "_cycle",
        "_eof",
        "_front",
        "_head_bytes",
        "_header_count",
        "_held",
        "_idle",
        "_keep",
        "_left",
        "_line_in",
        "_lingering",
        "_loop",
        "_overflow",
        "_parser",
        "_parsing",
        "_pending_head",
        "_priming",
        "_queue",
        "_read_pause",
        "_refusal",
        "_sent",
        "_status",
        "_transfer_encoding",
        "_upgrade_held",
        "_write_paused",
        "deadline",
        "peer",
        "peer_bytes",
        "request",
        "transport",
    )

    def __init__(self, front: Front) -> None:
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._parser = self._new_parser()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.peer_bytes = b""
        self.deadline = NEVER
        self.request: Request | None = None  # the one being answered
        self._cycle: Exchange | None = None
        self._parsing: Request | None = None  # the one the parser is reading
        self._queue: deque[Request] = deque()
        self._head_bytes = 0  # bytes of the current head so far; -1 inside a body
        self._header_count = 0
        self._content_length: bytes | None = None
        self._transfer_encoding: list[bytes] = []
        self._left = 0  # bytes of a Content-Length body still to come, past the parser
        self._refusal: ClientError | None = None
        self._broken: StickyLBError | None = None  # answered once the current one is done
        self._overflow = False
        self._priming = False
        self._upgrade_held = False  # an upgrade request was read: nothing more is parsed
        self._eof = False
        self._idle = True
        self._lingering = -1  # bytes discarded while closing; -1: not closing
        self._held = bytearray()  # the end of a head that is not a whole line yet
        self._line_in = False  # whether the current head's request line has been fed
        self._read_pause = 0  # bit 1: the exchange's flow control; bit 2: queued requests
        self._write_paused = False
        self._pending_head: list[bytes] | None = None
        self._chunked = False
        self._keep = True
        self._sent = 0
        self._status = 0

    def _new_parser(self) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self)
        # Bytes after a "Connection: close" request are ignored rather than an error, so the
        # request itself is still answered.
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
        return parser

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = peer[0]
            self.peer_bytes = peer[0].encode()
        front = self._front
        front.connections.add(self)
        front.sweeper.watch(self)
        if front.closing:
            transport.close()
            return
        self.deadline = self._loop.time() + front.head_timeout  # a first head, from accept

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES and self.transport is not None:
                self.transport.abort()
            return
        if self._upgrade_held:  # behind an upgrade request: not HTTP until it is answered
            self._hold(data)
            return
        if self._idle:  # the first byte of a new request
            self._idle = False
            if self._cycle is None:
                self.deadline = self._loop.time() + self._front.head_timeout
        if self._left:  # the rest of a body of known length: no parsing, no copy
            data = self._body_bypass(data)
            if not data:
                return
        max_head = self._front.max_head
        while data:
            if self._head_bytes < 0:  # inside a body: the parser takes it all
                self._feed(data)
                break
            room = max_head - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                self._feed_head(data)
                break
            self._head_bytes = max_head
            part, data = data[:room], data[room:]
            self._feed_head(part)
            if self._head_bytes >= 0:  # still inside the same head: too large
                if self._refusal is None and self._broken is None:
                    self._refuse(HeadersTooLarge("head over limits.maxHeadSize"))
                return
        self._serve_next()
        if self._queue and not self._read_pause & 2:
            self._set_read_pause(2, True)  # requests wait: read no further ahead

    def eof_received(self) -> bool:
        self._eof = True
        if self._lingering >= 0:
            return False
        request = self.request
        if self._cycle is not None and request is not None and not request.complete:
            self._client_gone("closed the connection during its request body")
            return False
        # Half-closed after whole requests: their answers still go out, then we close.
        return self._cycle is not None or bool(self._queue)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._front.forget(self)
        self.deadline = NEVER
        if self._cycle is not None:
            self._client_gone("connection lost")
        self._queue.clear()
        self._parsing = None
        # The parser holds this protocol's callbacks: without it, nothing here is in a
        # reference cycle, and the connection is freed at once, not by a rare full GC pass.
        self._parser = _SPENT_PARSER

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._cycle is not None:
            self.deadline = self._loop.time() + self._front.send_timeout
            self._cycle.client_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._cycle is not None:
            self.deadline = NEVER
            self._cycle.client_writable(True)

    # --- reading -------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_asked(data[upgrade.args[0] :])
        except httptools.HttpParserInvalidMethodError:
            known = data[:1].isupper() and b" " in data[:32]
            self._refuse(NotImplementedCoding("method") if known else BadRequest("method"))
        except httptools.HttpParserCallbackError as error:
            if self._refusal is None:  # not the client's doing: a bug of ours
                protocol_log.error("a request broke the proxy", exc_info=error)
            self._refuse(self._refusal or InternalError("request handling failed"))
        except httptools.HttpParserError as error:
            self._refuse(self._refusal or BadRequest(f"malformed request: {error}"))

    def _feed_head(self, data: bytes) -> None:
        """Feed bytes of a head. Past its request line only whole lines reach the parser, so
        it never gets a header in pieces (it would join each new piece to the ones before,
        a copy per read): each byte of a head is copied a bounded number of times."""
        held = self._held
        if not held and (not self._line_in or b"\r\n\r\n" in data):
            self._feed(data)  # the usual case: a whole head (or the request line) in one read
            if not self._line_in and b"\n" in data:
                self._line_in = True
            return
        held += data
        end = held.rfind(b"\n")
        if end < 0:
            if len(held) > self._front.max_line:
                self._refuse(HeadersTooLarge("a header over limits.maxHeaderSize"))
            return
        lines = bytes(held[: end + 1])
        del held[: end + 1]
        self._feed(lines)
        if held and self._head_bytes < 0 and self._refusal is None:
            rest = bytes(held)  # the head has ended: what follows is a body or a request
            held.clear()
            self._feed(rest)

    def _body_bypass(self, data: bytes) -> bytes:
        """Relay the next part of a Content-Length body; return what follows it."""
        left = self._left
        piece, rest = (data, b"") if len(data) <= left else (data[:left], data[left:])
        self._left = left - len(piece)
        self._body_piece(piece)
        if not self._left:
            self._parser = self._new_parser()  # the old one still waits for this body
            self._head_bytes = 0
            self._message_complete()
        return rest

    def _hold(self, data: bytes) -> None:
        request = self._parsing
        if request is not None:
            request.early += data
        self._set_read_pause(2, True)  # at most one read waits behind an upgrade

    def _set_read_pause(self, reason: int, paused: bool) -> None:
        before = self._read_pause
        self._read_pause = before | reason if paused else before & ~reason
        transport = self.transport
        if transport is None or bool(before) == bool(self._read_pause):
            return
        if self._read_pause:
            transport.pause_reading()
            if self.deadline != NEVER and self._head_bytes < 0 and self._cycle is not None:
                self.deadline = NEVER  # not the client's fault that its body is not read
        else:
            transport.resume_reading()
            self._arm_body_timer()

    def _arm_body_timer(self) -> None:
        request = self.request
        body_due = self._cycle is not None and request is not None and not request.complete
        if body_due and not self._read_pause and not self._write_paused:
            self.deadline = self._loop.time() + self._front.body_timeout

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._priming:
            return
        if len(self._queue) >= MAX_PIPELINED:
            self._overflow = True
        if self._overflow:
            return
        self._parsing = Request()
        self._header_count = 0
        self._content_length = None
        self._transfer_encoding = []

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        if request is None or self._priming or self._overflow:
            return
        request.target += url
        if len(request.target) > self._front.max_line:
            self._refusal = UriTooLong("request line over limits.maxHeaderSize")
            raise _Refused()

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        if request is None or self._priming or self._overflow:
            return
        front = self._front
        if len(name) + len(value) > front.max_line:
            self._refusal = HeadersTooLarge("a header over limits.maxHeaderSize")
            raise _Refused()
        self._header_count += 1
        if self._header_count > front.max_headers:
            self._refusal = HeadersTooLarge("more than limits.maxHeaders headers")
            raise _Refused()
        lname = name.lower()
        if self._head_bytes < 0:  # after the head: a trailer of a chunked body
            if request.trailers is None:
                request.trailers = []
            request.trailers.append((lname, name, value))
            return
        request.headers.append((lname, name, value))
        if lname == b"host":
            if request.host is not None:
                self._refusal = BadRequest("more than one Host header")
                raise _Refused()
            request.host = value
        elif lname == b"cookie":
            request.cookie = value if request.cookie is None else request.cookie + b"; " + value
        elif lname == b"content-length":
            self._content_length = value
        elif lname == b"transfer-encoding":
            self._transfer_encoding.append(value)
        elif lname == b"connection":
            lowered = value.lower()
            request.connection = (
                lowered if not request.connection else b",".join((request.connection, lowered))
            )
        elif lname == b"expect":
            request.expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        request = self._parsing
        if self._priming or request is None or self._overflow:
            return
        parser = self._parser
        request.head_size = self._head_bytes
        self._head_bytes = -1
        version = parser.get_http_version()
        try:
            if version not in ("1.1", "1.0"):
                if version == "0.9":
                    raise BadRequest("HTTP/0.9 request")
                raise VersionNotSupported(f"HTTP/{version}")
            request.version = version.encode()
            request.method = parser.get_method()
            if request.method == b"CONNECT":
                raise NotImplementedCoding("CONNECT")
            if self._content_length is not None or self._transfer_encoding:
                request.framing, request.length = request_framing(
                    request.version, self._content_length, self._transfer_encoding
                )
        except ClientError as error:
            self._refusal = error
            raise _Refused() from None
        request.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            # The parser stops after this head whatever it says; ``_upgrade_asked`` decides.
            return
        if request.framing == NO_BODY:
            request.complete = True
        self._accept(request)

    def on_body(self, body: bytes) -> None:
        if self._priming or self._overflow:
            return
        if self._left:
            self._left -= len(body)
        self._body_piece(body)

    def on_message_complete(self) -> None:
        if self._priming or self._overflow:
            return
        request = self._parsing
        if request is None or self._parser.should_upgrade():
            return  # an upgrade request's end is decided in ``_upgrade_asked``
        self._left = 0
        self._message_complete()

    # --- requests ------------------------------------------------------------------------

    def _accept(self, request: Request) -> None:
        """A request head is complete: it is served once the parser is done with this read,
        so that a framing error in the same read refuses it before anything is sent on."""
        if request.framing == LENGTH:
            self._left = request.length
        self._queue.append(request)

    def _serve_next(self) -> None:
        if self._cycle is None and self._queue and self.transport is not None:
            self._start(self._queue.popleft())

    def _start(self, request: Request) -> None:
        self.request = request
        self._idle = False
        self._sent = 0
        self._status = 0
        self._keep = True
        cycle = self._front.exchange(self, request)
        self._cycle = cycle
        request.sink = cycle
        self.deadline = NEVER
        if not request.complete:
            self._arm_body_timer()
        cycle.begin()

    def _body_piece(self, piece: bytes) -> None:
        request = self._parsing
        if request is None or not piece:
            return
        sink = request.sink
        if sink is not None:
            if self.deadline != NEVER:
                self.deadline = self._loop.time() + self._front.body_timeout
            sink.request_body(piece)
        else:
            request.pending.append(piece)

    def _message_complete(self) -> None:
        """The request being parsed has ended (the next bytes start a new one)."""
        request = self._parsing
        self._head_bytes = 0
        self._line_in = False
        if request is None or request.framing == NO_BODY:
            return  # complete since its head: the exchange knows there is no body
        request.complete = True
        sink = request.sink
        if sink is not None:
            if request is self.request:
                self.deadline = NEVER
            sink.request_end(request.trailers)

    def _upgrade_asked(self, rest: bytes) -> None:
        """The parser stopped after a request with ``Connection: upgrade``."""
        request = self._parsing
        if request is None:
            return
        upgrade = b""
        for lname, _, value in request.headers:
            if lname == b"upgrade":
                upgrade = value
        if b"websocket" in tokens(upgrade) and request.method == b"GET":
            if request.framing != NO_BODY:
                self._refuse(BadRequest("a WebSocket handshake with a body"))
                return
            request.upgrade = b"websocket"
            request.complete = True
            request.early = rest
            self._upgrade_held = True
            self._accept(request)
            if rest:
                self._set_read_pause(2, True)
            self._serve_next()
            return
        # Any other upgrade (h2c, ...) is declined: the request is plain HTTP, and its body
        # and whatever follows it are read by a parser primed with the same framing.
        if request.framing == LENGTH:
            self._prime(b"Content-Length: %d" % request.length)
        elif request.framing == CHUNKED:
            self._prime(b"Transfer-Encoding: chunked")
        if request.framing == NO_BODY:
            request.complete = True
        self._accept(request)
        if request.framing == NO_BODY:
            self._head_bytes = 0
            self._line_in = False
        if rest:
            self.data_received(rest)
        else:
            self._serve_next()

    def _prime(self, framing_header: bytes) -> None:
        self._parser = self._new_parser()
        self._priming = True
        try:
            self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing_header + b"\r\n\r\n")
        finally:
            self._priming = False
        self._head_bytes = -1

    def _refuse(self, error: StickyLBError) -> None:
        """Answer a request that cannot be served, then close; nothing more is read."""
        self._refusal = None
        self._upgrade_held = True  # read nothing more
        self._set_read_pause(2, True)
        protocol_log.info(
            "%s: refused with %d: %s", self.peer or "client", error.status, error.reason
        )
        request, cycle = self.request, self._cycle
        if cycle is not None and request is not None and not request.complete:
            # The request being served is the broken one (its body): it ends here.
            self._queue.clear()
            cycle.client_failed(error if isinstance(error, ClientError) else BadRequest())
            return
        if cycle is not None:
            self._broken = error  # answered once the request in progress is
            return
        self._queue.clear()
        self._keep = False
        self._write_answer(Answer.of(error), version=b"1.1", head_request=False)
        self._close(linger=True)

    def _client_gone(self, why: str) -> None:
        cycle = self._cycle
        if cycle is not None:
            cycle.client_failed(ClientGone(f"client {why}"))

    # --- timeouts and shutdown ---------------------------------------------------------------

    def expired(self, now: float) -> None:
        self.deadline = NEVER
        if self._lingering >= 0:
            self._close()
            return
        cycle = self._cycle
        if cycle is not None:
            if self._write_paused:
                cycle.client_failed(ClientGone("client stopped reading its answer"))
            else:
                cycle.client_failed(RequestTimeout("no request body bytes for clientBody"))
            return
        if self._idle or self._head_bytes == 0:
            self._close()  # idle past keepAlive: nothing to say
        else:
            self._refuse(RequestTimeout("request head not complete within timeouts.head"))

    def close_when_idle(self) -> None:
        if self._cycle is None:
            self._close()
        else:
            self._keep = False

    def _close(self, *, linger: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        if not linger or self._eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # the answer ends here; what the client still sends is dropped
        self._lingering = 0
        self._cycle = None
        self._queue.clear()
        self._read_pause = 0
        transport.resume_reading()
        self.deadline = self._loop.time() + LINGER_SECONDS

    # --- writing answers (called by the exchange) ------------------------------------------

    @property
    def scheme(self) -> bytes:
        return self._front.scheme

    def send_continue(self) -> None:
        request = self.request
        if request is not None and request.expect_continue and request.version == b"1.1":
            request.expect_continue = False
            if self.transport is not None and not request.complete:
                self.transport.write(CONTINUE)

    def pause_body(self) -> None:
        self._set_read_pause(1, True)

    def resume_body(self) -> None:
        self._set_read_pause(1, False)

    def send_head(
        self, status: int, reason: bytes, header_parts: list[bytes], framing: int, length: int
    ) -> None:
        """The head of a relayed answer; written with the first body bytes or the end."""
        request = self.request
        assert request is not None
        version = request.version
        keep = self._keeps(request)
        parts = [status_line(version, status, reason), *header_parts]
        self._chunked = False
        if framing == LENGTH:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif framing != NO_BODY:  # chunked from the backend, or until it closes
            if version == b"1.1":
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked = True
            else:
                keep = False
        self._keep = keep
        parts.append(_CONNECTION_HEADER[version, keep])
        self._pending_head = parts
        self._status = status

    def send_body(self, piece: bytes) -> None:
        transport = self.transport
        if transport is None or not piece:
            return
        head, self._pending_head = self._pending_head, None
        if self._chunked:
            framed = chunk(piece)
            parts = [*head, *framed] if head else framed
        elif head:
            head.append(piece)
            parts = head
        else:
            self._sent += len(piece)
            transport.write(piece)
            return
        if len(piece) <= JOIN_LIMIT:  # one write, one copy of a small piece
            data = b"".join(parts)
            self._sent += len(data)
            transport.write(data)
        else:
            self._sent += sum(map(len, parts))
            transport.writelines(parts)

    def send_end(self, trailer_parts: list[bytes] | None) -> None:
        """The relayed answer is complete."""
        transport = self.transport
        head, self._pending_head = self._pending_head, None
        if transport is not None:
            if self._chunked:
                end = last_chunk(trailer_parts)
                data = b"".join((*head, end)) if head else end
            else:
                data = b"".join(head) if head else b""
            if data:
                transport.write(data)
                self._sent += len(data)
        self._answered()

    def send_answer(self, answer: Answer, *, close: bool = False) -> None:
        """A complete answer of our own, instead of a relayed one."""
        request = self.request
        assert request is not None
        self._keep = not close and self._keeps(request)
        self._write_answer(answer, version=request.version, head_request=request.method == b"HEAD")
        self._answered()

    def abort(self) -> None:
        """The answer cannot be completed: close, so the client sees it cut short."""
        self._keep = False
        self._pending_head = None
        self._close()
        self._answered()

    def upgrade(self, head: bytes, open_tunnel: Callable[[asyncio.Transport | None], None]) -> None:
        """Write ``head`` (a 101), then give the socket to the tunnel ``open_tunnel`` makes:
        this protocol lets go of it for good (None when the client has gone meanwhile)."""
        transport = self.transport
        request, cycle = self.request, self._cycle
        self._front.forget(self)
        self._cycle = None
        self._queue.clear()
        self._parsing = None
        self._parser = _SPENT_PARSER  # nothing of this protocol may outlive the handover
        self.transport = None
        self.deadline = NEVER
        if request is not None:
            request.sink = None
            self._status = 101
            self._sent = len(head)
            self._log(request, cycle)
        if transport is None or transport.is_closing():
            open_tunnel(None)
            return
        transport.write(head)
        if self._read_pause:
            self._read_pause = 0
            transport.resume_reading()
        open_tunnel(transport)

    def tunnel_closed(self) -> None:
        pass

    def _log(self, request: Request, cycle: Exchange | None) -> None:
        access_log = self._front.access_log
        if access_log is not None:
            access_log.log(
                self.peer,
                request.method,
                request.target,
                request.version,
                request.headers,
                self._status,
                self._sent,
                cycle.details(request.head_size) if cycle is not None else None,
            )

    def _keeps(self, request: Request) -> bool:
        # With more requests queued, the ending (EOF, too many queued) waits for the last one.
        return (
            request.keep_alive
            and request.complete
            and self._keep
            and self._broken is None
            and ((not self._overflow and not self._eof) or bool(self._queue))
            and not self._front.closing
        )

    def _write_answer(self, answer: Answer, *, version: bytes, head_request: bool) -> None:
        transport = self.transport
        self._status = answer.status
        self._front.stats.own_answers[answer.status] += 1
        if transport is None:
            return
        head = b"".join(
            (
                status_line(version, answer.status),
                b"Content-Type: %s\r\nContent-Length: %d\r\n"
                % (
                    answer.content_type,
                    len(answer.body),
                ),
                _CONNECTION_HEADER[version, self._keep],
            )
        )
        body = b"" if head_request else answer.body
        self._sent += len(head) + len(body)
        transport.write(head + body)

    def _answered(self) -> None:
        """The current request is done: on to the next one, or close."""
        cycle = self._cycle
        if cycle is None:
            return
        self._cycle = None
        request = self.request
        if request is not None:
            request.sink = None
            if self._front.access_log is not None:
                self._log(request, cycle)
        self.request = None
        transport = self.transport
        if transport is None:
            return
        if not self._keep:
            self._close(linger=request is not None and not request.complete)
            return
        if self._broken is not None:
            error, self._broken = self._broken, None
            self._queue.clear()
            self._keep = False
            self._write_answer(Answer.of(error), version=b"1.1", head_request=False)
            self._close(linger=True)
            return
        if self._queue:
            self._start(self._queue.popleft())
            return
        if self._overflow or self._eof:
            self._close()
            return
        self._idle = self._head_bytes == 0
        if self._idle:
            self.deadline = self._loop.time() + self._front.keep_alive
        else:
            self.deadline = self._loop.time() + self._front.head_timeout
        if self._read_pause:
            self._set_read_pause(3, False)


# The end of an answer's head, by the client's version and whether the connection stays open.
_CONNECTION_HEADER = {
    (b"1.1", True): b"\r\n",
    (b"1.1", False): b"Connection: close\r\n\r\n",
    (b"1.0", True): b"Connection: keep-alive\r\n\r\n",
    (b"1.0", False): b"\r\n",
}
