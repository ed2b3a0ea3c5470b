"""Theory of operation: requests that an embedding aiohttp application hands to the balancer.

``install(app, config)`` routes every path the application does not serve itself to
``handler(pipeline)``. Such a request was parsed by aiohttp's server, so it enters the request
pipeline here, as a ``wire.client.Request`` built from aiohttp's public request API, and its
answer goes back through ``web.StreamResponse``: the same ``RequestCycle`` decides, retries and
relays as for ``python -m stickylb``, and only the two ends differ.

The cycle works from callbacks (a backend's read arrives in ``data_received``), while aiohttp
writes with coroutines: ``AiohttpClient`` queues what the cycle sends and the handler's
coroutine writes it out in order. Once more than ``HIGH_WATER`` bytes wait, the cycle is told
the client cannot take more (reading from the backend pauses), and told again when they have
gone. A WebSocket handshake becomes the same byte tunnel as on stickylb's own server: the 101
goes out through aiohttp, then the socket (``request.transport``) is given to the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDict

from .core.errors import ClientGone
from .core.headers import tokens
from .core.stats import Stats
from .pipeline import Pipeline, RequestCycle
from .wire.client import Request
from .wire.http1 import CHUNKED, LENGTH, NO_BODY, Answer

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

Event = tuple[Any, ...]


def handler(pipeline: Pipeline) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def balance(request: web.Request) -> web.StreamResponse:
        client = AiohttpClient(request, pipeline.stats)
        cycle = pipeline.exchange(client, _request_of(request))
        client.cycle = cycle
        return await client.serve()

    return balance


def _request_of(request: web.Request) -> Request:
    out = Request()
    out.method = request.method.encode()
    out.target = request.raw_path.encode("utf-8", "surrogateescape")
    out.version = b"%d.%d" % (request.version.major, request.version.minor)
    out.headers = [(name.lower(), name, value) for name, value in request.raw_headers]
    out.keep_alive = request.keep_alive
    out.host = request.headers.get(hdrs.HOST, "").encode("utf-8", "surrogateescape") or None
    cookie = request.headers.get(hdrs.COOKIE)
    out.cookie = cookie.encode("utf-8", "surrogateescape") if cookie is not None else None
    connection = ",".join(request.headers.getall(hdrs.CONNECTION, ()))
    out.connection = connection.lower().encode("latin-1", "replace")
    upgrade = request.headers.get(hdrs.UPGRADE, "").encode()
    if b"websocket" in tokens(upgrade) and b"upgrade" in tokens(out.connection):
        out.upgrade = b"websocket"
    if "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower():
        out.framing = CHUNKED
    elif request.content_length:
        out.framing, out.length = LENGTH, request.content_length
    else:
        out.framing = NO_BODY
    out.complete = out.framing == NO_BODY
    return out


class AiohttpClient:
    """The client's side of a ``RequestCycle`` for a request aiohttp's server parsed."""

    def __init__(self, request: web.Request, stats: Stats) -> None:
        self._request = request
        self._stats = stats
        self.peer = request.remote
        self.peer_bytes = (request.remote or "").encode()
        self.scheme = request.scheme.encode()
        self.cycle: RequestCycle | None = None
        self._events: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._waiting = 0  # body bytes queued, not yet written
        self._held_back = False  # the cycle was told we cannot take more
        self._body_go = asyncio.Event()
        self._body_go.set()
        self._tunnel_closed: asyncio.Future[None] | None = None

    # --- what the cycle calls ----------------------------------------------------------------

    def send_continue(self) -> None:
        pass  # aiohttp's server answered "100 Continue" before the handler ran

    def pause_body(self) -> None:
        self._body_go.clear()

    def resume_body(self) -> None:
        self._body_go.set()

    def send_head(
        self, status: int, reason: bytes, header_parts: list[bytes], framing: int, length: int
    ) -> None:
        self._push(("head", status, reason, header_parts, framing, length))

    def send_body(self, piece: bytes) -> None:
        self._waiting += len(piece)
        self._push(("body", piece))
        if self._waiting > HIGH_WATER and not self._held_back and self.cycle is not None:
            self._held_back = True
            self.cycle.client_writable(False)

    def send_end(self, trailer_parts: list[bytes] | None) -> None:
        self._push(("end",))

    def send_answer(self, answer: Answer, *, close: bool = False) -> None:
        self._stats.own_answers[answer.status] += 1
        self._push(("answer", answer, close))

    def abort(self) -> None:
        self._push(("abort",))

    def upgrade(self, head: bytes, open_tunnel: Callable[..., None]) -> None:
        self._push(("upgrade", head, open_tunnel))

    def _push(self, event: Event) -> None:
        self._events.append(event)
        self._wake.set()

    # --- the handler's coroutine -----------------------------------------------------------

    async def serve(self) -> web.StreamResponse:
        cycle = self.cycle
        assert cycle is not None
        reader = None
        try:
            cycle.begin()
            if self._request.body_exists:
                reader = asyncio.get_running_loop().create_task(self._read_body(cycle))
            return await self._write_answer()
        except asyncio.CancelledError:
            cycle.client_failed(ClientGone("client disconnected"))
            raise
        finally:
            if reader is not None:
                reader.cancel()

    async def _read_body(self, cycle: RequestCycle) -> None:
        content = self._request.content
        while True:
            await self._body_go.wait()
            piece = await content.readany()
            if not piece:
                break
            cycle.request_body(piece)
        cycle.request_end(None)

    async def _next(self) -> Event:
        while not self._events:
            self._wake.clear()
            await self._wake.wait()
        return self._events.popleft()

    async def _write_answer(self) -> web.StreamResponse:
        request = self._request
        response: web.StreamResponse | None = None
        while True:
            event = await self._next()
            kind = event[0]
            if kind == "answer":
                answer, close = event[1], event[2]
                own = web.Response(
                    status=answer.status,
                    body=answer.body,
                    headers={hdrs.CONTENT_TYPE: answer.content_type.decode()},
                )
                if close:
                    own.force_close()
                return own
            if kind == "head":
                _, status, reason, parts, framing, length = event
                whole = self._whole_body()
                if whole is not None:
                    # All of it is here (the usual small answer): an ordinary response, which
                    # the application's middlewares and signals may still change.
                    return web.Response(
                        status=status,
                        reason=reason.decode("latin-1") or None,
                        headers=_headers(parts),
                        body=whole,
                    )
                response = web.StreamResponse(
                    status=status, reason=reason.decode("latin-1") or None, headers=_headers(parts)
                )
                if framing == LENGTH:
                    response.content_length = length
                elif framing != NO_BODY and request.version >= (1, 1):
                    response.enable_chunked_encoding()
                await response.prepare(request)
            elif kind == "body":
                assert response is not None
                piece = event[1]
                await response.write(piece)
                self._waiting -= len(piece)
                if self._held_back and self._waiting < LOW_WATER and self.cycle is not None:
                    self._held_back = False
                    self.cycle.client_writable(True)
            elif kind == "end":
                assert response is not None
                await response.write_eof()
                return response
            elif kind == "abort":
                if request.transport is not None:
                    request.transport.close()  # cut short: the client must not see an end
                return response or web.Response(status=502)
            elif kind == "upgrade":
                return await self._upgrade(event[1], event[2])

    def _whole_body(self) -> bytes | None:
        """The body, when every piece of it and its end are already queued."""
        events = self._events
        if not events or events[-1][0] != "end":
            return None
        if any(event[0] != "body" for event in list(events)[:-1]):
            return None
        body = b"".join(event[1] for event in list(events)[:-1])
        events.clear()
        self._waiting = 0
        return body

    async def _upgrade(self, head: bytes, open_tunnel: Callable[..., None]) -> web.StreamResponse:
        lines = head.split(b"\r\n")
        reason = lines[0].split(b" ", 2)[2] if lines[0].count(b" ") >= 2 else b""
        response = web.StreamResponse(
            status=101,
            reason=reason.decode("latin-1") or None,
            headers=_headers([line + b"\r\n" for line in lines[1:] if line]),
        )
        response.force_close()  # aiohttp ends the connection once the tunnel is over
        try:
            await response.prepare(self._request)
        except ConnectionError:
            open_tunnel(None)
            return response
        transport = self._request.transport
        if transport is None or transport.is_closing():
            open_tunnel(None)
            return response
        closed = asyncio.get_running_loop().create_future()
        self._tunnel_closed = closed
        # aiohttp's protocol is still told when the socket is lost, so it cleans up as usual.
        open_tunnel(transport, transport.get_protocol())
        with contextlib.suppress(asyncio.CancelledError):
            await closed
        return response

    def tunnel_closed(self) -> None:
        future = self._tunnel_closed
        if future is not None and not future.done():
            future.set_result(None)


def _headers(parts: list[bytes]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in b"".join(parts).split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
    return headers
