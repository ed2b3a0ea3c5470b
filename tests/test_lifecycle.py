"""Graceful shutdown of a real process under load."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
from aiohttp import WSMsgType

from .support import backends, one_backend, spawn_balancer


async def test_sigterm_lets_accepted_requests_finish_and_closes_websockets(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0], shutdownTimeout="10s"), tmp_path)
        async with aiohttp.ClientSession() as client:
            ws = await client.ws_connect(proc.url + "/ws")
            assert await ws.receive_str() == "hello from a"
            requests = [
                asyncio.create_task(client.get(proc.url + "/slow?delay=1.5")) for _ in range(20)
            ]
            await asyncio.sleep(0.5)  # all accepted and in flight
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            responses = await asyncio.gather(*requests)
            assert [r.status for r in responses] == [200] * 20
            assert {await r.text() for r in responses} == {"a"}
            closing = await asyncio.wait_for(ws.receive(), 5)
            assert closing.type is WSMsgType.CLOSE and closing.data == 1001
            assert await asyncio.to_thread(proc.proc.wait, 15) == 0
            assert time.monotonic() - started < 10
            try:
                async with client.get(proc.url + "/") as resp:
                    raise AssertionError(f"still accepting: {resp.status}")
            except aiohttp.ClientConnectionError:
                pass
        assert "Traceback" not in proc.output


async def test_requests_longer_than_the_shutdown_timeout_are_cut(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0], shutdownTimeout="1s"), tmp_path)
        async with aiohttp.ClientSession() as client:
            slow = asyncio.create_task(client.get(proc.url + "/slow?delay=20"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.proc.wait, 15) == 0
            assert time.monotonic() - started < 5
            try:
                resp = await slow
                assert resp.status >= 500
            except aiohttp.ClientError:
                pass


async def test_a_second_signal_exits_at_once(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0], shutdownTimeout="30s"), tmp_path)
        async with aiohttp.ClientSession() as client:
            slow = asyncio.create_task(client.get(proc.url + "/slow?delay=20"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            proc.signal(signal.SIGINT)
            assert await asyncio.to_thread(proc.proc.wait, 10) == 130
            assert time.monotonic() - started < 3
            slow.cancel()
