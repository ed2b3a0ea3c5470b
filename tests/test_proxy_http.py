"""Sticky HTTP proxying through a real balancer to real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import pytest

from .support import (
    FAST_HEALTH,
    GZIP_BODY,
    SEEN,
    backends,
    backends_config,
    balancer,
    client_session,
    free_port,
    until,
    wait_for_state,
)

QUIET_HEALTH = {"interval": "60s"}


def lb_config(*servers, **extra):
    return {"port": 0, "backends": backends_config(*servers), "health": QUIET_HEALTH, **extra}


async def test_each_client_stays_pinned_over_many_requests():
    async with backends("a", "b", "c") as servers, balancer(lb_config(*servers)) as lb:
        first_seen = collections.Counter()
        for _ in range(12):
            async with client_session() as client:
                names = set()
                for _ in range(15):
                    async with client.get(lb.url + "/") as resp:
                        assert resp.status == 200
                        names.add(await resp.text())
                        assert resp.headers["x-backend-id"] in {"a", "b", "c"}
                assert len(names) == 1, names
                first_seen[names.pop()] += 1
        assert set(first_seen) == {"a", "b", "c"}
        assert all(count == 4 for count in first_seen.values()), first_seen


async def test_cookie_is_set_once_and_is_opaque():
    async with backends("a", "b") as servers, balancer(lb_config(*servers)) as lb:
        async with client_session() as client:
            async with client.get(lb.url + "/") as resp:
                cookie = resp.headers.getall("Set-Cookie")
                assert len(cookie) == 1
                assert cookie[0].startswith("X-Backend-ID=")
                assert "HttpOnly" in cookie[0] and "SameSite=Lax" in cookie[0]
                assert "Path=/" in cookie[0]
                value = cookie[0].split(";")[0].split("=", 1)[1]
                assert value not in ("a", "b") and "127.0.0.1" not in value
            async with client.get(lb.url + "/") as resp:
                assert "Set-Cookie" not in resp.headers


async def test_no_sticky_balances_every_request_without_cookie():
    async with backends("a", "b") as servers, balancer(lb_config(*servers, sticky=False)) as lb:
        async with client_session() as client:
            names = []
            for _ in range(6):
                async with client.get(lb.url + "/") as resp:
                    assert "Set-Cookie" not in resp.headers
                    names.append(await resp.text())
        assert names == ["a", "b"] * 3


async def test_forged_garbage_and_unknown_cookies_are_treated_as_absent():
    async with backends("a", "b") as servers, balancer(lb_config(*servers)) as lb:
        bad_headers = [
            "X-Backend-ID=forged-token",
            "X-Backend-ID=",
            "X-Backend-ID",
            "X-Backend-ID=0",
            ";;;===;",
            "a=" + "x" * 7000,
            'X-Backend-ID="unterminated',
        ]
        async with aiohttp.ClientSession() as client:
            for value in bad_headers:
                async with client.get(lb.url + "/", headers={"Cookie": value}) as resp:
                    assert resp.status == 200, value[:40]
                    assert await resp.text() in ("a", "b")
                    assert resp.headers["Set-Cookie"].startswith("X-Backend-ID=")
            too_big = {"Cookie": "a=" + "x" * 20000}
            async with client.get(lb.url + "/", headers=too_big) as resp:
                assert resp.status == 431
                assert "xxxx" not in await resp.text()  # nothing of it is echoed
            async with client.get(lb.url + "/") as resp:
                assert resp.status == 200


async def test_secret_cookie_is_an_hmac_shared_by_processes_with_the_same_secret():
    async with backends("a", "b") as servers:
        config = lb_config(*servers, cookie={"secret": "s3cret", "name": "lb"})
        async with balancer(config) as one, balancer(config) as two:
            async with client_session() as client:
                async with client.get(one.url + "/") as resp:
                    name = await resp.text()
                    token = resp.cookies["lb"].value
                async with aiohttp.ClientSession() as other:
                    for _ in range(5):
                        async with other.get(two.url + "/", headers={"Cookie": f"lb={token}"}) as r:
                            assert await r.text() == name
                            assert "Set-Cookie" not in r.headers
        async with balancer(lb_config(*servers, cookie={"secret": "other", "name": "lb"})) as three:
            async with aiohttp.ClientSession() as other:
                async with other.get(three.url + "/", headers={"Cookie": f"lb={token}"}) as r:
                    assert "Set-Cookie" in r.headers  # an unknown token: balanced again


async def test_repin_when_pinned_backend_is_down_and_cookie_rewritten():
    async with backends("a", "b") as servers:
        config = {**lb_config(*servers), "health": FAST_HEALTH}
        async with balancer(config) as lb:
            await run_repin_scenario(lb, servers)


async def run_repin_scenario(lb, servers):
    by_name = {server.name: server for server in servers}
    async with client_session() as client:
        async with client.get(lb.url + "/") as resp:
            first = await resp.text()
        by_name[first].knobs.health_status = 503
        await wait_for_state(lb.url, first, healthy=False)
        async with client.get(lb.url + "/") as resp:
            second = await resp.text()
            assert second != first
            assert "Set-Cookie" in resp.headers
        for _ in range(5):
            async with client.get(lb.url + "/") as resp:
                assert await resp.text() == second
        # the old backend coming back does not steal the re-pinned client
        by_name[first].knobs.health_status = 200
        await wait_for_state(lb.url, first, healthy=True)
        async with client.get(lb.url + "/") as resp:
            assert await resp.text() == second


async def test_multiple_set_cookie_from_backend_are_kept_alongside_ours():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/cookies") as resp:
                cookies = resp.headers.getall("Set-Cookie")
        names = sorted(c.split("=")[0] for c in cookies)
        assert names == ["X-Backend-ID", "session", "theme"]


async def test_gzip_body_passes_through_byte_for_byte():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession(auto_decompress=False) as client:
            async with client.get(lb.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                assert await resp.read() == GZIP_BODY


async def test_compressed_request_body_is_not_decompressed():
    payload = GZIP_BODY
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                lb.url + "/echo", data=payload, headers={"Content-Encoding": "gzip"}
            ) as resp,
        ):
            seen = await resp.json()
        import hashlib

        assert seen["body_sha"] == hashlib.sha256(payload).hexdigest()


async def test_head_204_304_and_status_passthrough():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.head(lb.url + "/download?size=5000&length=1") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == "5000"
                assert await resp.read() == b""
            async with client.get(lb.url + "/status/204") as resp:
                assert resp.status == 204
                assert await resp.read() == b""
            async with client.get(lb.url + "/status/304") as resp:
                assert resp.status == 304
                assert resp.headers["ETag"] == '"v1"'
            async with client.get(lb.url + "/status/418") as resp:
                assert resp.status == 418
            # keep-alive still works after bodiless answers
            async with client.get(lb.url + "/") as resp:
                assert await resp.text() == "a"


async def test_redirects_are_passed_not_followed():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/redirect", allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "/elsewhere"


async def test_sse_chunks_arrive_before_the_backend_finishes():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as client:
            start = loop.time()
            async with client.get(lb.url + "/sse?n=4&gap=0.5") as resp:
                first = await resp.content.readuntil(b"\n\n")
                first_at = loop.time() - start
                rest = await resp.read()
                total = loop.time() - start
        assert first == b"data: a-0\n\n"
        assert b"data: a-3" in rest
        # the first event came while the backend still had 1.5 s of events to send
        assert first_at < total - 1.0


async def test_forwarded_headers_host_and_hop_by_hop():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            headers = {
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=6.6.6.6",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "X-Custom": "kept",
            }
            async with client.get(lb.url + "/echo?q=1&x=%20y", headers=headers) as resp:
                seen = await resp.json()
        sent = {k.lower(): v for k, v in seen["headers"].items()}
        assert seen["path"] == "/echo?q=1&x=%20y"
        assert sent["x-forwarded-for"] == "127.0.0.1"
        assert sent["x-forwarded-proto"] == "http"
        assert sent["x-forwarded-host"] == lb.url.removeprefix("http://")
        assert sent["host"] == servers[0].url.removeprefix("http://")
        assert sent["x-custom"] == "kept"
        for hop in ("x-secret-hop", "keep-alive", "proxy-authorization", "forwarded"):
            assert hop not in sent
        assert "user-agent" in sent  # the client's own, not replaced


async def test_trusted_proxy_chain_is_appended_and_host_can_be_preserved():
    async with backends("a") as servers:
        config = lb_config(*servers, trustedProxies=["127.0.0.0/8"], preserveHost=True)
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            headers = {
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "https",
                "Host": "app.example.test",
            }
            async with client.get(lb.url + "/echo", headers=headers) as resp:
                seen = await resp.json()
        sent = {k.lower(): v for k, v in seen["headers"].items()}
        assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert sent["x-forwarded-proto"] == "https"
        assert sent["host"] == "app.example.test"


async def test_backend_header_can_be_turned_off():
    async with backends("a") as servers, balancer(lb_config(*servers, backendHeader=False)) as lb:
        async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
            assert "x-backend-id" not in resp.headers


async def test_no_backend_available_gives_json_503():
    async with backends("a") as servers:
        config = {**lb_config(*servers), "health": FAST_HEALTH}
        async with balancer(config) as lb:
            servers[0].knobs.health_status = 503
            await wait_for_state(lb.url, "a", healthy=False)
            async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
                assert resp.status == 503
                assert await resp.json() == {"error": "No healthy backends available."}


async def test_refused_backend_gives_502_and_retries_are_bounded():
    dead = f"http://127.0.0.1:{free_port()}"
    config = {"port": 0, "backends": [{"id": "dead", "url": dead}], "health": {"enabled": False}}
    async with balancer(config) as lb, aiohttp.ClientSession() as client:
        async with client.get(lb.url + "/") as resp:
            assert resp.status == 502
            assert "error" in await resp.json()
        assert lb.balancer.pool.backends[0].active == 0


async def test_garbage_from_backend_gives_502():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"this is not HTTP at all\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = {
        "port": 0,
        "backends": [{"id": "g", "url": f"http://127.0.0.1:{port}"}],
        "health": {"enabled": False},
        "retries": 0,
    }
    try:
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/") as resp:
                assert resp.status == 502
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_backend_gives_504_after_read_timeout():
    async with backends("a") as servers:
        config = lb_config(*servers, timeouts={"read": 300})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/slow?delay=3") as resp:
                assert resp.status == 504
            async with client.get(lb.url + "/slow?delay=0.05") as resp:
                assert resp.status == 200


async def test_read_timeout_is_an_idle_gap_not_a_total_cap():
    async with backends("a") as servers:
        config = lb_config(*servers, timeouts={"read": 400})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            # 5 events 0.25 s apart: 1.25 s in all, each gap under the 0.4 s read timeout
            async with client.get(lb.url + "/sse?n=5&gap=0.25") as resp:
                body = await resp.read()
        assert body.count(b"data:") == 5


async def test_client_abort_mid_download_releases_the_backend():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        pool = lb.balancer.pool
        async with aiohttp.ClientSession() as client:
            resp = await client.get(lb.url + "/download?size=200000000")
            await resp.content.read(1 << 20)
            assert pool.backends[0].active == 1
            resp.close()
        await until(lambda: pool.backends[0].active == 0, limit=5)


async def test_admin_paths_are_never_proxied():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/_lb/nothing-here") as resp:
                assert resp.status == 404
        assert all("/_lb" not in r["path"] for r in servers[0].app[SEEN])


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_any_method_is_forwarded(method):
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.request(method, lb.url + "/echo/x?y=1", data=b"abc") as resp:
                seen = await resp.json()
        assert seen["method"] == method
        assert seen["path"] == "/echo/x?y=1"


async def raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        b"Cookie: X-Backend-ID=\x7f\x01\xff\xfe",
        b"Cookie: \xc3\x28 invalid utf-8 \xa0\xa1",
        b"X-Odd: \x01\x02",
        b"Cookie: " + b"X-Backend-ID=" + b"z" * 7000,
    ],
)
async def test_raw_odd_bytes_in_headers_never_crash(header, caplog):
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        answer = await raw_exchange(
            lb.url, b"GET / HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
        )
        status = int(answer.split(b" ", 2)[1])
        assert status in (200, 400), answer[:200]
        assert b"Traceback" not in answer
        async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
            assert resp.status == 200
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
