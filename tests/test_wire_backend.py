"""The backend side of the wire (stickylb/wire/backend.py): keep-alive reuse, idle expiry, the
stale-connection race, request framing, informational answers and close-delimited bodies,
against raw socket backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import trustme
from aiohttp import web

from .support import balancer, cyclic_garbage, lb_status, start_app, until

Answer = Callable[["RawBackend", int, bytes, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawBackend:
    """A socket server that reads request heads (and Content-Length bodies) and answers with
    whatever ``answer(backend, nth_request_on_this_connection, request, writer)`` writes; it
    keeps the connection while ``answer`` returns True."""

    answer: Answer
    requests: list[bytes] = field(default_factory=list)
    opened: int = 0
    closed: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            nth = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                self.requests.append(head + body)
                nth += 1
                if not await self.answer(self, nth, head + body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


async def ok(backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    return True


def raw_config(backend: RawBackend | str, **extra: object) -> dict[str, object]:
    """A balancer in front of one backend (a RawBackend or a URL), with no health checks."""
    url = backend if isinstance(backend, str) else backend.url
    return {
        "port": 0,
        "backends": [{"id": "raw", "url": url}],
        "health": {"enabled": False},
        **extra,
    }


async def test_connections_to_a_backend_are_kept_and_reused():
    async with RawBackend(ok) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as client:

            async def visitor() -> None:
                for _ in range(20):
                    async with client.get(lb.url + "/") as resp:
                        assert await resp.read() == b"ok"

            await asyncio.gather(*(visitor() for _ in range(4)))
        assert len(raw.requests) == 80
        assert raw.opened <= 4  # never more than the requests in flight at once
        assert raw.closed == 0


async def test_idle_backend_connections_are_closed_after_backend_keep_alive():
    async with RawBackend(ok) as raw:
        config = raw_config(raw, timeouts={"backendKeepAlive": "300ms"})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
            assert raw.opened == 1 and raw.closed == 0
            await until(lambda: raw.closed == 1, limit=5)
            async with client.get(lb.url + "/") as resp:  # a new connection, transparently
                assert resp.status == 200
            assert raw.opened == 2


async def test_backend_keep_alive_zero_asks_for_a_new_connection_every_time():
    async with RawBackend(ok) as raw:
        config = raw_config(raw, timeouts={"backendKeepAlive": 0})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
        assert raw.opened == 3
        assert all(b"\r\nConnection: close\r\n" in request for request in raw.requests)


async def closes_after_first(
    backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
) -> bool:
    """Keep-alive in words, but drop the connection when a second request arrives on it: what a
    backend does when its own idle timer fires just as the proxy reuses the connection."""
    if nth > 1:
        return False
    return await ok(backend, nth, request, writer)


async def test_a_kept_connection_closed_under_us_is_retried_fresh_for_replayable_requests():
    async with RawBackend(closes_after_first) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"ok"
            status = await lb_status(lb.url)
        assert raw.opened >= 5
        # The race is ours, not the backend's fault: no passive failure was counted.
        assert len(lb.balancer.pool.backends[0].passive_failures) == 0
        assert status["backends"][0]["healthy"] is True


async def test_a_post_is_never_sent_twice_on_its_own():
    async with RawBackend(closes_after_first) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/") as resp:
                assert resp.status == 200
            async with client.post(lb.url + "/order", data=b"once") as resp:
                # The backend dropped the kept connection when the POST arrived: the proxy
                # cannot know whether it acted on it, so it reports the failure.
                assert resp.status == 502
        posts = [r for r in raw.requests if r.startswith(b"POST")]
        assert len(posts) == 1


async def early_hints(
    backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal")
    await writer.drain()
    return True


async def test_informational_answers_are_skipped_for_the_final_one():
    async with RawBackend(early_hints) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as client:
            for _ in range(2):  # and the connection stays usable
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
                    assert resp.headers["X-Final"] == "yes"
                    assert await resp.read() == b"final"
        assert raw.opened == 1


async def close_delimited(
    backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    for part in (b"no length, ", b"no chunks, ", b"ends at close"):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.02)
    return False


async def test_a_body_delimited_by_close_arrives_whole():
    async with RawBackend(close_delimited) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"no length, no chunks, ends at close"
        assert raw.opened == 2  # such a connection is never reused


async def test_request_bodies_keep_their_framing():
    seen: list[tuple[str | None, str | None, bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            (request.headers.get("Content-Length"), request.headers.get("Transfer-Encoding"), body)
        )
        return web.Response(body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = await start_app(app)

    async def parts() -> object:
        for part in (b"one,", b"two,", b"three"):
            yield part
            await asyncio.sleep(0.01)

    try:
        config = {
            "port": 0,
            "backends": [{"id": "echo", "url": server.url}],
            "health": {"enabled": False},
        }
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.post(lb.url + "/", data=parts()) as resp:
                assert await resp.read() == b"one,two,three"
            async with client.put(lb.url + "/", data=b"x" * 1000) as resp:
                assert len(await resp.read()) == 1000
            async with client.post(lb.url + "/", skip_auto_headers={"Content-Type"}) as resp:
                assert resp.status == 200
    finally:
        await server.stop()
    assert seen == [
        (None, "chunked", b"one,two,three"),
        ("1000", None, b"x" * 1000),
        ("0", None, b""),
    ]


async def test_backend_url_path_prefix_is_kept():
    async with RawBackend(ok) as raw:
        config = raw_config(raw)
        config["backends"] = [{"id": "raw", "url": raw.url + "/base/"}]
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/echo?x=1") as resp:
                assert resp.status == 200
    assert raw.requests[0].startswith(b"GET /base/echo?x=1 HTTP/1.1\r\n")


async def test_https_backend_with_an_untrusted_certificate_is_a_502():
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secret")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    config = raw_config(f"https://127.0.0.1:{port}", retries=0)
    try:
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/") as resp:
                assert resp.status == 502
                assert "secret" not in await resp.text()
    finally:
        await runner.cleanup()


async def test_backend_connections_closed_any_way_are_freed_at_once():
    # A closed connection held in a reference cycle would keep what it buffered until a rare
    # full garbage-collector pass.
    async with RawBackend(close_delimited) as raw, balancer(raw_config(raw)) as lb:
        gc.collect()
        gc.disable()
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(3):
                    async with client.get(lb.url + "/") as resp:
                        assert resp.status == 200
                        await resp.read()
            await until(lambda: raw.closed == raw.opened == 3)
            await asyncio.sleep(0.1)
            garbage = cyclic_garbage()
            assert garbage["BackendConnection"] == 0 and garbage["RequestCycle"] == 0
        finally:
            gc.enable()


# --- hostile and broken backends (issue 13) ----------------------------------------------------


async def answers_then_leaks(
    backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
) -> bool:
    """Answers, then (a bug, or worse) writes a second answer nobody asked for."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nsomeone-else's")
    await writer.drain()
    return True


