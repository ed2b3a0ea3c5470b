"""The answer when no backend can take a request (node-harmony's ``unavailable``).

By default a JSON 503 (``{"error": "No healthy backends available."}``, the Node package's);
``unavailable.body`` makes it a fixed body of your own. ``unavailable.handler`` is a Python
callable that receives an aiohttp ``web.Request`` and returns a response or a string; the
request pipeline reaches it as an in-process aiohttp application, like the admin endpoints.
"""

from __future__ import annotations

import inspect

from aiohttp import web

from .config import UnavailableConfig
from .core.errors import NoBackendAvailable
from .wire.http1 import Answer


def fixed_answer(config: UnavailableConfig | None) -> Answer:
    if config is None:
        return Answer.of(NoBackendAvailable())
    body = config.body if config.body is not None else NoBackendAvailable.public_message
    return Answer(config.status, config.content_type.encode(), body.encode())


class UnavailableHandler:
    """Calls ``unavailable.handler`` for every request it is given."""

    def __init__(self, config: UnavailableConfig) -> None:
        assert config.handler is not None
        self._config = config
        self._handler = config.handler

    async def answer(self, request: web.Request) -> web.StreamResponse:
        result = self._handler(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, web.StreamResponse):
            return result
        return web.Response(
            status=self._config.status,
            text=str(result),
            content_type=self._config.content_type.split(";")[0],
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app
