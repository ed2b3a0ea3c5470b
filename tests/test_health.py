"""Active health checks, custom callables, passive detection and failover."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from stickylb import build_config

from .support import (
    FAST_HEALTH,
    backend_status,
    backends,
    balancer,
    client_session,
    free_port,
    health_probes,
    lb_status,
    spawn,
    spawn_balancer,
    until,
    wait_for_state,
)


async def test_per_backend_overrides_are_what_each_backend_receives():
    async with backends("a", "b", "c") as (a, b, c):
        config = {
            "port": 0,
            "health": {
                "interval": 100,
                "jitter": 0,
                "path": "/health",
                "headers": {"X-Global": "g"},
            },
            "backends": [
                {"id": "a", "url": a.url, "healthHeaders": {"X-Health-Token": "tok-a"}},
                {
                    "id": "b",
                    "url": b.url,
                    "healthPath": "/ready",
                    "healthMethod": "HEAD",
                    "healthTimeout": 700,
                    "healthAlgorithm": "http",
                },
                {"id": "c", "url": c.url},
            ],
        }
        async with balancer(config) as lb:
            await until(lambda: all(len(health_probes(s)) >= 2 for s in (a, b, c)))
            status = await lb_status(lb.url)
    probe_a, probe_b, probe_c = (health_probes(s)[0] for s in (a, b, c))
    assert (probe_a["method"], probe_a["path"]) == ("GET", "/health")
    assert probe_a["headers"]["X-Health-Token"] == "tok-a"
    assert "X-Global" not in probe_a["headers"]  # per-backend headers replace the global ones
    assert (probe_b["method"], probe_b["path"]) == ("HEAD", "/ready")
    assert probe_b["headers"]["X-Global"] == "g"
    assert (probe_c["method"], probe_c["path"]) == ("GET", "/health")
    b_check = backend_status(status, "b")["healthCheck"]
    assert b_check == {
        "path": "/ready",
        "method": "HEAD",
        "algorithm": "http",
        "timeout": 700,
        "hasCustomHeaders": True,
        "hasCustomFunction": False,
    }
    assert backend_status(status, "a")["healthCheck"]["hasCustomHeaders"] is True
    assert "tok-a" not in json.dumps(status) and '"g"' not in json.dumps(status)


async def test_expect_status_and_body():
    async with backends("a", "b") as (a, b):
        config = {
            "port": 0,
            "health": {**FAST_HEALTH, "expectStatus": "200-399"},
            "backends": [
                {"id": "a", "url": a.url, "healthExpectBody": "ok"},
                {"id": "b", "url": b.url, "healthExpectBody": "^not there$"},
            ],
        }
        async with balancer(config) as lb:
            await wait_for_state(lb.url, "b", healthy=False)
            status = await lb_status(lb.url)
            assert backend_status(status, "a")["healthy"] is True
            assert backend_status(status, "b")["lastFailureReason"] == (
                "body did not match expectBody"
            )


async def test_hanging_backend_does_not_delay_the_checks_of_another():
    async with backends("slow", "fast") as (slow, fast):
        slow.knobs.health_delay = 5
        config = {
            "port": 0,
            "health": {**FAST_HEALTH},
            "backends": [
                {"id": "slow", "url": slow.url, "healthTimeout": 300},
                {"id": "fast", "url": fast.url},
            ],
        }
        async with balancer(config) as lb:
            await wait_for_state(lb.url, "slow", healthy=False)
            before = len(health_probes(fast))
            await asyncio.sleep(1.0)
            # ~10 checks at 100 ms; sequential checks would manage at most 3 (one per 300 ms)
            assert len(health_probes(fast)) - before >= 6
            status = await lb_status(lb.url)
            assert backend_status(status, "slow")["lastFailureReason"] == "timeout after 300 ms"


async def test_fewer_than_fall_failures_keep_the_backend_in_rotation():
    async with backends("a", "b") as (a, b):
        config = {
            "port": 0,
            "health": {**FAST_HEALTH, "fall": 3, "rise": 2},
            "backends": [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        }
        async with balancer(config) as lb:
            await until(lambda: len(health_probes(a)) >= 1)
            a.knobs.fail_next = 2
            await until(lambda: a.knobs.fail_next == 0)
            await until(lambda: len(health_probes(a)) >= 6)
            status = await lb_status(lb.url)
            assert backend_status(status, "a")["healthy"] is True
            assert backend_status(status, "a")["lastChange"] is None
            a.knobs.fail_next = 3
            await wait_for_state(lb.url, "a", healthy=False)
            # needs rise=2 passes to return
            await wait_for_state(lb.url, "a", healthy=True)
            status = await lb_status(lb.url)
            assert backend_status(status, "a")["consecutiveSuccesses"] >= 2
            assert backend_status(status, "a")["lastChange"] is not None


async def test_down_interval_checks_a_down_backend_faster():
    async with backends("a") as (a,):
        config = {
            "port": 0,
            "health": {
                "interval": "5s",
                "downInterval": 100,
                "path": "/health",
                "jitter": 0,
                "fall": 1,
                "rise": 1,
            },
            "backends": [{"id": "a", "url": a.url}],
        }
        a.knobs.health_status = 503
        async with balancer(config) as lb:
            await wait_for_state(lb.url, "a", healthy=False)
            a.knobs.health_status = 200
            await wait_for_state(lb.url, "a", healthy=True, limit=3)


async def test_custom_callables_from_python_sync_and_async():
    calls = []

    def sync_check(backend):
        calls.append(("sync", backend.id, backend.path))
        return backend.id == "a"

    async def async_check(backend, session):
        async with session.get(backend.health_url) as response:
            calls.append(("async", backend.id, response.status))
            return False

    async with backends("a", "b") as (a, b):
        config = build_config(
            {
                "port": 0,
                "host": "127.0.0.1",
                "health": {**FAST_HEALTH, "check": sync_check},
                "backends": [
                    {"id": "a", "url": a.url},
                    {"id": "b", "url": b.url, "healthCheck": async_check},
                ],
            }
        )
        async with balancer(config) as lb:
            await wait_for_state(lb.url, "b", healthy=False)
            status = await lb_status(lb.url)
    assert ("sync", "a", "/health") in calls
    assert ("async", "b", 200) in calls
    assert backend_status(status, "a")["healthy"] is True
    assert backend_status(status, "b")["lastFailureReason"] == "check returned False"
    assert backend_status(status, "b")["healthCheck"]["hasCustomFunction"] is True


async def test_custom_callables_by_import_path_in_a_real_process(tmp_path):
    async with backends("ok", "raise", "false", "hang", "synchang", "session") as servers:
        checks = ["sync_ok", "raises", "returns_false", "hangs", "sync_hangs", "async_uses_session"]
        config = {
            "health": {**FAST_HEALTH, "timeout": 300},
            "backends": [
                {"id": s.name, "url": s.url, "healthCheck": f"tests.custom_checks:{check}"}
                for s, check in zip(servers, checks, strict=True)
            ],
        }
        proc = spawn_balancer(config, tmp_path)
        try:
            for name in ("raise", "false", "hang", "synchang"):
                await wait_for_state(proc.url, name, healthy=False)
            status = await lb_status(proc.url)
            reasons = {b["id"]: b["lastFailureReason"] for b in status["backends"]}
            assert reasons["raise"] == "check raised ValueError"
            assert reasons["false"] == "check returned False"
            assert reasons["hang"] == "timeout after 300 ms"
            assert reasons["synchang"] == "timeout after 300 ms"
            assert backend_status(status, "ok")["healthy"] is True
            assert backend_status(status, "session")["healthy"] is True
            # a slow sync check runs off the loop: proxying stays fast meanwhile
            async with aiohttp.ClientSession() as client:
                for _ in range(20):
                    async with client.get(
                        proc.url + "/", timeout=aiohttp.ClientTimeout(total=1)
                    ) as resp:
                        assert resp.status == 200
        finally:
            assert proc.stop() == 0
        assert "the database is gone" not in proc.output  # exception texts stay out of logs


async def test_killed_backend_is_marked_down_by_live_traffic_and_clients_see_no_error(tmp_path):
    ports = [free_port(), free_port()]
    procs = [
        spawn(
            ["-m", "examples.backend", "--name", f"k{i}", "--port", str(port)],
            tmp_path,
            name=f"backend{i}",
        )
        for i, port in enumerate(ports)
    ]
    for proc in procs:
        proc.wait_for("listening on")
    config = {
        "sticky": False,
        "retries": 1,
        "health": {"interval": "60s", "path": "/health", "maxFails": 2, "failWindow": "10s"},
        "backends": [
            {"id": f"k{i}", "url": f"http://127.0.0.1:{port}"} for i, port in enumerate(ports)
        ],
    }
    lb = spawn_balancer(config, tmp_path)
    errors: list[str] = []
    served: dict[str, int] = {"k0": 0, "k1": 0}
    stop = asyncio.Event()

    async def client_loop() -> None:
        async with aiohttp.ClientSession() as client:
            for _ in range(2000):
                if stop.is_set():
                    return
                try:
                    async with client.get(lb.url + "/whoami") as resp:
                        if resp.status != 200:
                            errors.append(f"status {resp.status}")
                        else:
                            served[(await resp.json())["name"]] += 1
                except aiohttp.ClientError as exc:
                    errors.append(repr(exc))

    try:
        tasks = [asyncio.create_task(client_loop()) for _ in range(16)]
        await until(lambda: served["k0"] > 50 and served["k1"] > 50)
        procs[0].proc.send_signal(signal.SIGKILL)
        procs[0].proc.wait(5)
        killed_at = served["k1"]
        await until(lambda: served["k1"] > killed_at + 300, limit=20)
        stop.set()
        await asyncio.gather(*tasks)
        status = await lb_status(lb.url)
        k0 = backend_status(status, "k0")
        assert k0["healthy"] is False
        assert "live traffic" in k0["lastFailureReason"]
        assert errors == []
        assert all(b["activeConnections"] == 0 for b in status["backends"])
    finally:
        stop.set()
        lb.stop()
        for proc in procs:
            proc.stop()
    assert "retrying on backend k1" in lb.output


async def test_recovered_backend_gets_new_clients_again():
    async with backends("a", "b") as (a, b):
        config = {
            "port": 0,
            "health": FAST_HEALTH,
            "backends": [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
        }
        async with balancer(config) as lb:
            a.knobs.health_status = 503
            await wait_for_state(lb.url, "a", healthy=False)
            for _ in range(4):
                async with client_session() as client, client.get(lb.url + "/") as resp:
                    assert await resp.text() == "b"
            a.knobs.health_status = 200
            await wait_for_state(lb.url, "a", healthy=True)
            names = set()
            for _ in range(4):
                async with client_session() as client, client.get(lb.url + "/") as resp:
                    names.add(await resp.text())
            assert names == {"a", "b"}
