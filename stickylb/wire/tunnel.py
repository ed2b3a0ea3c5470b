"""Theory of operation: a WebSocket after its handshake, as a tunnel between two sockets.

Once the backend has answered 101 and the client has its 101, each socket's protocol becomes a
``TunnelEnd`` (``transport.set_protocol``), and frames pass through byte for byte in both
directions from inside ``data_received``: no task, no decoding, no re-encoding. When one
socket's send buffer is full, the other is not read until it drains, so memory stays bounded
whichever side is slow. Each direction has a ``FrameTracker`` that follows frame headers only:
it enforces ``websocket.maxMessageSize`` (close 1009) and the frame rules of RFC 6455 (close
1002), and tells where a frame of our own may go.

Close frames, pings and pongs are the peers' own and travel end to end. The proxy speaks only
to end a tunnel itself (idle timeout or shutdown: 1001; drained for maint, removal or
shutdown under ``websocket.drainTimeout``: 1012; oversize: 1009; protocol error: 1002),
writing a close frame to each side whose stream sits between frames; then both sockets are
closed. ``on_closed`` is called exactly once, when the tunnel ends for whatever reason (the
exchange that opened it releases its slots there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .deadlines import NEVER, Sweeper
from .ws_frames import OK, FrameTracker, close_frame

GOING_AWAY = 1001
REASONS = {
    1001: "going away",
    1002: "protocol error",
    1009: "message too big",
    1012: "service restart",
}


class Tunnel:
    """A client socket and a backend socket, joined after a WebSocket handshake."""

    __slots__ = ("_backend", "_client", "_idle", "_on_closed", "_sweeper", "closed", "deadline")

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *,
        max_message: int | None,
        idle: float,
        sweeper: Sweeper,
        on_closed: Callable[[Tunnel], None],
        client_protocol: asyncio.BaseProtocol | None = None,
    ) -> None:
        self.closed = False
        self._idle = idle
        self._sweeper = sweeper
        self._on_closed = on_closed
        self._client = TunnelEnd(self, client, FrameTracker(max_message, masked=True))
        self._client.origin = client_protocol
        self._backend = TunnelEnd(self, backend, FrameTracker(max_message, masked=False))
        self._client.peer, self._backend.peer = self._backend, self._client
        self.deadline = asyncio.get_running_loop().time() + idle if idle else NEVER
        sweeper.watch(self)

    def start(self, client_early: bytes, backend_early: bytes) -> None:
        """Take over both sockets; bytes that came with the handshakes go through first."""
        for end in (self._client, self._backend):
            end.install()
        if backend_early:
            self._backend.data_received(backend_early)
        if client_early:
            self._client.data_received(client_early)

    def messages(self) -> tuple[int, int]:
        """Whole data messages so far: client to backend, backend to client."""
        return self._client.frames.messages, self._backend.frames.messages

    def expired(self, now: float) -> None:
        if self._client.active or self._backend.active:
            self._client.active = self._backend.active = False
            self.deadline = now + self._idle
        else:
            self.close(GOING_AWAY, "idle timeout")

    def close(self, code: int, reason: str = "") -> None:
        """End the tunnel: our close frame to each side that is between frames, then hang up.
        Does nothing once the tunnel is closed (a peer's own close is never overridden)."""
        if self.closed:
            return
        # Each end has passed its reads to the other: that decides where the other's stream is.
        for sender, receiver, masked in (
            (self._backend, self._client, False),
            (self._client, self._backend, True),
        ):
            if receiver.transport is not None and sender.frames.at_boundary:
                receiver.transport.write(close_frame(code, reason, masked=masked))
        self.hang_up()

    def hang_up(self) -> None:
        """Close both sockets (after what is queued for them is written)."""
        if self.closed:
            return
        self.closed = True
        self.deadline = NEVER
        self._sweeper.forget(self)
        for end in (self._client, self._backend):
            if end.transport is not None:
                end.transport.close()
        on_closed, self._on_closed = self._on_closed, _nothing
        on_closed(self)


def _nothing(tunnel: Tunnel) -> None:
    pass


class TunnelEnd(asyncio.Protocol):
    """One socket of a tunnel: every read is written to the peer end's socket as it came,
    and while that socket cannot take more, this one is not read."""

    __slots__ = ("_tunnel", "active", "frames", "origin", "peer", "transport")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, frames: FrameTracker) -> None:
        self._tunnel: Tunnel | None = tunnel
        # The protocol the socket had, when it is not ours (an embedding aiohttp server's): it
        # is still told when the socket is lost, so it cleans up as usual.
        self.origin: asyncio.BaseProtocol | None = None
        self.transport: asyncio.Transport | None = transport
        self.frames = frames
        self.peer: TunnelEnd | None = None
        self.active = False  # read since the idle check last looked

    def install(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing():  # lost during the handshake
            self.transport = None
            if self._tunnel is not None:
                self._tunnel.hang_up()
            return
        transport.set_protocol(self)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.active = True
        peer = self.peer
        sink = peer.transport if peer is not None else None
        if sink is None:
            return
        verdict = self.frames.feed(data)
        if verdict != OK:
            # Nothing of this read goes out, so the tracker still says where the peer's stream
            # is, frame-wise (a failed feed leaves ``at_boundary`` as the last good one set it).
            if self._tunnel is not None:
                self._tunnel.close(verdict, REASONS[verdict])
            return
        sink.write(data)

    def pause_writing(self) -> None:
        # This socket's send buffer is full of what the peer sent: stop reading the peer.
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the transport closes itself, and connection_lost hangs up the peer

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        origin, self.origin = self.origin, None
        if origin is not None:
            origin.connection_lost(exc)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.hang_up()
        # Nothing calls this end any more. Without its link to the peer, the tunnel and both
        # ends are freed by reference counting, not by a rare full GC pass.
        self.peer = None
