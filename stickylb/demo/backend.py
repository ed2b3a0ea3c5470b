"""An example backend: one instance of "your app" behind stickylb.

Run one:   python -m examples.backend --name backend-1 --port 5001
Run many:  python -m examples.launch -n 3

It shows what breaks without sticky sessions: every instance keeps its own in-memory visit
counter per client, its own WebSocket chat room, and can be made unhealthy at runtime:

  GET  /               plain text (or the demo page for browsers): name, port, your visit count
  GET  /whoami         the same as JSON
  GET  /health         200 while healthy, 503 after POST /admin/fail
  GET  /ready          like /health, for readiness-style checks
  GET  /events         server-sent events: a tick every second from this instance
  GET  /ws             WebSocket: echoes, and "/all <text>" broadcasts to this instance's room
  POST /admin/fail     make this instance report unhealthy, answer 503, drop its WebSockets
  POST /admin/recover  make it healthy again
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web

PAGE = Path(__file__).with_name("page.html")
CLIENT_COOKIE = "demo_client"


@dataclass
class Instance:
    name: str
    healthy: bool = True
    visits: dict[str, int] = field(default_factory=dict)
    room: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)


INSTANCE = web.AppKey("instance", Instance)


def _local_port(request: web.Request) -> int:
    """The port this request arrived on (right even when the instance was bound to port 0)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if sockname else 0


def _client_id(request: web.Request) -> tuple[str, bool]:
    existing = request.cookies.get(CLIENT_COOKIE)
    if existing and len(existing) <= 64:
        return existing, False
    return secrets.token_hex(8), True


def _count_visit(request: web.Request) -> tuple[dict[str, object], str | None]:
    instance = request.app[INSTANCE]
    client, is_new = _client_id(request)
    instance.visits[client] = instance.visits.get(client, 0) + 1
    info = {
        "name": instance.name,
        "port": _local_port(request),
        "client": client,
        "visits": instance.visits[client],
    }
    return info, client if is_new else None


def _with_client_cookie(response: web.StreamResponse, new_client: str | None) -> None:
    if new_client:
        response.set_cookie(CLIENT_COOKIE, new_client, httponly=True, samesite="Lax")


@web.middleware
async def failing_mode(request: web.Request, handler):  # type: ignore[no-untyped-def]
    instance = request.app[INSTANCE]
    if not instance.healthy and not request.path.startswith("/admin/"):
        return web.json_response({"name": instance.name, "status": "failing"}, status=503)
    return await handler(request)


async def index(request: web.Request) -> web.StreamResponse:
    if "text/html" in request.headers.get("Accept", "") and PAGE.exists():
        return web.FileResponse(PAGE)
    info, new_client = _count_visit(request)
    response = web.Response(
        text=f"Hello from {info['name']} (port {info['port']}): "
        f"visit {info['visits']} from this client\n"
    )
    _with_client_cookie(response, new_client)
    return response


async def whoami(request: web.Request) -> web.Response:
    info, new_client = _count_visit(request)
    response = web.json_response(info)
    _with_client_cookie(response, new_client)
    return response


async def health(request: web.Request) -> web.Response:
    instance = request.app[INSTANCE]
    return web.json_response({"status": "ok", "name": instance.name})


async def events(request: web.Request) -> web.StreamResponse:
    instance = request.app[INSTANCE]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    count = int(request.query.get("count", "0")) or None
    tick = 0
    while count is None or tick < count:
        tick += 1
        await response.write(
            f"data: {json.dumps({'name': instance.name, 'tick': tick})}\n\n".encode()
        )
        await asyncio.sleep(float(request.query.get("every", "1")))
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    instance = request.app[INSTANCE]
    ws = web.WebSocketResponse(protocols=("demo.v1",), heartbeat=30)
    await ws.prepare(request)
    instance.room.add(ws)
    await ws.send_json(
        {
            "type": "hello",
            "name": instance.name,
            "port": _local_port(request),
            "room": len(instance.room),
        }
    )
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data.startswith("/all "):
                payload = {"type": "broadcast", "name": instance.name, "text": message.data[5:]}
                for peer in list(instance.room):
                    if not peer.closed:
                        await peer.send_json(payload)
            else:
                await ws.send_json({"type": "echo", "name": instance.name, "text": message.data})
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    instance.room.discard(ws)
    return ws


async def fail(request: web.Request) -> web.Response:
    instance = request.app[INSTANCE]
    instance.healthy = False
    # A failing instance drops its WebSockets too, so clients reconnect (and land elsewhere).
    for peer in list(instance.room):
        await peer.close(code=1001, message=b"instance failing")
    return web.json_response({"name": instance.name, "healthy": False})


async def recover(request: web.Request) -> web.Response:
    request.app[INSTANCE].healthy = True
    return web.json_response({"name": request.app[INSTANCE].name, "healthy": True})


def make_app(name: str) -> web.Application:
    app = web.Application(middlewares=[failing_mode])
    app[INSTANCE] = Instance(name=name)
    app.router.add_get("/", index)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", health)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", websocket)
    app.router.add_post("/admin/fail", fail)
    app.router.add_post("/admin/recover", recover)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{args.name} listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(make_app(args.name), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
