"""Whose fault a failure is: only a backend's own failures count against it."""

from __future__ import annotations

import asyncio
import importlib.util

import aiohttp
import pytest

from .support import backends, balancer, lb_status, one_backend, spawn_balancer, until


async def test_clients_that_abort_their_uploads_never_mark_a_backend_down():
    async with backends("a") as servers:
        config = one_backend(servers[0], health={"enabled": False, "maxFails": 2})
        async with balancer(config) as lb:
            host, port = lb.url.removeprefix("http://").split(":")
            for _ in range(3):
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
                writer.write(b"x" * 30_000)
                await writer.drain()
                await asyncio.sleep(0.1)  # the upload is under way to the backend
                writer.transport.abort()  # and the client vanishes
            await until(lambda: lb.balancer.pool.backends[0].active == 0)
            async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
                assert resp.status == 200
            status = await lb_status(lb.url)
    assert status["backends"][0]["healthy"] is True
    assert not lb.balancer.pool.backends[0].passive_failures


LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
]


@pytest.mark.parametrize("loop", LOOPS)
async def test_running_out_of_file_descriptors_is_ours_and_passes(tmp_path, loop):
    limit = 64
    async with backends("a") as servers:
        config = one_backend(servers[0], health={"enabled": False, "maxFails": 1})
        proc = spawn_balancer(config, tmp_path, "--loop", loop, max_files=limit)
        try:
            host, port = proc.url.removeprefix("http://").split(":")
            held = []
            while proc.open_files() < limit:  # every descriptor the balancer may have
                before = proc.open_files()
                held.append(await asyncio.open_connection(host, int(port)))
                await until(lambda before=before: proc.open_files() > before, 2)  # accepted
            reader, writer = held[-1]
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # needs a backend socket
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            # Newcomers are not taken only to be failed: they wait in the kernel's backlog.
            waiting = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
            for _, writer in waiting:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await asyncio.sleep(0.5)
            assert not any(reader.at_eof() for reader, _ in waiting)  # not reset either
            for _, writer in held:
                writer.close()
            for reader, writer in waiting:  # served once descriptors are free again
                answer = await asyncio.wait_for(reader.read(), 5)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
                writer.close()
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as client:  # accepting again, by itself
                for _ in range(3):
                    async with client.get(proc.url + "/") as resp:
                        assert resp.status == 200
                status = await lb_status(proc.url)
            assert status["backends"][0]["healthy"] is True
            assert status["backends"][0]["lastFailureReason"] is None
        finally:
            assert proc.stop() == 0
        assert "EMFILE" in proc.output and "not backend a's fault" in proc.output
        assert "accepting paused" in proc.output and "accepting connections again" in proc.output
        assert "is DOWN" not in proc.output and "Traceback" not in proc.output
