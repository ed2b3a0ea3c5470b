"""maxConnections and its queue, per-backend limits, the unavailable answer, slow clients."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from stickylb import build_config

from .support import backends, balancer, client_session, one_backend


async def test_global_cap_queues_then_answers_503():
    async with backends("a") as servers:
        config = one_backend(servers[0], maxConnections=2, maxQueue=1, queueTimeout=400)
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            busy = [asyncio.create_task(client.get(lb.url + "/slow?delay=1.5")) for _ in range(2)]
            await asyncio.sleep(0.2)
            queued = asyncio.create_task(client.get(lb.url + "/"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            async with client.get(lb.url + "/") as resp:  # the queue (1) is full: at once
                assert resp.status == 503
                assert await resp.json() == {"error": "No healthy backends available."}
            assert time.monotonic() - started < 0.3
            resp = await queued  # waited 0.4 s in the queue, then gave up
            assert resp.status == 503
            assert all(r.status == 200 for r in await asyncio.gather(*busy))
            async with client.get(lb.url + "/") as resp:
                assert resp.status == 200


async def test_queued_request_is_served_when_a_slot_frees():
    async with backends("a") as servers:
        config = one_backend(servers[0], maxConnections=1, queueTimeout="5s")
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            busy = asyncio.create_task(client.get(lb.url + "/slow?delay=0.5"))
            await asyncio.sleep(0.1)
            async with client.get(lb.url + "/") as resp:
                assert resp.status == 200
            assert (await busy).status == 200


async def test_pinned_client_waits_for_its_full_backend_instead_of_moving():
    async with backends("a", "b") as (a, b):
        config = {
            "port": 0,
            "health": {"interval": "60s"},
            "queueTimeout": "5s",
            "backends": [{"id": "a", "url": a.url, "maxConnections": 1}, {"id": "b", "url": b.url}],
        }
        async with balancer(config) as lb:
            async with client_session() as client:
                first = ""
                while first != "a":  # get a client pinned to a
                    client.cookie_jar.clear()
                    async with client.get(lb.url + "/") as resp:
                        first = await resp.text()
                slow = asyncio.create_task(client.get(lb.url + "/slow?delay=0.6"))
                await asyncio.sleep(0.15)
                async with client.get(lb.url + "/") as resp:
                    assert await resp.text() == "a"  # waited for a, kept the session
                    assert "Set-Cookie" not in resp.headers
                assert await (await slow).text() == "a"
            # new clients meanwhile go to b while a is full
            async with client_session() as pinned:
                while True:
                    pinned.cookie_jar.clear()
                    async with pinned.get(lb.url + "/") as resp:
                        if await resp.text() == "a":
                            break
                hold = asyncio.create_task(pinned.get(lb.url + "/slow?delay=0.6"))
                await asyncio.sleep(0.15)
                for _ in range(3):
                    async with client_session() as fresh, fresh.get(lb.url + "/") as resp:
                        assert await resp.text() == "b"
                await hold


async def test_custom_unavailable_body_and_python_handler():
    dead = {"id": "x", "url": "http://127.0.0.1:9"}
    config = {
        "port": 0,
        "backends": [dead],
        "health": {"interval": "60s"},
        "unavailable": "Down for maintenance, back soon.",
    }
    async with balancer(config) as lb, aiohttp.ClientSession() as client:
        await asyncio.sleep(0.3)  # the first check marks the only backend down
        async with client.get(lb.url + "/") as resp:
            assert resp.status == 503
            assert await resp.text() == "Down for maintenance, back soon."
            assert resp.headers["Content-Type"].startswith("text/plain")

    async def maintenance(request):
        return web.json_response({"maintenance": True, "path": request.path}, status=503)

    config = build_config(
        {
            "port": 0,
            "host": "127.0.0.1",
            "backends": [dead],
            "health": {"interval": "60s"},
            "unavailable": {"handler": maintenance},
        }
    )
    async with balancer(config) as lb, aiohttp.ClientSession() as client:
        await asyncio.sleep(0.3)
        async with client.get(lb.url + "/cart") as resp:
            assert resp.status == 503
            assert await resp.json() == {"maintenance": True, "path": "/cart"}


async def slowloris(url: str, stop: asyncio.Event) -> float:
    """Trickle a request head one byte at a time; return when the server hung up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    try:
        for byte in head:
            if stop.is_set() or reader.at_eof():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                    break
            except TimeoutError:
                pass
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


