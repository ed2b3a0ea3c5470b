"""Cluster mode (issue 16): several ``python -m stickylb`` processes sharing one real
``redis-server`` (started here on a free port, one per module, stopped by PID). ``.ci/run``
installs redis-server; without it these tests are skipped locally (``REQUIRE_REDIS=1`` makes
that a failure)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stickylb.core.affinity import backend_token

from .redis_server import REDIS_SERVER, RedisServer
from .smtp import MailServer
from .support import (
    FAST_HEALTH,
    LISTEN_RE,
    Load,
    Process,
    backends,
    backends_config,
    free_port,
    lb_status,
    metric,
    run_cli,
    spawn,
    spawn_balancer,
    start_app,
)
from .test_affinity_sources import cookieless, login, session_backends
from .test_webhooks import Receiver

if REDIS_SERVER is None and os.environ.get("REQUIRE_REDIS") != "1":
    pytest.skip(
        "redis-server is not installed (apt-get install redis-server; .ci/run does)",
        allow_module_level=True,
    )

TOKEN = "cluster-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cluster_config(store: RedisServer, servers, name: str | None = None, **extra: Any) -> dict:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "health": FAST_HEALTH,
        "admin": {"token": TOKEN},
        "cluster": {"redis": store.url, "name": name or uuid.uuid4().hex[:12], "leaseTime": "2s"},
        "backends": backends_config(*servers),
        **extra,
    }


def start(config: dict, tmp_path: Path, *args: str, env: dict | None = None) -> Process:
    proc = spawn_balancer(config, tmp_path, *args, env=env)
    proc.wait_for("cluster: joined")
    return proc


async def eventually(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> float:
    """Seconds until ``check()`` is true (bounded by ``limit``)."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > limit:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, url, json=body, headers=AUTH) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def backend_of(url: str, backend_id: str) -> dict[str, Any]:
    status, body = await call("GET", f"{url}/_lb/backends/{backend_id}")
    assert status == 200, body
    return body


async def ids(url: str) -> list[str]:
    status, body = await call("GET", url + "/_lb/backends")
    assert status == 200, body
    return [backend["id"] for backend in body["backends"]]


async def leader_of(*procs: Process) -> Process:
    async def one() -> bool:
        for proc in procs:
            if (await lb_status(proc.url))["cluster"]["leader"]:
                return True
        return False

    await eventually(one)
    for proc in procs:
        if (await lb_status(proc.url))["cluster"]["leader"]:
            return proc
    raise AssertionError("no leader")


# --- shared runtime changes ---------------------------------------------------------------------


async def test_a_drain_through_one_instance_is_applied_by_the_other_within_a_second(
    store, tmp_path
):
    async with backends("x", "y") as servers:
        config = cluster_config(store, servers)
        a = start(config, tmp_path)
        # The Redis URL may come from the environment instead of the file.
        url = config["cluster"].pop("redis")
        b = start(config, tmp_path, env={"STICKYLB_CLUSTER__REDIS": url})
        try:
            status, _ = await call("POST", a.url + "/_lb/backends/x/state", {"state": "drain"})
            assert status == 200

            async def drained_on_b() -> bool:
                return (await backend_of(b.url, "x"))["adminState"] == "drain"

            assert await eventually(drained_on_b, limit=1.0) < 1.0
            status, _ = await call("POST", b.url + "/_lb/backends/y/weight", {"weight": 5})
            assert status == 200

            async def weighed_on_a() -> bool:
                return (await backend_of(a.url, "y"))["weight"] == 5

            await eventually(weighed_on_a, limit=1.0)
            # Redis holds the fleet's state.
            held = store.client().hgetall(f"{config['cluster']['name']}:backends")
            assert json.loads(held["x"]) == {"adminState": "drain"}
            assert json.loads(held["y"]) == {"weight": 5}
            # A third instance, started later, takes the fleet's state.
            config["cluster"]["redis"] = url
            c = start(config, tmp_path)
            try:
                assert (await backend_of(c.url, "x"))["adminState"] == "drain"
                assert (await backend_of(c.url, "y"))["weight"] == 5
                instances = (await lb_status(c.url))["instances"]
                assert len(instances) == 3 and instances[0]["self"] is True
                assert {i["pid"] for i in instances} == {a.proc.pid, b.proc.pid, c.proc.pid}
                assert all(i["sees"] == {"x": "up", "y": "up"} for i in instances)
            finally:
                assert c.stop() == 0
        finally:
            assert a.stop() == 0 and b.stop() == 0


