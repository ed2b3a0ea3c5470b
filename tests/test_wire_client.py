"""The client side of the wire (stickylb/wire/client.py): every request on one connection, in
order, whatever it carries; framing for each kind of client; timeouts. Raw sockets on
127.0.0.1, so every byte of framing is visible."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from stickylb.app import build_app, install
from stickylb.config import build_config

from .support import (
    SEEN,
    Running,
    backends,
    backends_config,
    balancer,
    cyclic_garbage,
    start_app,
    until,
)
from .test_wire_backend import RawBackend, ok, raw_config

QUIET_HEALTH = {"interval": "30s"}


@dataclass
class Reply:
    version: str
    status: int
    headers: dict[str, str]  # lower-cased names; the last value wins
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class RawClient:
    """One client connection that writes bytes as given and reads replies one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, head_only: bool = False) -> Reply:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        version, status, _ = status_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        code = int(status)
        if head_only or code in (204, 304):
            body = b""
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = await self._chunked()
        else:
            body = await asyncio.wait_for(self.reader.read(), 5)  # until the proxy closes
        return Reply(version, code, headers, body)

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            parts.append(await self.reader.readexactly(size + 2))
            if size == 0:
                return b"".join(part[:-2] for part in parts)

    async def closed_by_peer(self, limit: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(), limit) == b""


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[RawClient]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()