async def test_slowloris_clients_are_cut_and_do_not_block_others():
    async with backends("a") as servers:
        config = one_backend(servers[0], timeouts={"head": 1000}, maxConnections=5)
        async with balancer(config) as lb:
            stop = asyncio.Event()
            attackers = [asyncio.create_task(slowloris(lb.url, stop)) for _ in range(50)]
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as client:
                for _ in range(10):
                    async with client.get(
                        lb.url + "/", timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        assert resp.status == 200
            held = await asyncio.wait_for(asyncio.gather(*attackers), 15)
            stop.set()
    # each was cut at the 1 s limit, long before it could finish its 230-byte head
    assert max(held) < 3.0


async def test_flood_beyond_max_connections_still_serves_a_patient_client():
    async with backends("a") as servers:
        config = one_backend(servers[0], maxConnections=4, maxQueue=64, queueTimeout="5s")
        async with balancer(config) as lb:
            stop = asyncio.Event()
            outcomes: list[int] = []

            async def flooder(session: aiohttp.ClientSession) -> None:
                for _ in range(200):
                    if stop.is_set():
                        return
                    async with session.get(lb.url + "/slow?delay=0.05") as resp:
                        outcomes.append(resp.status)

            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as flood:
                floods = [asyncio.create_task(flooder(flood)) for _ in range(40)]
                await asyncio.sleep(0.3)
                async with aiohttp.ClientSession() as client:
                    for _ in range(5):  # patient: served in turn, never starved
                        async with client.get(lb.url + "/") as resp:
                            assert resp.status == 200
                stop.set()
                await asyncio.wait_for(asyncio.gather(*floods), 30)
            assert set(outcomes) == {200}  # the flood itself was queued, not dropped
            assert lb.balancer.admission.active == 0


async def test_request_body_over_the_limit_gets_413():
    async with backends("a") as servers:
        config = one_backend(servers[0], limits={"maxBodySize": "64KiB"})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.post(lb.url + "/upload", data=b"x" * 70_000) as resp:
                assert resp.status == 413  # declared by Content-Length: refused up front

            async def chunked():
                for _ in range(40):
                    yield b"y" * 4096

            async with client.post(lb.url + "/upload", data=chunked()) as resp:
                assert resp.status == 413  # found while streaming
            async with client.post(lb.url + "/upload", data=b"z" * 60_000) as resp:
                assert resp.status == 200
                assert (await resp.json())["size"] == 60_000


async def test_max_connections_zero_takes_a_backend_out_of_service():
    async with backends("a", "b") as (a, b):
        config = {
            "port": 0,
            "health": {"interval": "60s"},
            "queueTimeout": "5s",
            "backends": [{"id": "a", "url": a.url, "maxConnections": 0}, {"id": "b", "url": b.url}],
        }
        async with balancer(config) as lb:
            token = lb.balancer.pool.backends[0].token
            async with aiohttp.ClientSession() as client:
                started = time.monotonic()
                async with client.get(
                    lb.url + "/", headers={"Cookie": f"X-Backend-ID={token}"}
                ) as r:
                    assert await r.text() == "b"  # re-balanced at once, not queued
                    assert "Set-Cookie" in r.headers
                assert time.monotonic() - started < 1
                for _ in range(4):
                    async with client.get(lb.url + "/") as resp:
                        assert await resp.text() == "b"
