"""Theory of operation: relaying a WebSocket between a client and its sticky backend.

The upgrade goes through the same sticky choice as plain HTTP. The client's handshake request
(key, version, subprotocols, extensions) goes to the backend first; only when the backend
answers 101 does the client get its 101, carrying the backend's handshake answer plus our
cookie. A backend that refuses gives the client a 502 instead, and one that cannot be reached
is retried on another.

After the handshake the relay is a tunnel, as in HAProxy and nginx: frames pass through
byte for byte, in both directions, from inside each connection's ``data_received`` (no task, no
decoding, no re-encoding). Each direction has a ``FrameTracker`` that follows frame headers
only: it enforces ``websocket.maxMessageSize`` (close 1009) and tells where a frame of our own
may go. Close frames, pings and pongs are the peers' own and travel end to end. The proxy
speaks only to end a tunnel itself (idle timeout or shutdown: 1001; oversize: 1009), writing a
close frame on each side that sits between frames; then both connections are closed. A
WebSocket counts as one active connection on its backend for its whole life.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, hdrs, web
from aiohttp.base_protocol import BaseProtocol

from .config import Config
from .errors import UpstreamError
from .headers import downstream_headers, origin_form
from .pool import Backend, Choice, Pool
from .proxy import Forwarding, Incoming, error_response
from .upstream import Upstream, UpstreamResponse
from .ws_frames import FrameTracker, close_frame

log = logging.getLogger("stickylb.websocket")


class WebSocketRelay:
    def __init__(
        self,
        config: Config,
        pool: Pool,
        forwarding: Forwarding,
        upstream: Callable[[], Upstream],
    ) -> None:
        self._pool = pool
        self._forwarding = forwarding
        self._upstream = upstream
        self._retries = config.retries
        self._max_message = config.websocket.max_message_size
        self._idle = config.timeouts.websocket_idle or None
        self._connect_timeout = config.timeouts.connect
        self._open: set[Tunnel] = set()

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

    async def _connect(self, request: web.Request, backend: Backend) -> UpstreamResponse:
        headers = self._forwarding.upstream_headers(Incoming.of(request), backend, frozenset())
        headers[hdrs.CONNECTION] = "Upgrade"
        headers[hdrs.UPGRADE] = "websocket"
        target = origin_form(request.raw_path) or "/"
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                response = await self._upstream().request(backend, "GET", target, headers, None)
        except TimeoutError:
            raise UpstreamError("upgrade timed out", request_sent=True) from None
        if response.status != 101:
            response.close()
            raise UpstreamError(
                f"backend refused the upgrade (status {response.status})", request_sent=True
            )
        return response

    async def _relay(
        self, request: web.Request, choice: Choice, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        headers = downstream_headers(upstream.headers)
        headers[hdrs.CONNECTION] = "Upgrade"
        headers[hdrs.UPGRADE] = "websocket"
        self._forwarding.mark(headers, choice)
        response = web.StreamResponse(status=101, reason="Switching Protocols", headers=headers)
        response.force_close()
        try:
            await response.prepare(request)
        except ConnectionResetError:
            upstream.close()
            return response
        tunnel = Tunnel(request.protocol, upstream.detach(), self._max_message, self._idle)
        self._open.add(tunnel)
        try:
            await tunnel.closed
        finally:
            # Also reached when the handler is cancelled because the client vanished.
            self._open.discard(tunnel)
            tunnel.close(WSCloseCode.GOING_AWAY)
        return response

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY, reason: str = "") -> None:
        """Close every relayed WebSocket (at shutdown: 1001, going away)."""
        for tunnel in list(self._open):
            tunnel.close(code, reason)


class Tunnel:
    """A client connection and a backend connection, joined after a WebSocket handshake."""

    def __init__(
        self,
        client: BaseProtocol,
        backend: BaseProtocol,
        max_message: int | None,
        idle: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._client = client
        self._backend = backend
        self._activity = 0
        self._idle = idle
        # What each side has been sent so far, frame-wise (a close of ours must not land
        # inside a frame): the client is sent the backend's frames and the other way round.
        self._to_client = Direction(self, backend, client, FrameTracker(max_message))
        self._to_backend = Direction(self, client, backend, FrameTracker(max_message))
        self._idle_timer = loop.call_later(idle, self._check_idle) if idle else None
        # Both protocols hand any bytes that arrived with the handshake to the parser at once.
        backend.read_timeout = None  # type: ignore[attr-defined]  # an idle gap is ours to judge
        backend.set_parser(self._to_client, self._to_client)  # type: ignore[attr-defined]
        client.set_parser(self._to_backend)  # type: ignore[attr-defined]
        client.keep_alive(False)  # type: ignore[attr-defined]

    def touch(self) -> None:
        self._activity += 1

    def _check_idle(self) -> None:
        if self._activity:
            self._activity = 0
            assert self._idle is not None
            self._idle_timer = asyncio.get_running_loop().call_later(self._idle, self._check_idle)
        else:
            self.close(WSCloseCode.GOING_AWAY, "idle timeout")

    def close(self, code: int, reason: str = "") -> None:
        """End the tunnel: our close frame to each side that is between frames, then hang up.
        Does nothing once the tunnel is closed (so a peer's own close is never overridden)."""
        if self.closed.done():
            return
        for direction, masked in ((self._to_client, False), (self._to_backend, True)):
            transport = direction.sink.transport
            if transport is not None and direction.between_frames:
                transport.write(close_frame(code, reason, masked=masked))
        self.hang_up()

    def hang_up(self) -> None:
        """Close both connections (after what is queued for them is written)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for protocol in (self._client, self._backend):
            if protocol.transport is not None:
                protocol.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)


class Direction:
    """One direction of a tunnel, installed as the source connection's payload parser: every
    read from ``source`` is written to ``sink`` as it came. While the sink cannot take more,
    the source stops being read."""

    __slots__ = ("_tunnel", "between_frames", "frames", "sink", "source")

    def __init__(
        self, tunnel: Tunnel, source: BaseProtocol, sink: BaseProtocol, frames: FrameTracker
    ) -> None:
        self._tunnel = tunnel
        self.source = source
        self.sink = sink
        self.frames = frames
        self.between_frames = True  # whether what the sink got so far ends with a whole frame

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        tunnel = self._tunnel
        tunnel.touch()
        sink = self.sink.transport
        if sink is None:
            return False, b""
        if self.frames.feed(data):
            # Nothing of this read goes out, so the sink stays where it was, frame-wise.
            tunnel.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return False, b""
        sink.write(data)
        self.between_frames = self.frames.at_boundary
        if self.sink.writing_paused:
            self._pause_source()
        return False, b""

    def _pause_source(self) -> None:
        source = self.source.transport
        if source is None:
            return
        source.pause_reading()

        async def resume_when_drained() -> None:
            try:
                await self.sink._drain_helper()
            except ConnectionError:
                return
            if self.source.transport is not None:
                self.source.transport.resume_reading()

        task = asyncio.get_running_loop().create_task(resume_when_drained())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def feed_eof(self) -> None:
        """The source connection is gone: hang up the other one too."""
        self._tunnel.hang_up()

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        self._tunnel.hang_up()


_background: set[asyncio.Task[None]] = set()  # keeps resume tasks referenced until they finish
