"""Theory of operation: relaying a WebSocket between a client and its sticky backend.

The upgrade goes through the same sticky choice as plain HTTP. The backend handshake happens
first, offering the client's subprotocols; only when the backend accepts does the client's
handshake complete (101, with our cookie and the protocol the backend chose). A backend that
refuses gives the client a 502 instead, and one that cannot be reached is retried on another.

Once both sides are open, two pumps copy messages (text, binary, ping, pong) each way; the first
close, from either side, is passed on with its code and reason and ends both pumps. Automatic
pings are off on both legs so pings and pongs travel end to end. The connection counts as one
active connection on its backend for its whole life.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from .config import Config
from .errors import UpstreamError
from .headers import (
    WEBSOCKET_HANDSHAKE_HEADERS,
    offered_subprotocols,
    origin_form,
)
from .pool import Backend, Choice, Pool
from .proxy import Forwarding, error_response
from .upstream import describe_client_error

log = logging.getLogger("stickylb.websocket")

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
# Codes a peer may not put on the wire (RFC 6455 7.4.1); replaced by a plain normal closure.
_RESERVED_CLOSE_CODES = frozenset({0, 1004, 1005, 1006, 1015})


class WebSocketRelay:
    def __init__(
        self,
        config: Config,
        pool: Pool,
        forwarding: Forwarding,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._pool = pool
        self._forwarding = forwarding
        self._session = session
        self._retries = config.retries
        self._max_message = config.websocket.max_message_size
        self._idle = config.timeouts.websocket_idle or None
        self._connect_timeout = config.timeouts.connect
        self._open: set[tuple[web.WebSocketResponse, aiohttp.ClientWebSocketResponse]] = set()

    async def __call__(self, request: web.Request, choice: Choice) -> web.StreamResponse:
        tried: tuple[Backend, ...] = ()
        while True:
            backend = choice.backend
            self._pool.acquire(backend)
            try:
                try:
                    upstream = await self._connect(request, backend)
                except UpstreamError as exc:
                    tried += (backend,)
                    if not exc.request_sent:
                        self._pool.record_passive_failure(backend, exc.reason)
                    retry = None
                    if not exc.request_sent and len(tried) <= self._retries:
                        retry = self._pool.choose(None, exclude=tried)
                    if retry is None:
                        log.warning(
                            "WebSocket %s -> backend %s failed: %s",
                            request.path,
                            backend.id,
                            exc.reason,
                        )
                        return error_response(exc)
                    choice = Choice(retry.backend, repinned=True)
                    continue
                return await self._relay(request, choice, upstream)
            finally:
                self._pool.release(backend)

    async def _connect(
        self, request: web.Request, backend: Backend
    ) -> aiohttp.ClientWebSocketResponse:
        headers = self._forwarding.upstream_headers(request, backend, WEBSOCKET_HANDSHAKE_HEADERS)
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                return await self._session().ws_connect(
                    URL(backend.base + (origin_form(request.raw_path) or "/"), encoded=True),
                    protocols=offered_subprotocols(request.headers),
                    headers=headers,
                    autoping=False,
                    autoclose=True,
                    max_msg_size=self._max_message,
                    compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(
                f"backend refused the upgrade (status {exc.status})", request_sent=True
            ) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise describe_client_error(exc, self._connect_timeout, self._connect_timeout) from None

    async def _relay(
        self, request: web.Request, choice: Choice, upstream: aiohttp.ClientWebSocketResponse
    ) -> web.StreamResponse:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            max_msg_size=self._max_message,
        )
        self._forwarding.mark(client.headers, choice)
        pair = (client, upstream)
        pumps: list[asyncio.Task[None]] = []
        try:
            await client.prepare(request)
            self._open.add(pair)
            activity = [time.monotonic()]
            pumps = [
                asyncio.create_task(self._pump(client, upstream, activity)),
                asyncio.create_task(self._pump(upstream, client, activity)),
            ]
            # The first pump ends when its source closes; it has already passed the close on.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except ConnectionResetError:
            log.debug("WebSocket %s: client disconnected", request.path)
        finally:
            # Also reached when the handler is cancelled because the client vanished: the
            # client's close code, if it sent one, still reaches the backend.
            self._open.discard(pair)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if not upstream.closed:
                await upstream.close(code=_sendable(client.close_code, WSCloseCode.GOING_AWAY))
            if not client.closed:
                with suppress(Exception):
                    await client.close(code=_sendable(upstream.close_code, WSCloseCode.GOING_AWAY))
        return client

    async def _pump(self, source: AnyWebSocket, sink: AnyWebSocket, activity: list[float]) -> None:
        """Copy messages from ``source`` to ``sink`` until either side closes."""
        while True:
            try:
                message = await source.receive(timeout=self._idle)
            except TimeoutError:
                if self._idle is not None and time.monotonic() - activity[0] >= self._idle:
                    await _close_both(source, sink, WSCloseCode.GOING_AWAY, "idle timeout")
                    return
                continue
            activity[0] = time.monotonic()
            kind = message.type
            try:
                if kind is WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif kind is WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif kind is WSMsgType.PING:
                    await sink.ping(message.data)
                elif kind is WSMsgType.PONG:
                    await sink.pong(message.data)
                elif kind is WSMsgType.CLOSE:
                    code = _sendable(message.data, WSCloseCode.OK)
                    await sink.close(code=code, message=(message.extra or "").encode()[:123])
                    return
                else:  # CLOSING, CLOSED, ERROR: the source is gone without a proper close
                    await sink.close(code=_sendable(source.close_code, WSCloseCode.GOING_AWAY))
                    return
            except ConnectionResetError:
                await _close_both(source, sink, WSCloseCode.GOING_AWAY, "")
                return

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY, reason: str = "") -> None:
        """Close every relayed WebSocket (at shutdown: 1001, going away)."""
        await asyncio.gather(
            *(_close_both(client, upstream, code, reason) for client, upstream in list(self._open)),
            return_exceptions=True,
        )


def _sendable(code: int | None, fallback: int) -> int:
    return fallback if code is None or code in _RESERVED_CLOSE_CODES else code


async def _close_both(first: AnyWebSocket, second: AnyWebSocket, code: int, reason: str) -> None:
    for ws in (first, second):
        if not ws.closed:
            with suppress(Exception):
                await ws.close(code=code, message=reason.encode())