def get(path: str, *extra: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: lb.test", *extra, "", ""]
    return "\r\n".join(lines).encode()


def post(path: str, body: bytes) -> bytes:
    return get(path, f"Content-Length: {len(body)}", method="POST") + body


def lb_config(*servers: Running, **extra: object) -> dict[str, object]:
    return {"port": 0, "backends": backends_config(*servers), "health": QUIET_HEALTH, **extra}


async def test_one_connection_mixes_plain_requests_bodies_and_admin_requests():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(get("/echo?step=1"))
            first = await client.reply()
            await client.send(post("/echo?step=2", b"hello"))
            second = await client.reply()
            await client.send(get("/echo?step=3"))
            third = await client.reply()
            await client.send(get("/_lb/health"))
            health = await client.reply()
        assert [first.status, second.status, third.status, health.status] == [200] * 4
        assert first.json()["path"] == "/echo?step=1"
        assert second.json()["body_len"] == 5 and second.json()["method"] == "POST"
        assert third.json()["path"] == "/echo?step=3"
        assert "backends" in health.json()
        # Every request is forwarded alike: the client's address, our id header, the pin.
        for reply in (first, second, third):
            assert reply.json()["headers"]["X-Forwarded-For"] == "127.0.0.1"  # type: ignore[index]
            assert reply.headers["x-backend-id"] == "a"
        assert "set-cookie" in first.headers


async def test_pipelined_requests_are_answered_in_order():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(
                get("/echo?n=1") + get("/echo?n=2") + post("/echo?n=3", b"abc") + get("/echo?n=4")
            )
            replies = [await client.reply() for _ in range(4)]
        assert [r.json()["path"] for r in replies] == [f"/echo?n={n}" for n in range(1, 5)]
        assert replies[2].json()["body_len"] == 3


async def test_http_1_0_clients_get_1_0_answers_framed_for_them():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(get("/echo", version="1.0"))
            plain = await client.reply()
            assert await client.closed_by_peer()
        assert plain.version == "HTTP/1.0" and plain.status == 200
        assert plain.headers.get("connection") != "keep-alive"

        async with raw_client(lb.url) as client:
            await client.send(get("/echo?k=1", "Connection: keep-alive", version="1.0"))
            kept = await client.reply()
            await client.send(get("/echo?k=2", "Connection: keep-alive", version="1.0"))
            again = await client.reply()
        assert kept.headers["connection"] == "keep-alive"
        assert again.json()["path"] == "/echo?k=2"

        # A streamed answer without a length: no chunked framing for 1.0, the close ends it.
        async with raw_client(lb.url) as client:
            await client.send(get("/sse?n=2&gap=0.05", "Connection: keep-alive", version="1.0"))
            streamed = await client.reply()
        assert "transfer-encoding" not in streamed.headers
        assert streamed.body == b"data: a-0\n\ndata: a-1\n\n"


async def test_streamed_head_and_bodiless_answers_keep_the_connection_in_step():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(get("/sse?n=3&gap=0.05"))
            sse = await client.reply()
            await client.send(get("/download?size=100000&length=1", method="HEAD"))
            head = await client.reply(head_only=True)
            await client.send(get("/status/204"))
            no_content = await client.reply()
            await client.send(get("/status/304"))
            not_modified = await client.reply()
            await client.send(get("/download?size=300000"))  # streamed, no length: chunked
            download = await client.reply()
            await client.send(get("/echo?last=1"))
            last = await client.reply()
        assert sse.headers["transfer-encoding"] == "chunked"
        assert sse.body == b"".join(f"data: a-{i}\n\n".encode() for i in range(3))
        assert head.status == 200 and head.headers["content-length"] == "100000"
        assert no_content.status == 204 and not_modified.status == 304
        assert not_modified.headers["etag"] == '"v1"'
        assert download.body == b"x" * 300000
        assert last.json()["path"] == "/echo?last=1"


async def test_connection_close_from_the_client_is_honoured():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(get("/echo", "Connection: close"))
            reply = await client.reply()
            assert await client.closed_by_peer()
        assert reply.status == 200 and reply.headers["connection"] == "close"


async def test_idle_connections_close_after_keep_alive_and_slow_heads_get_408():
    async with backends("a") as servers:
        config = lb_config(*servers, timeouts={"keepAlive": "300ms", "head": "600ms"})
        async with balancer(config) as lb:
            async with raw_client(lb.url) as silent, raw_client(lb.url) as half:
                await half.send(b"GET /echo HTTP/1.1\r\nHo")
                assert await silent.closed_by_peer(limit=3)  # never sent a byte: just closed
                late = await half.reply()
                assert late.status == 408 and late.headers["connection"] == "close"
                assert await half.closed_by_peer(limit=3)
            async with raw_client(lb.url) as client:
                await client.send(get("/echo"))
                assert (await client.reply()).status == 200
                assert await client.closed_by_peer(limit=3)  # idle after its answer
            # A request slower than the keep-alive timeout is not cut by it.
            async with raw_client(lb.url) as client:
                await client.send(get("/slow?delay=0.6"))
                assert (await client.reply()).status == 200
            # A head sent slowly but within timeouts.head is served, however long keepAlive.
            async with raw_client(lb.url) as client:
                for part in (b"GET /echo HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                    await client.send(part)
                    await asyncio.sleep(0.15)
                assert (await client.reply()).status == 200


async def test_header_bytes_that_are_not_utf8_reach_the_backend_unchanged():
    async with RawBackend(ok) as raw, balancer(raw_config(raw)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Odd: caf\xe9 \xff\r\n\r\n")
            assert (await client.reply()).status == 200
            await client.send("GET /y HTTP/1.1\r\nHost: h\r\nX-Name: José\r\n\r\n".encode())
            assert (await client.reply()).status == 200
        assert b"\r\nX-Odd: caf\xe9 \xff\r\n" in raw.requests[0]
        assert "\r\nX-Name: José\r\n".encode() in raw.requests[1]


async def odd_headers(
    backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
) -> bool:
    """Answers with header bytes that are not UTF-8: whole the first time, then streamed."""
    head = b"HTTP/1.1 200 OK\r\nX-Odd: caf\xe9 \xff\r\n"
    if nth == 1:
        writer.write(head + b"Content-Length: 2\r\n\r\nok")
    else:
        writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the head arrives alone: the answer is streamed
        writer.write(b"2\r\nok\r\n0\r\n\r\n")
    await writer.drain()
    return True


async def test_header_bytes_that_are_not_utf8_reach_the_client_unchanged():
    async with RawBackend(odd_headers) as raw, balancer(raw_config(raw)) as lb:
        async with raw_client(lb.url) as client:
            for _ in ("whole", "streamed"):
                await client.send(get("/x"))
                reply = await client.reply()
                assert (reply.status, reply.body) == (200, b"ok")
                assert reply.headers["x-odd"] == "caf\xe9 \xff"  # the bytes, read as latin-1


async def test_a_websocket_upgrade_after_a_plain_request_on_one_connection():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with raw_client(lb.url) as client:
            await client.send(get("/echo"))
            assert (await client.reply()).status == 200
            await client.send(
                get(
                    "/ws",
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                )
            )
            upgraded = await client.reply(head_only=True)
        assert upgraded.status == 101
        # RFC 6455 1.3's example key and answer: the backend's handshake reached the client.
        assert upgraded.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_an_app_with_its_own_routes_and_middleware_keeps_them_for_every_request():
    @web.middleware
    async def stamp(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["X-Stamped"] = "yes"
        return response

    async def own(request: web.Request) -> web.Response:
        return web.Response(text="mine")

    async with backends("a") as servers:
        config = build_config({"host": "127.0.0.1", **lb_config(*servers)})
        app = web.Application(middlewares=[stamp])
        app.router.add_get("/own", own)
        install(app, config)
        mine = await start_app(app, handle_signals=False, handler_cancellation=True)
        plain = await start_app(build_app(config), handle_signals=False)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(mine.url + "/own") as resp:
                    assert await resp.text() == "mine"
                async with client.get(mine.url + "/echo") as resp:
                    assert resp.status == 200 and resp.headers["X-Stamped"] == "yes"
                    assert resp.headers["x-backend-id"] == "a"
                async with client.post(plain.url + "/echo", data=b"abc") as resp:
                    assert (await resp.json())["body_len"] == 3
        finally:
            await mine.stop()
            await plain.stop()
        assert servers[0].app[SEEN][-1]["path"] == "/echo"


async def test_access_log_has_one_line_per_request(caplog):
    caplog.set_level(logging.INFO, logger="stickylb.access")
    async with backends("a") as servers:
        logger = logging.getLogger("stickylb.access")
        async with balancer(lb_config(*servers), access_log=logger) as lb:
            async with raw_client(lb.url) as client:
                await client.send(get("/echo?fast=1", "User-Agent: probe/1"))
                first = await client.reply()
                await client.send(post("/echo?slow=1", b"xyz"))
                await client.reply()
    lines = [r.getMessage() for r in caplog.records if r.name == "stickylb.access"]
    assert len(lines) == 2, lines
    pattern = (
        r'^127\.0\.0\.1 - - \[[^\]]+\] "{} HTTP/1\.1" 200 (\d+) "-" "{}"'
        r" backend=a upstream_status=200 total_ms=[\d.]+ upstream_ms=[\d.]+"
        r" bytes_in=(\d+) bytes_out=(\d+) affinity=(\w+) retries=0 request_id=(\S+)$"
    )
    match = re.match(pattern.format(r"GET /echo\?fast=1", "probe/1"), lines[0])
    assert match, lines[0]
    assert match.group(4) == "new" and match.group(1) == match.group(3)
    request_id = match.group(5)
    assert first.headers["x-request-id"] == request_id
    echoed = {k.lower(): v for k, v in json.loads(first.body)["headers"].items()}
    assert echoed["x-request-id"] == request_id  # the backend got the same one
    match = re.match(pattern.format(r"POST /echo\?slow=1", "-"), lines[1])
    assert match, lines[1]
    assert int(match.group(2)) > 3  # the head and the 3-byte body
    assert match.group(5) != request_id


async def test_admin_paths_are_ours_on_any_connection_in_any_spelling():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        for path in ("/_lb/health", "/%5Flb/health", "/_lb", "/_lb/nothing"):
            async with raw_client(lb.url) as client:
                await client.send(get(path))
                reply = await client.reply()
            assert reply.status in (200, 308, 404), (path, reply)
            assert "x-backend-id" not in reply.headers, path  # never reached a backend
        assert not [seen for seen in servers[0].app[SEEN] if "lb" in seen["path"]]


async def test_closed_client_connections_are_freed_at_once():
    # A connection held in a reference cycle lives on, with what it buffered, until a full
    # garbage-collector pass, which under load can be minutes away: memory climbs meanwhile.
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        front = lb.server.front
        gc.collect()
        gc.disable()
        try:
            async with raw_client(lb.url) as client:
                await client.send(get("/echo?n=1") + get("/echo?n=2"))
                assert [(await client.reply()).status for _ in range(2)] == [200, 200]
            async with raw_client(lb.url) as client:  # hangs up in the middle of an answer
                await client.send(get("/download?size=16777216&length=1"))
                await client.reader.readexactly(100_000)
            async with raw_client(lb.url) as client:  # hangs up in the middle of its body
                await client.send(get("/upload", "Content-Length: 100000", method="POST"))
                await client.send(b"x" * 1000)
            await until(lambda: not front.connections)
            await asyncio.sleep(0.2)  # the cancelled request winds down
            garbage = cyclic_garbage()
            kinds = ("ClientConnection", "RequestCycle", "Request", "BackendConnection")
            assert {kind: garbage[kind] for kind in kinds} == dict.fromkeys(kinds, 0)
        finally:
            gc.enable()


async def test_expect_100_continue_is_answered_before_the_body_is_sent():
    async with backends("a") as servers:
        config = lb_config(*servers, limits={"maxBodySize": 1000})
        async with balancer(config) as lb, raw_client(lb.url) as client:
            await client.send(
                get("/echo", "Content-Length: 5", "Expect: 100-continue", method="POST")
            )
            interim = await client.reply(head_only=True)
            assert interim.status == 100
            await client.send(b"hello")
            final = await client.reply()
            assert final.status == 200 and final.json()["body_len"] == 5
            assert "Expect" not in final.json()["headers"]  # answered here, not forwarded
        # Too large: refused at once, without a 100 (the client need not send it at all).
        async with balancer(config) as lb, raw_client(lb.url) as client:
            await client.send(
                get("/echo", "Content-Length: 5000", "Expect: 100-continue", method="POST")
            )
            refused = await client.reply()
            assert refused.status == 413 and refused.headers["connection"] == "close"


async def test_chunked_request_trailers_reach_the_backend():
    received: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readuntil(b"\r\n0\r\n")  # the last chunk
        received.append(head + body + await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with balancer(raw_config(url)) as lb, raw_client(lb.url) as client:
            await client.send(
                get("/t", "Transfer-Encoding: chunked", method="POST")
                + b"3\r\nabc\r\n0\r\nX-Checksum: 900150983cd24fb0\r\n\r\n"
            )
            assert (await client.reply()).status == 200
    finally:
        server.close()
        await server.wait_closed()
    assert received[0].endswith(b"3\r\nabc\r\n0\r\nX-Checksum: 900150983cd24fb0\r\n\r\n")


async def test_zero_timeouts_mean_none():
    zero = {"keepAlive": 0, "read": 0, "clientBody": 0, "websocketIdle": 0}
    async with backends("a") as servers:
        async with balancer(lb_config(*servers, timeouts=zero)) as lb, raw_client(lb.url) as client:
            await client.send(get("/echo?n=1"))
            assert (await client.reply()).status == 200
            await asyncio.sleep(0.3)  # idle, and not closed for it
            await client.send(get("/slow?delay=0.3"))
            assert (await client.reply()).status == 200