async def test_a_reload_through_one_instance_reloads_every_instance(store, tmp_path):
    async with backends("x", "y") as (x, y):
        path = tmp_path / "fleet.json"
        path.write_text(json.dumps(cluster_config(store, [x])))
        procs = []
        for _ in range(2):
            proc = spawn(["-m", "stickylb", str(path)], tmp_path, name="stickylb")
            proc.url = proc.wait_for(LISTEN_RE.pattern).group(1)
            proc.wait_for("cluster: joined")
            procs.append(proc)
        try:
            data = json.loads(path.read_text())
            data["backends"] = backends_config(x, y)
            path.write_text(json.dumps(data))
            status, body = await call("POST", procs[0].url + "/_lb/reload")
            assert status == 200, body
            for proc in procs:

                async def has_y(proc: Process = proc) -> bool:
                    return await ids(proc.url) == ["x", "y"]

                await eventually(has_y, limit=3.0)
        finally:
            for proc in procs:
                assert proc.stop() == 0


async def test_a_backend_registered_through_one_instance_is_served_by_the_other_and_expires_once(
    store, tmp_path
):
    async with backends("x", "r") as (x, r):
        config = cluster_config(store, [x])
        a, b = start(config, tmp_path), start(config, tmp_path)
        try:
            status, body = await call(
                "PUT", a.url + "/_lb/backends/r", {"url": r.url, "ttl": "1500ms"}
            )
            assert status == 201, body

            async def b_serves_r() -> bool:
                async with aiohttp.ClientSession() as client:
                    names = set()
                    for _ in range(4):
                        async with client.get(b.url + "/") as resp:
                            names.add(await resp.text())
                    return "r" in names

            await eventually(b_serves_r, limit=5.0)
            assert (await backend_of(b.url, "r"))["source"] == "registered"

            # No heartbeat: removed from both, expired by one instance only.
            async def gone_everywhere() -> bool:
                return "r" not in await ids(a.url) and "r" not in await ids(b.url)

            await eventually(gone_everywhere, limit=10.0)
            expired = [p for p in (a, b) if "backend r: no heartbeat" in p.output]
            assert len(expired) == 1
            assert "r" not in store.client().hgetall(f"{config['cluster']['name']}:backends")
        finally:
            assert a.stop() == 0 and b.stop() == 0


async def test_least_connections_spreads_by_the_fleets_totals(store, tmp_path):
    async with backends("x", "y") as servers:
        config = cluster_config(store, servers, strategy="least-connections")
        a, b = start(config, tmp_path), start(config, tmp_path)
        pinned_to_x = {"Cookie": f"X-Backend-ID={backend_token('x', None)}"}
        try:
            async with aiohttp.ClientSession() as client:

                async def slow(url: str, headers: dict | None = None) -> str:
                    async with client.get(url + "/slow?delay=3", headers=headers) as resp:
                        assert resp.status == 200
                        return resp.headers["x-backend-id"]

                on_a = [asyncio.create_task(slow(a.url, pinned_to_x)) for _ in range(3)]

                async def b_sees_them() -> bool:
                    return (await backend_of(b.url, "x"))["activeConnections"] == 3

                await eventually(b_sees_them, limit=3.0)
                on_b = []
                for _ in range(3):  # new clients through B: x is busy fleet-wide
                    on_b.append(asyncio.create_task(slow(b.url)))
                    await asyncio.sleep(0.1)
                assert await asyncio.gather(*on_a) == ["x", "x", "x"]
                assert await asyncio.gather(*on_b) == ["y", "y", "y"]
        finally:
            assert a.stop() == 0 and b.stop() == 0


# --- one alert per event -------------------------------------------------------------------------


def alerting(store: RedisServer, servers, mail: MailServer, hook_url: str) -> dict:
    return cluster_config(
        store,
        servers,
        email={
            "host": "127.0.0.1",
            "port": mail.port,
            "from": "lb@example.test",
            "to": ["ops@example.test"],
            "cooldown": 0,
            "retries": 0,
        },
        webhooks=[{"url": hook_url, "cooldown": 0, "retries": 0}],
    )


