"""The floor: the leanest asyncio program that moves a proxy's bytes.

A TCP relay with no HTTP parsing, no balancing, no health checks and no headers: each client
connection gets its own connection to one backend, and every read is written to the other side
as it came, with the transports' own flow control. No proxy on the same event loop can spend
less CPU per request or per message than this, so the benchmark runs it beside stickylb: the
gap between stickylb and HAProxy splits into what the loop costs (this relay against HAProxy)
and what stickylb adds (stickylb against this relay).

    python -m benchmarks.relay LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import sys

PENDING_LIMIT = 1 << 16  # bytes a client may send before its backend connection is up


class End(asyncio.Protocol):
    """One connection; what it reads goes to ``peer``'s connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: End | None = None
        self.pending: list[bytes] = []  # read before the peer's connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
            return
        self.pending.append(data)
        if self.transport is not None and sum(map(len, self.pending)) > PENDING_LIMIT:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class Client(End):
    def __init__(self, backend_port: int, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self._backend_port = backend_port
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, backend = await loop.create_connection(End, "127.0.0.1", self._backend_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert backend.transport is not None
        if self.transport is None:  # the client left meanwhile
            backend.transport.close()
            return
        backend.peer, self.peer = self, backend
        backend.transport.writelines(self.pending)
        self.pending.clear()
        self.transport.resume_reading()


async def serve(listen_port: int, backend_port: int) -> None:
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(backend_port, tasks), "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
