"""Theory of operation: relaying a WebSocket between a client and its sticky backend.

The upgrade goes through the same sticky choice as plain HTTP. The client's handshake request
(key, version, subprotocols, extensions) goes to the backend first; only when the backend
answers 101 does the client get its 101, carrying the backend's handshake answer plus our
cookie. A backend that refuses gives the client a 502 instead, and one that cannot be reached
is retried on another.

After the handshake the relay is a tunnel, as in HAProxy and nginx: each connection's protocol
becomes a ``TunnelEnd`` (aiohttp's protocols step aside), and frames pass through byte for byte,
in both directions, from inside ``data_received`` (no task, no decoding, no re-encoding). When
one connection's send buffer is full, the other is not read until it drains: memory stays
bounded whichever side is slow. Each direction has a ``FrameTracker`` that follows frame headers
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
        self._idle = idle
        self._client = TunnelEnd(self, client, FrameTracker(max_message))
        self._backend = TunnelEnd(self, backend, FrameTracker(max_message))
        self._client.peer, self._backend.peer = self._backend, self._client
        self._idle_timer = loop.call_later(idle, self._check_idle) if idle else None
        backend.read_timeout = None  # type: ignore[attr-defined]  # an idle gap is ours to judge
        client.keep_alive(False)  # type: ignore[attr-defined]
        # Bytes that came with the handshake are handed over as parser input, then each
        # connection's reads go to its end directly, without aiohttp's protocol in between.
        backend.set_parser(self._backend, None)  # type: ignore[attr-defined]
        client.set_parser(self._client)  # type: ignore[attr-defined]
        self._backend.install()
        self._client.install()

    def _check_idle(self) -> None:
        if self._client.active or self._backend.active:
            self._client.active = self._backend.active = False
            assert self._idle is not None
            self._idle_timer = asyncio.get_running_loop().call_later(self._idle, self._check_idle)
        else:
            self.close(WSCloseCode.GOING_AWAY, "idle timeout")

    def close(self, code: int, reason: str = "") -> None:
        """End the tunnel: our close frame to each side that is between frames, then hang up.
        Does nothing once the tunnel is closed (so a peer's own close is never overridden)."""
        if self.closed.done():
            return
        # Each end has passed its reads to the other: that decides where the other's stream is.
        for sender, receiver, masked in (
            (self._backend, self._client, False),
            (self._client, self._backend, True),
        ):
            if receiver.transport is not None and sender.between_frames:
                receiver.transport.write(close_frame(code, reason, masked=masked))
        self.hang_up()

    def hang_up(self) -> None:
        """Close both connections (after what is queued for them is written)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for end in (self._client, self._backend):
            if end.transport is not None:
                end.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)


class TunnelEnd(asyncio.Protocol):
    """One connection of a tunnel, which becomes its protocol once the handshake is done:
    every read is written to the peer end's connection as it came, and while that connection
    cannot take more, this one is not read (the transport's own flow control, both ways).

    ``origin`` is the aiohttp protocol the connection had; it is still told when the
    connection is lost, so aiohttp's server and our backend connection clean up as usual."""

    __slots__ = ("_origin", "_tunnel", "active", "between_frames", "frames", "peer", "transport")

    def __init__(self, tunnel: Tunnel, origin: BaseProtocol, frames: FrameTracker) -> None:
        self._tunnel = tunnel
        self._origin = origin
        self.transport = origin.transport
        self.frames = frames
        self.peer: TunnelEnd = self
        self.active = False  # read since the idle timer last looked
        self.between_frames = True  # whether what this end passed on ends with a whole frame

    def install(self) -> None:
        if self.transport is None:  # lost during the handshake: the origin saw it
            self._tunnel.hang_up()
            return
        self.transport.set_protocol(self)
        if self._origin.writing_paused:
            self.pause_writing()  # resume_writing now comes to us

    def data_received(self, data: bytes) -> None:
        self.active = True
        sink = self.peer.transport
        if sink is None:
            return
        if self.frames.feed(data):
            # Nothing of this read goes out, so the peer stays where it was, frame-wise.
            self._tunnel.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return
        sink.write(data)
        self.between_frames = self.frames.at_boundary

    def pause_writing(self) -> None:
        # This connection's send buffer is full of what the peer sent: stop reading the peer.
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> None:
        pass  # the transport closes itself, and connection_lost hangs up the peer

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._origin.connection_lost(exc)
        self._tunnel.hang_up()
        # Nothing calls this end any more. Without its links back, the tunnel and both
        # connections are freed by reference counting, not by a rare full GC pass.
        del self._tunnel, self._origin, self.peer

    # As the origin's payload parser (only for the bytes that came with the handshake, and
    # for the origin's own end-of-connection calls).

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data_received(data)
        return False, b""

    def feed_eof(self) -> None:
        self._tunnel.hang_up()

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        self._tunnel.hang_up()
