"""Cookies with signed times (issue 17, part 2): ``cookie.idleTimeout`` and
``cookie.absoluteTimeout``, against a real in-process balancer and real clients."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time

import aiohttp

from .support import backends, backends_config, balancer, client_session, run_cli

NAME = "X-Backend-ID"


def times(token: str) -> tuple[int, int]:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return struct.unpack("!II", raw[6:14])


async def visit(client: aiohttp.ClientSession, url: str) -> tuple[str, str | None]:
    async with client.get(url + "/") as resp:
        cookie = resp.cookies.get(NAME)
        return await resp.text(), cookie.value if cookie is not None else None


def config(*servers, **cookie) -> dict:
    return {
        "port": 0,
        "backends": backends_config(*servers),
        "health": {"interval": "60s"},
        "cookie": {"secret": "s3cret", **cookie},
    }


async def test_an_active_client_keeps_its_backend_and_its_cookie_is_refreshed():
    async with backends("a", "b") as servers, balancer(config(*servers, idleTimeout="2s")) as lb:
        async with client_session() as client:
            home, token = await visit(client, lb.url)
            assert token is not None and len(token) == 32
            issued, seen = times(token)
            assert abs(issued - time.time()) < 2 and seen == issued
            refreshed = None
            for _ in range(8):  # 3.2 s of activity, longer than the idle timeout
                await asyncio.sleep(0.4)
                backend, again = await visit(client, lb.url)
                assert backend == home
                if again is not None:
                    refreshed = again
            assert refreshed is not None  # re-issued at most every idleTimeout / 2
            new_issued, new_seen = times(refreshed)
            assert new_issued == issued and new_seen > seen


async def test_an_idle_client_is_balanced_again():
    async with backends("a", "b") as servers, balancer(config(*servers, idleTimeout="1s")) as lb:
        async with client_session() as client:
            _, first = await visit(client, lb.url)
            await asyncio.sleep(2.2)
            _, second = await visit(client, lb.url)
            assert second is not None and second != first  # a new session, a new cookie
            assert times(second)[0] > times(first)[0]
        assert lb.balancer.stats.affinity[0] == 2  # both counted as new clients


async def test_the_absolute_timeout_ends_even_an_active_session():
    async with (
        backends("a", "b") as servers,
        balancer(config(*servers, absoluteTimeout="2s")) as lb,
        client_session() as client,
    ):
        _, first = await visit(client, lb.url)
        fresh = None
        for _ in range(8):
            await asyncio.sleep(0.4)
            _, again = await visit(client, lb.url)
            fresh = again or fresh
        assert fresh is not None and times(fresh)[0] > times(first)[0]


async def test_forged_and_garbage_timed_cookies_are_new_clients():
    async with backends("a", "b") as servers, balancer(config(*servers, idleTimeout="1m")) as lb:
        async with aiohttp.ClientSession() as client:
            _, token = await visit(client, lb.url)
            assert token is not None
            forged = token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")
            for value in (forged, "x" * 32, "%%%", "A" * 500):
                async with client.get(lb.url + "/", headers={"Cookie": f"{NAME}={value}"}) as r:
                    assert r.status == 200 and NAME in r.cookies
        affinity = lb.balancer.stats.affinity
        assert affinity[0] == 5  # every one of them was a new client


def test_times_need_a_secret(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "port": 1,
                "backends": [{"id": 0, "url": "http://127.0.0.1:1"}],
                "cookie": {"idleTimeout": "30m"},
            }
        )
    )
    result = run_cli([str(path)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "stickylb: config error: cookie: idleTimeout and absoluteTimeout need cookie.secret"
        " (the times are signed)"
    )


async def test_no_cookie_at_all_when_sticky_is_off():
    async with backends("a", "b") as servers:
        settings = {**config(*servers, idleTimeout="1m"), "sticky": False}
        async with balancer(settings) as lb, aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(lb.url + "/") as resp:
                    assert "Set-Cookie" not in resp.headers
