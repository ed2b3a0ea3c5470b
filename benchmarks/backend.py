"""The benchmark backend when nginx is not installed, and always for WebSocket echo.

python -m benchmarks.backend PORT [PORT ...]
"""

from __future__ import annotations

import sys

from aiohttp import WSMsgType, web

TINY = b"ok"
BIG = b"x" * (1024 * 1024)


async def tiny(request: web.Request) -> web.Response:
    return web.Response(body=TINY, content_type="text/plain")


async def big(request: web.Request) -> web.Response:
    return web.Response(body=BIG, content_type="application/octet-stream")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        elif message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/tiny", tiny)  # GET, and POST for the JSON-body row
    app.router.add_get("/big", big)
    app.router.add_get("/health", tiny)
    app.router.add_get("/ws", echo)
    return app


async def serve(ports: list[int]) -> None:
    import asyncio

    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import asyncio

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve([int(p) for p in sys.argv[1:]]))