@asynccontextmanager
async def alerting_fleet(store: RedisServer, tmp_path: Path) -> AsyncIterator[tuple[Any, ...]]:
    """Two instances alerting by mail (a real SMTP server) and webhook (a real receiver) about
    backends x and y: yields (instances, x, mail server, receiver)."""
    receiver = Receiver()
    hooks = await start_app(receiver.app(), handle_signals=False)
    try:
        with MailServer(tmp_path) as mail:
            async with backends("x", "y") as (x, y):
                config = alerting(store, [x, y], mail, hooks.url + "/hook")
                procs = [start(config, tmp_path), start(config, tmp_path)]
                try:
                    yield procs, x, mail, receiver
                finally:
                    for proc in procs:
                        if proc.proc.poll() is None:  # not one the test killed
                            assert proc.stop() == 0
    finally:
        await hooks.stop()


async def test_an_outage_seen_by_every_instance_sends_one_mail_and_one_webhook(store, tmp_path):
    async with alerting_fleet(store, tmp_path) as ((a, b), x, mail, receiver):
        await leader_of(a, b)
        x.knobs.health_status = 503

        async def both_see_it() -> bool:
            states = [(await backend_of(p.url, "x"))["state"] for p in (a, b)]
            return states == ["down", "down"]

        await eventually(both_see_it)
        await asyncio.to_thread(mail.inbox.wait_for, 1)
        await asyncio.sleep(1.5)  # time for a second one, if there were one
        assert len(mail.inbox.messages) == 1
        assert mail.inbox.messages[0]["Subject"] == "[stickylb] Backend x is down"
        assert [p["body"]["event"] for p in receiver.posts] == ["down"]


async def test_when_the_alerting_instance_dies_another_takes_over(store, tmp_path):
    async with alerting_fleet(store, tmp_path) as ((a, b), x, mail, receiver):
        first = await leader_of(a, b)
        other = b if first is a else a
        first.proc.kill()  # no goodbye: the lease must run out
        first.proc.wait(10)

        async def other_leads() -> bool:
            return bool((await lb_status(other.url))["cluster"]["leader"])

        assert await eventually(other_leads, limit=5.0) < 5.0
        x.knobs.health_status = 503
        messages = await asyncio.to_thread(mail.inbox.wait_for, 1)
        assert messages[0]["Subject"] == "[stickylb] Backend x is down"
        await eventually(lambda: _receiver_got(receiver, "down"))

        async def the_dead_one_is_gone() -> bool:  # its report expires
            instances = (await lb_status(other.url))["instances"]
            return [i["pid"] for i in instances] == [other.proc.pid]

        await eventually(the_dead_one_is_gone, limit=5.0)


async def _receiver_got(receiver: Receiver, event: str) -> bool:
    return [p["body"]["event"] for p in receiver.posts] == [event]


# --- the store is never on the hot path ----------------------------------------------------


async def test_redis_killed_under_load_loses_no_request_and_its_state_comes_back(tmp_path):
    own = RedisServer(tmp_path)  # this test kills its Redis: not the module's
    own.start()
    try:
        async with backends("x", "y") as servers:
            config = cluster_config(own, servers)
            a, b = start(config, tmp_path), start(config, tmp_path)
            try:
                status, _ = await call("POST", a.url + "/_lb/backends/x/weight", {"weight": 3})
                assert status == 200
                await asyncio.sleep(0.3)
                async with (
                    Load(a.url + "/", clients=3) as on_a,
                    Load(b.url + "/", clients=3) as on_b,
                ):
                    await asyncio.sleep(0.5)
                    own.stop(signal.SIGKILL)
                    a.wait_for("cluster: lost the store")
                    b.wait_for("cluster: lost the store")
                    await asyncio.sleep(0.5)
                    # Writes are refused rather than diverge; reads and traffic go on.
                    status, body = await call(
                        "POST", b.url + "/_lb/backends/y/state", {"state": "drain"}
                    )
                    assert (status, body["error"]) == (503, "cluster store unavailable")
                    assert await metric(a.url, "stickylb_cluster_connected") == 0
                    assert (await backend_of(b.url, "x"))["weight"] == 3
                    own.start()  # empty: nothing was saved
                    a.wait_for("cluster: the store at .* is back")
                    b.wait_for("cluster: the store at .* is back")
                    await asyncio.sleep(0.3)
                assert on_a.failures == [] and on_b.failures == []
                assert sum(on_a.served.values()) > 50 and sum(on_b.served.values()) > 50
                for proc in (a, b):
                    assert proc.output.count("cluster: lost the store") == 1
                    assert proc.output.count("cluster: the store at") == 1
                # What the fleet held was written back to the empty Redis.
                held = own.client().hgetall(f"{config['cluster']['name']}:backends")
                assert json.loads(held["x"]) == {"weight": 3}
                assert await metric(b.url, "stickylb_cluster_connected") == 1
                status, _ = await call("POST", b.url + "/_lb/backends/y/state", {"state": "drain"})
                assert status == 200
            finally:
                assert a.stop() == 0 and b.stop() == 0
    finally:
        own.stop()


