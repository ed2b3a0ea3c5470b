"""Timeouts as nginx and HAProxy define them: idle gaps while a request is in flight, whose
fault each one is, and what each one frees."""

from __future__ import annotations

import asyncio

import aiohttp

from .support import backends, balancer, lb_status, one_backend, until


async def test_an_upload_longer_than_the_read_timeout_succeeds():
    # Request-body bytes flowing to the backend are progress: only silence times out.
    async with backends("a") as servers:
        config = one_backend(servers[0], timeouts={"read": 400})

        async def trickle():
            for _ in range(15):  # 1.5 s in all, a piece every 0.1 s
                yield b"u" * 1000
                await asyncio.sleep(0.1)

        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.post(lb.url + "/upload", data=trickle()) as resp:
                assert resp.status == 200
                assert (await resp.json())["size"] == 15_000


async def test_a_client_that_stops_sending_its_body_gets_408_and_frees_its_slot():
    async with backends("a") as servers:
        config = one_backend(
            servers[0],
            timeouts={"clientBody": 400},
            maxConnections=1,
            queueTimeout="5s",
            health={"enabled": False, "maxFails": 1},
        )
        async with balancer(config) as lb:
            host, port = lb.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            writer.write(b"only a little")
            await writer.drain()
            await asyncio.sleep(0.1)
            assert lb.balancer.admission.active == 1  # it holds the only slot
            async with aiohttp.ClientSession() as client:  # and waits in the queue for it
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 ")
            await until(lambda: lb.balancer.admission.active == 0)
            status = await lb_status(lb.url)
    assert status["backends"][0]["healthy"] is True  # the client's fault, not the backend's
    assert not lb.balancer.pool.backends[0].passive_failures


async def test_a_client_that_stops_reading_is_cut_and_its_backend_released():
    async with backends("a") as servers:
        config = one_backend(servers[0], timeouts={"read": 400})
        async with balancer(config) as lb:
            host, port = lb.url.removeprefix("http://").split(":")
            _, writer = await asyncio.open_connection(host, int(port), limit=1024)
            writer.write(b"GET /download?size=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            pool = lb.balancer.pool
            assert pool.backends[0].active == 1
            # The client reads nothing: its socket fills, then the proxy gives up on it.
            await until(lambda: pool.backends[0].active == 0, limit=5)
            writer.close()
            assert pool.backends[0].healthy and not pool.backends[0].passive_failures