async def test_an_answer_nobody_asked_for_never_reaches_another_client(caplog):
    async with RawBackend(answers_then_leaks) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as first:
            async with first.get(lb.url + "/mine") as resp:
                assert await resp.read() == b"ok"
        await asyncio.sleep(0.3)  # the leak has arrived on the idle connection by now
        async with aiohttp.ClientSession() as second:
            async with second.get(lb.url + "/theirs") as resp:
                assert await resp.read() == b"ok"
    assert raw.opened == 2  # the connection that spoke out of turn was closed, not reused
    assert "idle connection" in caplog.text


async def two_answers_at_once(
    backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    )
    await writer.drain()
    return True


async def test_bytes_after_an_answer_are_dropped_with_their_connection():
    async with RawBackend(two_answers_at_once) as raw, balancer(raw_config(raw)) as lb:
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(lb.url + "/") as resp:
                    assert await resp.read() == b"ok"
    assert raw.opened == 3


def answering(answer: bytes) -> Answer:
    async def send(
        backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(answer)
        await writer.drain()
        return True

    return send


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad: caf\xe9\x7f\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 70_000 + b"\r\n\r\n",
    ],
)
async def test_a_broken_answer_is_a_502_and_one_log_line(answer, caplog):
    async with RawBackend(answering(answer)) as raw, balancer(raw_config(raw, retries=0)) as lb:
        async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
            assert resp.status == 502
            assert b"X-Bad" not in await resp.read() and "X-Bad" not in resp.headers
    failures = [r for r in caplog.records if r.name == "stickylb.proxy"]
    assert len(failures) == 1 and failures[0].levelname == "WARNING", caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40], caplog.text


async def test_framing_of_bodiless_answers_is_normalized():
    replies = {
        b"/204": b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\nX-A: 1\r\n\r\n",
        b"/304": b'HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nETag: "e"\r\n\r\n',
        b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
        b"/after": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    }

    async def answer(
        backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(replies[request.split(b" ")[1]])
        await writer.drain()
        return True

    async with RawBackend(answer) as raw, balancer(raw_config(raw)) as lb:
        host, port = lb.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for path, method in (("/204", "GET"), ("/304", "GET"), ("/head", "HEAD")):
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                if path == "/204":
                    assert b"Content-Length" not in head and b"X-A: 1" in head
                else:  # the length of what a GET would have had, and no body follows
                    assert b"Content-Length: 7\r\n" in head
            writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
        finally:
            writer.close()


async def test_idle_connections_are_reused_last_in_first_out_and_capped():
    served: dict[bytes, int] = {}  # request path -> the connection (in order opened) it came on
    tags: dict[int, int] = {}

    async def tag(
        backend: RawBackend, nth: int, request: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        path = request.split(b" ")[1]
        served[path] = tags.setdefault(id(writer), len(tags))
        if path.startswith(b"/slow/"):
            await asyncio.sleep(0.1 * int(path[-1:]))  # /slow/3 finishes last
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    async with RawBackend(tag) as raw:
        config = raw_config(raw, limits={"maxIdlePerBackend": 2})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:

            async def get(path: str) -> None:
                async with client.get(lb.url + path) as resp:
                    assert await resp.read() == b"ok"

            await asyncio.gather(get("/slow/1"), get("/slow/2"), get("/slow/3"))
            await get("/next")
            # At most 2 wait idle: the least recently used (/slow/1's) was closed.
            await until(lambda: raw.closed == 1)
    assert raw.opened == 3
    assert served[b"/next"] == served[b"/slow/3"]  # the most recently released goes first