async def test_workers_are_instances_of_the_cluster(store, tmp_path):
    async with backends("x", "y") as servers:
        config = cluster_config(store, servers)
        proc = spawn_balancer(config, tmp_path, "--workers", "2")
        try:

            async def two_instances() -> bool:
                return len((await lb_status(proc.url))["instances"]) == 2

            await eventually(two_instances)
            status, _ = await call("POST", proc.url + "/_lb/backends/x/state", {"state": "maint"})
            assert status == 200

            async def every_worker_has_it() -> bool:  # reads land on either worker
                states = [(await backend_of(proc.url, "x"))["adminState"] for _ in range(8)]
                return states == ["maint"] * 8

            await eventually(every_worker_has_it, limit=2.0)
        finally:
            assert proc.stop() == 0


# --- secrets and bad config ----------------------------------------------------------------------


async def test_the_store_password_is_never_printed(store, tmp_path):
    secret = "redis-pass-5f2e9a"
    async with backends("x") as servers:
        config = cluster_config(store, servers)
        config["cluster"]["redis"] = f"redis://:{secret}@127.0.0.1:{free_port()}/0"
        proc = spawn_balancer(config, tmp_path)
        try:
            proc.wait_for("cluster: lost the store at redis://127.0.0.1:")
            async with aiohttp.ClientSession() as client:
                async with client.get(proc.url + "/") as resp:  # serving all the same
                    assert resp.status == 200
            status = await lb_status(proc.url)
            assert status["cluster"]["connected"] is False
        finally:
            assert proc.stop() == 0
    assert secret not in proc.output and secret not in json.dumps(status)


def test_a_bad_cluster_config_is_one_line_naming_the_field(tmp_path):
    path = tmp_path / "c.json"
    data = {
        "port": 1,
        "backends": [{"id": 0, "url": "http://127.0.0.1:1"}],
        "cluster": {"redis": "http://:pw@127.0.0.1:6379", "leaseTime": "100ms"},
    }
    path.write_text(json.dumps(data))
    result = run_cli(["--check", str(path)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "stickylb: config error: cluster.redis: expected a redis://, rediss:// or unix:// URL",
        "stickylb: config error: cluster.leaseTime: at least 1s (the lease is renewed every"
        " leaseTime / 5)",
    ]
    assert "pw" not in result.stderr


async def test_a_session_learned_by_one_instance_is_followed_by_the_others(store, tmp_path):
    async with session_backends("x", "y", "z") as servers:
        config = cluster_config(
            store, servers, affinity={"sources": [{"learnCookie": "JSESSIONID", "ttl": "5m"}]}
        )
        a, b = start(config, tmp_path), start(config, tmp_path)
        try:
            async with cookieless() as client:
                sessions = [await login(client, a.url) for _ in range(6)]  # learned by A only

                async def b_learned_them() -> bool:
                    return (await lb_status(b.url))["affinity"]["learnedSessions"] == 6

                await eventually(b_learned_them, limit=3.0)
                for home, session in sessions:
                    headers = {"Cookie": f"JSESSIONID={session}"}
                    async with client.get(b.url + "/", headers=headers) as resp:
                        assert await resp.text() == home
                # Placed by what it learned, not by a round-robin that happened to agree.
                assert (await lb_status(b.url))["affinity"]["placed"]["learnCookie"] == 6
                # An instance that joins later loads what the fleet learned.
                c = start(config, tmp_path)
                try:
                    assert (await lb_status(c.url))["affinity"]["learnedSessions"] == 6
                    for home, session in sessions:
                        headers = {"Cookie": f"JSESSIONID={session}"}
                        async with client.get(c.url + "/", headers=headers) as resp:
                            assert await resp.text() == home
                    assert (await lb_status(c.url))["affinity"]["placed"]["learnCookie"] == 6
                finally:
                    assert c.stop() == 0
        finally:
            assert a.stop() == 0 and b.stop() == 0
