"""Embedding stickylb in your own aiohttp application, with a Python health check.

python -m examples.launch -n 2 &      # backends on 5001 and 5002
python -m examples.embed              # your app on 3001: /local/* here, the rest balanced
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from stickylb import build_config, handler_args, install


async def reports_ok(backend: Any, session: aiohttp.ClientSession) -> bool:
    """A check written in Python and passed as an object, not as an import path."""
    async with session.get(backend.url + "/health") as response:
        return response.status == 200 and (await response.json())["status"] == "ok"


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong from the embedding app\n")


def make_app(ports: tuple[int, ...] = (5001, 5002), port: int = 3001) -> web.Application:
    config = build_config(
        {
            "port": port,
            "health": {"check": reports_ok, "interval": "2s"},
            "backends": [
                {"id": f"backend-{i + 1}", "url": f"http://127.0.0.1:{p}"}
                for i, p in enumerate(ports)
            ],
        }
    )
    app = web.Application(handler_args=handler_args(config))
    app.router.add_get("/local/ping", ping)  # routes added first keep priority
    install(app, config)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=3001, handler_cancellation=True)
