"""--workers N: processes sharing one port, stickiness across them, supervision, one mail."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import aiohttp

from .smtp import MailServer
from .support import FAST_HEALTH, backends, client_session, spawn_balancer, until, wait_for_state


def worker_pids(output: str) -> set[int]:
    return {
        int(pid)
        for pid in re.findall(
            r"\[(\d+)\] INFO stickylb: stickylb listening on http"
            r"://[^ ]+ \(strategy",
            output,
        )
    }


async def test_workers_share_the_port_and_keep_clients_pinned(tmp_path):
    async with backends("a", "b", "c") as servers:
        config = {
            "backends": [{"id": s.name, "url": s.url} for s in servers],
            "health": {"interval": "60s"},
        }
        proc = spawn_balancer(config, tmp_path, "--workers", "2")
        try:
            await until(lambda: len(worker_pids(proc.output)) == 2)
            for _ in range(6):
                async with client_session(connector=aiohttp.TCPConnector(force_close=True)) as c:
                    names = set()
                    for _ in range(10):  # a new connection each time: any worker may answer
                        async with c.get(proc.url + "/") as resp:
                            names.add(await resp.text())
                    assert len(names) == 1
        finally:
            assert proc.stop() == 0
        assert "stickylb stopped (2 workers)" in proc.output


async def test_a_dead_worker_is_replaced(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(
            {"backends": [{"id": "a", "url": servers[0].url}], "health": {"interval": "60s"}},
            tmp_path,
            "--workers",
            "2",
        )
        try:
            await until(lambda: len(worker_pids(proc.output)) == 2)
            victim = sorted(worker_pids(proc.output))[0]
            os.kill(victim, signal.SIGKILL)
            await until(lambda: len(worker_pids(proc.output)) == 3, limit=10)
            async with aiohttp.ClientSession() as client:
                for _ in range(10):
                    async with client.get(proc.url + "/") as resp:
                        assert resp.status == 200
        finally:
            assert proc.stop() == 0
        assert "starting a new one" in proc.output


async def test_only_one_worker_sends_alert_mail(tmp_path):
    with MailServer(tmp_path) as mail:
        async with backends("a", "b") as servers:
            config = {
                "health": FAST_HEALTH,
                "email": {
                    "host": "127.0.0.1",
                    "port": mail.port,
                    "from": "lb@example.test",
                    "cooldown": 0,
                    "retries": 0,
                },
                "backends": [
                    {"id": s.name, "url": s.url, "owner": "o@example.test"} for s in servers
                ],
            }
            proc = spawn_balancer(config, tmp_path, "--workers", "3")
            try:
                await until(lambda: len(worker_pids(proc.output)) == 3)
                servers[0].knobs.health_status = 503
                await wait_for_state(proc.url, "a", healthy=False)
                await asyncio.to_thread(mail.inbox.wait_for, 1)
                await asyncio.sleep(1.0)  # time for any duplicate to arrive
            finally:
                assert proc.stop() == 0
    assert [m["Subject"] for m in mail.inbox.messages] == ["[stickylb] Backend a is down"]
