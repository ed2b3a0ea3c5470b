"""The balancer inside an aiohttp application (stickylb/embed.py): the same pipeline, with
aiohttp's server at the front. Real backends and clients on 127.0.0.1."""

from __future__ import annotations

import hashlib

import aiohttp
from aiohttp import web

from stickylb import build_config, handler_args, install

from .support import SEEN, backends, backends_config, start_app, until


async def test_an_embedding_app_serves_http_websockets_and_the_admin_endpoints(caplog):
    async def own(request: web.Request) -> web.Response:
        return web.Response(text="mine")

    async with backends("a", "b") as servers:
        config = build_config(
            {"port": 0, "backends": backends_config(*servers), "health": {"interval": "60s"}}
        )
        app = web.Application(handler_args=handler_args(config))
        app.router.add_get("/local/ping", own)
        balancer = install(app, config)
        front = await start_app(app, handle_signals=False, handler_cancellation=True)
        try:
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as client:
                async with client.get(front.url + "/local/ping") as resp:
                    assert await resp.text() == "mine"
                async with client.get(front.url + "/") as resp:
                    pinned = await resp.text()
                    assert "X-Backend-ID=" in resp.headers["Set-Cookie"]
                async with client.post(front.url + "/echo", data=b"x" * 100_000) as resp:
                    seen = await resp.json()
                    assert seen["name"] == pinned and seen["body_len"] == 100_000
                async with client.get(front.url + "/download?size=3000000&length=1") as resp:
                    assert len(await resp.read()) == 3_000_000
                async with client.ws_connect(front.url + "/ws") as ws:
                    assert await ws.receive_str() == f"hello from {pinned}"
                    await ws.send_str("hi")
                    assert await ws.receive_str() == f"{pinned}:hi"
                    await ws.send_bytes(b"abc")
                    assert await ws.receive_bytes() == b"cba"
                async with client.get(front.url + "/_lb/health") as resp:
                    assert (await resp.json())["total"] == 2
                async with client.get(front.url + "//_lb/./health") as resp:
                    assert resp.status == 200 and "x-backend-id" not in resp.headers
            await until(lambda: all(b.active == 0 for b in balancer.pool.backends))
            assert balancer.admission.active == 0
        finally:
            await front.stop()
        assert all("lb" not in r["path"] for s in servers for r in s.app[SEEN])
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.text


async def test_an_embedded_upload_streams_with_its_own_framing():
    async with backends("a") as servers:
        config = build_config(
            {"port": 0, "backends": backends_config(*servers), "health": {"enabled": False}}
        )
        app = web.Application(handler_args=handler_args(config))
        install(app, config)
        front = await start_app(app, handle_signals=False, handler_cancellation=True)
        block = bytes(range(256)) * 256

        async def chunks():
            for _ in range(64):
                yield block

        try:
            async with aiohttp.ClientSession() as client:
                async with client.post(front.url + "/upload", data=chunks()) as resp:
                    got = await resp.json()
            assert got["te"] == "chunked" and got["size"] == len(block) * 64
            assert got["sha"] == hashlib.sha256(block * 64).hexdigest()
        finally:
            await front.stop()


async def test_an_embedding_app_serves_the_runtime_api_with_the_token(caplog):
    caplog.set_level("INFO", logger="stickylb.control")
    async with backends("a", "b") as servers:
        config = build_config(
            {
                "port": 0,
                "backends": backends_config(*servers),
                "health": {"interval": "60s"},
                "admin": {"token": "embed-token"},
            }
        )
        app = web.Application(handler_args=handler_args(config))
        balancer = install(app, config)
        front = await start_app(app, handle_signals=False)
        try:
            async with aiohttp.ClientSession() as client:
                url = front.url + "/_lb/backends/a/state"
                async with client.post(url, json={"state": "drain"}) as resp:
                    assert resp.status == 401
                headers = {"Authorization": "Bearer embed-token"}
                async with client.post(url, json={"state": "drain"}, headers=headers) as resp:
                    assert resp.status == 200 and (await resp.json())["adminState"] == "drain"
                async with client.get(front.url + "/_lb/metrics") as resp:
                    assert "stickylb_backend_admin_state" in await resp.text()
            assert balancer.pool.find("a").admin_state == "drain"
            assert "backend a: state drain (by 127.0.0.1)" in caplog.text
        finally:
            await front.stop()
