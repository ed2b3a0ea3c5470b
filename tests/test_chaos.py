"""Chaos: backends are SIGKILLed and restarted at random under pinned, unpinned and WebSocket load.

Promises checked: while at least one backend is up, no idempotent request fails; once a killed
backend's detection time has passed, nothing more is routed to it; active-connection counters
end at exactly zero; the balancer's memory after the run stays near its level after warm-up.

CI runs a few seconds; STICKYLB_CHAOS_SECONDS=60 gives the slow run (its figures are printed).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import aiohttp

from .support import (
    Process,
    backend_status,
    client_session,
    free_port,
    lb_status,
    spawn,
    spawn_balancer,
)

SECONDS = float(os.environ.get("STICKYLB_CHAOS_SECONDS", "6"))
DETECTION = 1.0  # seconds: passive detection is immediate, active checks run every 0.2 s


class Fleet:
    def __init__(self, tmp_path, count: int = 3) -> None:
        self.tmp_path = tmp_path
        self.ports = [free_port() for _ in range(count)]
        self.procs: dict[str, Process | None] = {}
        for i in range(count):
            self.start(i)

    def name(self, i: int) -> str:
        return f"c{i}"

    def start(self, i: int) -> None:
        proc = spawn(
            ["-m", "examples.backend", "--name", self.name(i), "--port", str(self.ports[i])],
            self.tmp_path,
            name=f"chaos{i}",
        )
        proc.wait_for("listening on")
        self.procs[self.name(i)] = proc

    def kill(self, i: int) -> None:
        proc = self.procs[self.name(i)]
        assert proc is not None
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(5)
        self.procs[self.name(i)] = None

    def alive(self) -> list[int]:
        return [i for i in range(len(self.ports)) if self.procs[self.name(i)] is not None]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc is not None:
                proc.stop()


async def test_chaos_no_idempotent_request_fails_while_a_backend_is_up(tmp_path):
    rng = random.Random(int(os.environ.get("STICKYLB_CHAOS_SEED", "1")))
    fleet = Fleet(tmp_path)
    config = {
        "retries": 2,
        "timeouts": {"connect": 500},
        "health": {
            "interval": 200,
            "jitter": 0,
            "path": "/health",
            "fall": 1,
            "rise": 1,
            "maxFails": 1,
            "timeout": 300,
        },
        "backends": [
            {"id": fleet.name(i), "url": f"http://127.0.0.1:{port}"}
            for i, port in enumerate(fleet.ports)
        ],
    }
    lb = spawn_balancer(config, tmp_path)
    stop = asyncio.Event()
    stats = {"requests": 0, "failed": 0, "ws_opened": 0, "ws_dropped": 0, "ws_messages": 0}
    failures: list[str] = []
    leaks: list[str] = []

    async def http_client(pinned: bool) -> None:
        make = client_session if pinned else aiohttp.ClientSession
        async with make() as client:
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    async with client.get(
                        lb.url + "/whoami", timeout=aiohttp.ClientTimeout(total=10)
                    ) as resp:
                        stats["requests"] += 1
                        if resp.status != 200:
                            stats["failed"] += 1
                            failures.append(f"status {resp.status}")
                        await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    stats["requests"] += 1
                    stats["failed"] += 1
                    failures.append(repr(exc))
                await asyncio.sleep(rng.uniform(0, 0.02))

    async def ws_client() -> None:
        async with aiohttp.ClientSession() as client:
            for _ in range(10_000):
                if stop.is_set():
                    return
                try:
                    async with client.ws_connect(lb.url + "/ws") as ws:
                        stats["ws_opened"] += 1
                        await ws.receive_json()
                        while not stop.is_set():
                            await ws.send_str("ping")
                            message = await ws.receive(timeout=5)
                            if message.type != aiohttp.WSMsgType.TEXT:
                                stats["ws_dropped"] += 1
                                break
                            stats["ws_messages"] += 1
                            await asyncio.sleep(0.1)
                except (aiohttp.ClientError, ConnectionError, TimeoutError):
                    stats["ws_dropped"] += 1
                    await asyncio.sleep(0.05)

    async def chaos() -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + SECONDS
        while loop.time() < end:
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            alive = fleet.alive()
            if len(alive) <= 1:
                continue
            victim = rng.choice(alive)
            fleet.kill(victim)
            await asyncio.sleep(DETECTION)
            before = backend_status(await lb_status(lb.url), fleet.name(victim))
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            after = backend_status(await lb_status(lb.url), fleet.name(victim))
            assert before["healthy"] is False
            if after["requests"] != before["requests"]:
                leaks.append(
                    f"{fleet.name(victim)} got {after['requests'] - before['requests']}"
                    " requests while known down"
                )
            await asyncio.to_thread(fleet.start, victim)

    try:
        clients = [asyncio.create_task(http_client(pinned=i % 2 == 0)) for i in range(12)]
        sockets = [asyncio.create_task(ws_client()) for _ in range(6)]
        await asyncio.sleep(1.5)
        warm_rss = lb.rss_kib()
        await chaos()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients, *sockets), 30)
        for i in range(len(fleet.ports)):
            if fleet.procs[fleet.name(i)] is None:
                await asyncio.to_thread(fleet.start, i)
        await asyncio.sleep(0.5)
        status = await lb_status(lb.url)
        end_rss = lb.rss_kib()
    finally:
        stop.set()
        lb.stop()
        fleet.stop()
    retried = lb.output.count("retrying on backend")
    print(
        f"\nchaos {SECONDS:g}s: {stats['requests']} requests, {stats['failed']} failed, "
        f"{retried} retried; {stats['ws_opened']} WebSockets opened, {stats['ws_dropped']} "
        f"dropped, {stats['ws_messages']} messages; balancer RSS {warm_rss} KiB after "
        f"warm-up, {end_rss} KiB at the end"
    )
    assert stats["requests"] > 200
    assert failures == [], failures[:5]
    assert leaks == []
    assert all(b["activeConnections"] == 0 for b in status["backends"])
    assert end_rss - warm_rss < 10 * 1024
    assert "Traceback" not in lb.output
