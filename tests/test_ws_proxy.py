"""WebSocket relay through a real balancer: pinning, messages, close codes, subprotocols."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import WSMsgType, web

from .support import backends, backends_config, balancer, client_session, start_app, until

QUIET_HEALTH = {"interval": "60s"}


def lb_config(*servers, **extra):
    return {"port": 0, "backends": backends_config(*servers), "health": QUIET_HEALTH, **extra}


async def test_upgrade_is_pinned_like_http_and_sets_the_cookie_on_101():
    async with backends("a", "b", "c") as servers, balancer(lb_config(*servers)) as lb:
        for _ in range(6):
            async with client_session() as client:
                async with client.get(lb.url + "/") as resp:
                    http_name = await resp.text()
                for _ in range(3):
                    async with client.ws_connect(lb.url + "/ws") as ws:
                        hello = await ws.receive_str()
                        assert hello == f"hello from {http_name}"
        # a fresh client's first contact is a WebSocket: the 101 carries the cookie
        async with client_session() as client:
            ws = await client.ws_connect(lb.url + "/ws")
            hello = await ws.receive_str()
            # The 101's Set-Cookie went into the client's jar, as any answer's does.
            assert [c.key for c in client.cookie_jar] == ["X-Backend-ID"]
            await ws.close()
            async with client.get(lb.url + "/") as resp:
                assert hello == f"hello from {await resp.text()}"


async def test_text_binary_ping_pong_relay():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws", autoping=False) as ws:
                assert await ws.receive_str() == "hello from a"
                await ws.send_str("hi")
                assert await ws.receive_str() == "a:hi"
                await ws.send_bytes(b"\x00\x01\x02abc")
                assert await ws.receive_bytes() == b"cba\x02\x01\x00"
                big = "z" * (2 * 1024 * 1024)
                await ws.send_str(big)
                assert await ws.receive_str() == "a:" + big
                await ws.ping(b"are-you-there")
                msg = await ws.receive()
                assert msg.type is WSMsgType.PONG
                assert msg.data == b"are-you-there"


async def test_backend_close_code_and_reason_reach_the_client():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws") as ws:
                await ws.receive_str()
                await ws.send_str("close:4001:custom reason")
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 4001
                assert msg.extra == "custom reason"
        pool = lb.balancer.pool
        await until(lambda: pool.backends[0].active == 0, limit=5)


async def test_client_close_code_reaches_the_backend():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            ws = await client.ws_connect(lb.url + "/ws")
            await ws.receive_str()
            await ws.close(code=4321, message=b"bye")
        await until(lambda: servers[0].knobs.ws_close_code is not None, limit=5)
        assert servers[0].knobs.ws_close_code == 4321


async def test_subprotocol_is_negotiated_with_the_backend():
    async with backends("a") as servers, balancer(lb_config(*servers)) as lb:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws", protocols=("chat.v1", "x")) as ws:
                assert ws.protocol == "chat.v1"
                assert await ws.receive_str() == "hello from a"
            async with client.ws_connect(lb.url + "/ws", protocols=("nothing",)) as ws:
                assert ws.protocol is None


async def test_refused_upgrade_gives_502_before_the_handshake():
    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="no websockets here")

    app = web.Application()
    app.router.add_get("/ws", plain)
    app.router.add_get("/", plain)
    server = await start_app(app, handle_signals=False)
    config = {"port": 0, "backends": [{"id": "p", "url": server.url}], "health": QUIET_HEALTH}
    try:
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            try:
                await client.ws_connect(lb.url + "/ws")
                raise AssertionError("the handshake should have failed")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 502
    finally:
        await server.stop()


async def test_unreachable_backend_upgrade_is_retried_on_another():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with backends("live") as servers:
        config = {
            "port": 0,
            "strategy": "round-robin",
            "backends": [
                {"id": "dead", "url": f"http://127.0.0.1:{dead_port}", "weight": 100},
                {"id": "live", "url": servers[0].url},
            ],
            "health": {"enabled": False},
        }
        async with balancer(config) as lb, client_session() as client:
            async with client.ws_connect(lb.url + "/ws") as ws:
                assert await ws.receive_str() == "hello from live"
            async with client.get(lb.url + "/") as resp:
                assert await resp.text() == "live"  # pinned to where the retry landed


async def test_message_size_limit_closes_with_1009():
    async with backends("a") as servers:
        config = lb_config(*servers, websocket={"maxMessageSize": 1024})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws") as ws:
                await ws.receive_str()
                await ws.send_str("x" * 4096)
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 1009


async def test_idle_websocket_is_closed_after_the_idle_timeout():
    async with backends("a") as servers:
        config = lb_config(*servers, timeouts={"websocketIdle": 400})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.ws_connect(lb.url + "/ws") as ws:
                await ws.receive_str()
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 1001
