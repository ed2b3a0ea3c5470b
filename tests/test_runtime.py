"""Runtime control through the admin API: drain, maint, weights, backends added, registered and
removed, the agent header, slow start, and who may write (issue 14). Real backends, real
clients; the process-level parts (reload, SIGHUP, stateFile, ctl, workers) are in
test_runtime_process.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import stickylb

from .support import (
    FAST_HEALTH,
    Load,
    backends,
    backends_config,
    balancer,
    client_session,
    health_probes,
    start_app,
    until,
)

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config_for(*servers: Any, **extra: Any) -> dict[str, Any]:
    return {
        "port": 0,
        "backends": backends_config(*servers),
        "health": {**FAST_HEALTH, "interval": "60s"},
        "admin": {"token": TOKEN},
        **extra,
    }


async def api(
    lb: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.request(
            method, f"{lb.url}/_lb{path}", json=body, headers=AUTH if headers is None else headers
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def who(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url + "/") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_backends_lists_runtime_fields_and_one_backend_by_id():
    async with backends("a", "b") as (a, b), balancer(config_for(a, b)) as lb:
        status, listing = await api(lb, "GET", "/backends", headers={})
        assert status == 200
        first = listing["backends"][0]
        assert first["id"] == "a"
        assert first["adminState"] == "ready"
        assert first["weight"] == 1 and first["configWeight"] == 1
        assert first["source"] == "config"
        assert "expiresAt" not in first
        status, one = await api(lb, "GET", "/backends/b", headers={})
        assert status == 200 and one["id"] == "b" and one["url"] == b.url
        status, missing = await api(lb, "GET", "/backends/nope", headers={})
        assert status == 404 and "nope" in missing["error"]


async def test_drain_keeps_pinned_client_and_websocket_while_new_clients_go_elsewhere():
    async with backends("a", "b") as (a, b), balancer(config_for(a, b)) as lb:
        async with client_session() as pinned:
            # Find a client pinned to "a", with a WebSocket open on it.
            while await who(pinned, lb.url) != "a":
                pinned.cookie_jar.clear()
            ws = await pinned.ws_connect(lb.url + "/ws")
            assert (await ws.receive_str()) == "hello from a"
            status, answer = await api(lb, "POST", "/backends/a/state", {"state": "drain"})
            assert status == 200 and answer["adminState"] == "drain"
            for _ in range(5):
                assert await who(pinned, lb.url) == "a"
            await ws.send_str("still")
            assert (await ws.receive_str()) == "a:still"
            for _ in range(6):
                async with aiohttp.ClientSession() as newcomer:
                    assert await who(newcomer, lb.url) == "b"
            status, answer = await api(lb, "POST", "/backends/a/state", {"state": "ready"})
            assert answer["adminState"] == "ready"
            seen = set()
            for _ in range(6):
                async with aiohttp.ClientSession() as newcomer:
                    seen.add(await who(newcomer, lb.url))
            assert seen == {"a", "b"}
            await ws.close()


async def test_wait_drained_answers_when_the_last_request_ends():
    async with backends("a", "b") as (a, b), balancer(config_for(a, b)) as lb:
        async with client_session() as client:
            while await who(client, lb.url) != "a":
                client.cookie_jar.clear()
            slow = asyncio.create_task(client.get(lb.url + "/slow?delay=1.0"))
            await until(lambda: lb.balancer.pool.find("a").active == 1)
            await api(lb, "POST", "/backends/a/state", {"state": "drain"})
            loop = asyncio.get_running_loop()
            started = loop.time()
            status, answer = await api(
                lb, "GET", "/backends/a?wait=drained&timeout=10s", headers={}
            )
            waited = loop.time() - started
            assert status == 200 and answer["drained"] is True
            assert answer["activeConnections"] == 0
            response = await slow
            assert response.status == 200 and await response.text() == "a"
            assert 0.3 < waited < 5
            # Timing out is an answer too.
            slow = asyncio.create_task(client.get(lb.url + "/slow?delay=1.5"))
            await until(lambda: lb.balancer.pool.find("a").active == 1)
            status, answer = await api(
                lb, "GET", "/backends/a?wait=drained&timeout=200ms", headers={}
            )
            assert status == 200 and answer["drained"] is False
            (await slow).close()


async def test_maint_moves_pinned_clients_and_closes_websockets_with_1012():
    async with (
        backends("a", "b") as (a, b),
        balancer(
            {
                **config_for(a, b, websocket={"drainTimeout": "1s"}),
                "health": {**FAST_HEALTH, "interval": "300ms"},
            }
        ) as lb,
    ):
        async with client_session() as pinned:
            while await who(pinned, lb.url) != "a":
                pinned.cookie_jar.clear()
            sockets = [await pinned.ws_connect(lb.url + "/ws") for _ in range(3)]
            for ws in sockets:
                assert (await ws.receive_str()) == "hello from a"
            status, _ = await api(lb, "POST", "/backends/a/state", {"state": "maint"})
            assert status == 200
            checked_at_maint = len(health_probes(a))
            async with pinned.get(lb.url + "/") as resp:
                assert await resp.text() == "b"
                assert "X-Backend-ID" in resp.cookies  # re-pinned
            assert await who(pinned, lb.url) == "b"
            for ws in sockets:
                message = await asyncio.wait_for(ws.receive(), 5)
                assert message.type == aiohttp.WSMsgType.CLOSE
                assert message.data == 1012
            # Health checks go on while in maint.
            await until(lambda: len(health_probes(a)) > checked_at_maint, limit=5)


async def test_weight_changes_the_spread():
    async with backends("a", "b") as (a, b), balancer(config_for(a, b)) as lb:
        status, answer = await api(lb, "POST", "/backends/a/weight", {"weight": 3})
        assert status == 200 and answer["weight"] == 3 and answer["configWeight"] == 1
        counts: Counter[str] = Counter()
        for _ in range(40):
            async with aiohttp.ClientSession() as client:
                counts[await who(client, lb.url)] += 1
        assert counts == {"a": 30, "b": 10}
        status, answer = await api(lb, "POST", "/backends/a/weight", {"weight": -1})
        assert status == 400 and answer["error"].startswith("weight:")


async def test_put_adds_a_backend_that_takes_traffic_only_after_its_first_check():
    async with backends("a", "c") as (a, c), balancer(config_for(a)) as lb:
        c.knobs.health_delay = 1.0  # the first check is still under way for a second
        status, answer = await api(lb, "PUT", "/backends/c", {"url": c.url, "weight": 2})
        assert status == 201, answer
        assert answer["source"] == "api" and answer["healthy"] is False
        for _ in range(6):
            async with aiohttp.ClientSession() as client:
                assert await who(client, lb.url) == "a"
        await until(lambda: lb.balancer.pool.find("c").healthy, limit=5)
        seen = Counter()
        for _ in range(9):
            async with aiohttp.ClientSession() as client:
                seen[await who(client, lb.url)] += 1
        assert seen == {"c": 6, "a": 3}
        # Replacing it with the same object changes nothing; an invalid one is refused.
        status, answer = await api(lb, "PUT", "/backends/c", {"url": c.url, "weight": 2})
        assert status == 200 and answer["healthy"] is True
        status, answer = await api(
            lb, "PUT", "/backends/d", {"url": "ftp://x", "weight": -1, "colour": 1}
        )
        assert status == 400
        lines = answer["error"].splitlines()
        assert any(line.startswith("url:") for line in lines)
        assert any(line.startswith("weight:") for line in lines)
        assert any(line.startswith("colour:") for line in lines)
        assert lb.balancer.pool.find("d") is None


async def test_delete_under_load_fails_no_request_and_rebalances_pinned_clients():
    async with backends("a", "b") as (a, b), balancer(config_for(a, b)) as lb:
        async with Load(lb.url + "/slow?delay=0.02", clients=8, limit=400, sticky=True) as load:
            await asyncio.sleep(0.3)
            status, answer = await api(lb, "DELETE", "/backends/a?timeout=5s")
            assert status == 202 and answer["removing"] is True
            await until(lambda: lb.balancer.pool.find("a") is None, limit=8)
            await asyncio.sleep(0.3)
        assert load.failures == []
        assert load.served["a"] > 0
        status, _ = await api(lb, "GET", "/backends/a", headers={})
        assert status == 404
        async with client_session() as client:
            assert {await who(client, lb.url) for _ in range(4)} == {"b"}


async def test_registered_backend_expires_after_its_ttl_without_heartbeats():
    async with backends("a", "r") as (a, r), balancer(config_for(a)) as lb:
        body = {"url": r.url, "ttl": "1s"}
        status, answer = await api(lb, "PUT", "/backends/r", body)
        assert status == 201 and answer["source"] == "registered"
        assert answer["expiresAt"].endswith("Z")
        await until(lambda: lb.balancer.pool.find("r").healthy, limit=5)
        for _ in range(3):  # heartbeats keep it
            await asyncio.sleep(0.5)
            status, answer = await api(lb, "PUT", "/backends/r", body)
            assert status == 200 and answer["healthy"] is True
        await until(lambda: lb.balancer.pool.find("r") is None, limit=5)
        async with aiohttp.ClientSession() as client:
            assert {await who(client, lb.url) for _ in range(3)} == {"a"}


async def test_the_registered_helper_heartbeats_and_deregisters():
    async with backends("a", "r") as (a, r), balancer(config_for(a)) as lb:
        async with stickylb.registered(lb.url, id="r", url=r.url, ttl="600ms", token=TOKEN) as reg:
            await until(lambda: lb.balancer.pool.find("r").healthy, limit=5)
            await asyncio.sleep(1.5)  # longer than the TTL: heartbeats keep it registered
            assert reg.heartbeats >= 3
            assert lb.balancer.pool.find("r") is not None
        await until(lambda: lb.balancer.pool.find("r") is None, limit=3)
        with pytest.raises(stickylb.RegistrationError, match="401"):
            async with stickylb.registered(lb.url, id="x", url=r.url, token="wrong"):
                pass


async def test_agent_header_drains_a_backend():
    said = {"state": "ready"}

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Stickylb-State": said["state"]})

    app = web.Application()
    app.router.add_get("/health", health)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="agent")

    app.router.add_get("/", hello)
    agent = await start_app(app)
    try:
        async with backends("b") as (b,):
            config = config_for(b)
            config["backends"].append({"id": "agent", "url": agent.url})
            config["health"] = {**FAST_HEALTH}
            async with balancer(config) as lb:
                backend = lb.balancer.pool.find("agent")
                said["state"] = "drain"
                await until(lambda: backend.admin_state == "drain", limit=5)
                for _ in range(4):
                    async with aiohttp.ClientSession() as client:
                        assert await who(client, lb.url) == "b"
                # An operator may override it; the agent rules again when it says something new.
                await api(lb, "POST", "/backends/agent/state", {"state": "ready"})
                await asyncio.sleep(0.3)
                assert backend.admin_state == "ready"
                said["state"] = "maint"
                await until(lambda: backend.admin_state == "maint", limit=5)
    finally:
        await agent.stop()


async def test_slow_start_ramps_a_recovered_backend():
    async with backends("a", "b") as (a, b):
        config = config_for(a, b)
        config["health"] = {**FAST_HEALTH, "slowStart": "4s"}
        async with balancer(config) as lb:
            pool = lb.balancer.pool
            b.knobs.health_status = 503
            await until(lambda: not pool.find("b").healthy, limit=5)
            b.knobs.health_status = 200
            await until(lambda: pool.find("b").healthy, limit=5)
            early: Counter[str] = Counter()
            for _ in range(40):
                async with aiohttp.ClientSession() as client:
                    early[await who(client, lb.url)] += 1
            assert pool.find("b").weight < 1
            status, listing = await api(lb, "GET", "/backends/b", headers={})
            assert status == 200 and listing["weight"] < 1 and listing["configWeight"] == 1
            await until(lambda: pool.find("b").weight == 1, limit=8)
            late: Counter[str] = Counter()
            for _ in range(40):
                async with aiohttp.ClientSession() as client:
                    late[await who(client, lb.url)] += 1
            assert early["b"] <= 12  # about 10-30% of new clients while ramping
            assert late["b"] == 20  # an even share once it is over


async def test_writes_need_the_token_and_do_not_exist_without_one():
    async with backends("a") as (a,):
        async with balancer(config_for(a)) as lb:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                status, answer = await api(
                    lb, "POST", "/backends/a/state", {"state": "drain"}, headers=headers
                )
                assert status == 401 and "token" in answer["error"]
                assert TOKEN not in str(answer)
            assert lb.balancer.pool.find("a").admin_state == "ready"
            status, _ = await api(lb, "POST", "/backends/a/state", {"state": "drain"})
            assert status == 200
            status, answer = await api(lb, "POST", "/backends/a/state", {"state": "sleepy"})
            assert status == 400 and answer["error"].startswith("state:")
            status, answer = await api(lb, "POST", "/reload")
            assert status == 400  # started without a config file
        config = config_for(a)
        del config["admin"]
        async with balancer(config) as lb:
            status, _ = await api(lb, "POST", "/backends/a/state", {"state": "drain"})
            assert status == 404
            status, _ = await api(lb, "GET", "/backends", headers={})
            assert status == 200


async def test_admin_allow_sees_the_client_behind_a_trusted_proxy():
    async with backends("a") as (a,):
        config = config_for(a, trustedProxies=["127.0.0.1/32"])
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            outside = {"X-Forwarded-For": "203.0.113.9"}
            async with client.get(lb.url + "/_lb/health", headers=outside) as resp:
                assert resp.status == 404  # the proxy on loopback no longer vouches for anyone
            inside = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}
            async with client.get(lb.url + "/_lb/health", headers=inside) as resp:
                assert resp.status == 404  # the right-most untrusted address decides
            async with client.get(lb.url + "/_lb/health") as resp:
                assert resp.status == 200  # no proxy at all: the loopback peer itself
            async with client.get(lb.url + "/_lb/health", headers={**outside, **AUTH}) as resp:
                assert resp.status == 200
        config["admin"]["allow"] = ["203.0.113.0/24"]
        config["trustedProxies"] = []
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/_lb/health", headers=outside) as resp:
                assert resp.status == 404  # forwarded headers from a stranger are not believed


async def test_reload_applies_settings_and_keeps_api_changes(tmp_path):
    async with backends("a", "b") as (a, b):
        path = tmp_path / "config.json"
        data = {**config_for(a, b), "host": "127.0.0.1"}
        path.write_text(json.dumps(data))
        config = stickylb.load_config(path)
        lb_balancer = stickylb.Balancer(config, loader=lambda: stickylb.load_config(path))
        async with balancer(config, balancer=lb_balancer) as lb:
            await api(lb, "POST", "/backends/a/weight", {"weight": 4})
            await api(lb, "POST", "/backends/b/state", {"state": "drain"})
            data["cookie"] = {"name": "lb_pin", "maxAge": 60}
            data["backendHeader"] = False
            data["port"] = 1  # needs a restart
            path.write_text(json.dumps(data))
            status, answer = await api(lb, "POST", "/reload")
            assert status == 200 and answer["restartNeeded"] == ["port"]
            async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
                assert "x-backend-id" not in resp.headers
                assert resp.cookies["lb_pin"]["max-age"] == "60"
            status, one = await api(lb, "GET", "/backends/a", headers={})
            assert one["weight"] == 4
            status, one = await api(lb, "GET", "/backends/b", headers={})
            assert one["adminState"] == "drain"


async def test_a_rotated_cookie_secret_moves_nobody_and_reissues_old_tokens(tmp_path):
    async with backends("a", "b", "c") as (a, b, c):
        path = tmp_path / "config.json"
        data = {**config_for(a, b, c), "host": "127.0.0.1", "cookie": {"secret": "old-secret"}}
        path.write_text(json.dumps(data))
        config = stickylb.load_config(path)
        lb_balancer = stickylb.Balancer(config, loader=lambda: stickylb.load_config(path))
        async with balancer(config, balancer=lb_balancer) as lb:
            browsers = [client_session() for _ in range(3)]
            homes = [await who(browser, lb.url) for browser in browsers]
            data["cookie"]["secret"] = ["new-secret", "old-secret"]
            path.write_text(json.dumps(data))
            assert (await api(lb, "POST", "/reload"))[0] == 200
            for browser, home in zip(browsers, homes, strict=True):
                async with browser.get(lb.url + "/") as resp:
                    assert await resp.text() == home  # nobody moved
                    assert "X-Backend-ID" in resp.cookies  # re-issued with the new secret
                async with browser.get(lb.url + "/") as resp:
                    assert await resp.text() == home
                    assert "X-Backend-ID" not in resp.cookies  # the new token is current
            data["cookie"]["secret"] = ["newest-secret"]  # the old one retired
            path.write_text(json.dumps(data))
            assert (await api(lb, "POST", "/reload"))[0] == 200
            for browser in browsers:
                async with browser.get(lb.url + "/") as resp:
                    assert "X-Backend-ID" in resp.cookies  # unknown now: balanced again
                await browser.close()
            affinity = lb.balancer.stats.affinity
            assert affinity[0] == 3 and affinity[1] >= 6 and affinity[3] == 3
