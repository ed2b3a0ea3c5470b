"""Theory of operation: one HTTP request through the proxy (the hot path).

``HttpProxy.handle`` reads the sticky token, asks the pool for a backend, sends the request with
its body streamed (``upstream.py``), and streams the answer back. Bodies are never buffered:
each chunk is written as it arrives (so server-sent events flush), and flow control bounds
memory both ways. An answer whose whole body has already arrived with its head (only possible
for small ones: reading pauses at the reader's high-water mark) is sent in one write. Nothing
is decompressed, redirects are never followed, and no cookies are kept.

Failures before the backend answered map to the exception tree in ``errors.py``. A request whose
bytes never reached the backend is retried on another backend (any method); one that was sent is
retried only when its method is idempotent and it had no body already consumed. A failure after
the response started cannot change the status any more: the client connection is closed so the
truncation is visible instead of looking like a complete answer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from .admission import Admission
from .affinity import StickyCookie
from .config import Config, UnavailableConfig
from .errors import (
    NoBackendAvailable,
    RequestTooLarge,
    StickyLBError,
    UpstreamError,
    UpstreamTimeout,
)
from .headers import downstream_headers, origin_form, parse_networks, upstream_headers
from .pool import Backend, Choice, Pool
from .upstream import IDEMPOTENT_METHODS, Upstream, UpstreamResponse, describe_client_error

log = logging.getLogger("stickylb.proxy")

# aiohttp's server has already answered "100 Continue" to the client by the time we forward.
DROP_REQUEST_HEADERS = frozenset({"expect"})
BACKEND_ID_HEADER = "x-backend-id"
NO_BODY = frozenset({204, 304})  # statuses whose answers never carry a body


class Forwarding:
    """What both relays (HTTP and WebSocket) do around a request: read the pin, build the
    upstream headers, and mark the answer with the pin and the backend's id."""

    def __init__(self, config: Config, cookie: StickyCookie) -> None:
        self._cookie = cookie
        self._sticky = config.sticky
        self._backend_header = config.backend_header
        self._preserve_host = config.preserve_host
        self._trusted = parse_networks(config.trusted_proxies)

    def token(self, request: web.Request) -> str | None:
        return self._cookie.read(request.headers.get(hdrs.COOKIE)) if self._sticky else None

    def upstream_headers(
        self, request: web.Request, backend: Backend, drop: frozenset[str]
    ) -> CIMultiDict[str]:
        return upstream_headers(
            request.headers,
            peer=request.remote,
            scheme=request.scheme,
            backend_host=backend.host_header,
            preserve_host=self._preserve_host,
            trusted_proxies=self._trusted,
            drop=drop,
        )

    def mark(self, headers: CIMultiDict[str], choice: Choice) -> None:
        """Add our Set-Cookie (when the client is newly pinned) and ``x-backend-id``."""
        if choice.repinned and self._sticky:
            headers.add(hdrs.SET_COOKIE, self._cookie.set_cookie_header(choice.backend.token))
        if self._backend_header:
            headers[BACKEND_ID_HEADER] = str(choice.backend.id)


def error_response(error: StickyLBError) -> web.Response:
    return web.json_response({"error": error.public_message}, status=error.status)


class Unavailable:
    """The answer when no backend can take a request: JSON 503 unless ``unavailable`` is set."""

    def __init__(self, config: UnavailableConfig | None) -> None:
        self._config = config

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        config = self._config
        if config is None:
            return error_response(NoBackendAvailable())
        if config.handler is not None:
            result = config.handler(request)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, web.StreamResponse):
                return result
            return web.Response(
                status=config.status,
                text=str(result),
                content_type=config.content_type.split(";")[0],
            )
        body = config.body if config.body is not None else NoBackendAvailable.public_message
        return web.Response(
            status=config.status,
            body=body.encode(),
            headers={hdrs.CONTENT_TYPE: config.content_type},
        )


class RequestBody:
    """The client's body, streamed at most once; remembers whether any of it was read."""

    __slots__ = ("_request", "limit", "started", "too_large")

    def __init__(self, request: web.Request, limit: int | None) -> None:
        self._request = request
        self.limit = limit
        self.started = False
        self.too_large = False

    @property
    def present(self) -> bool:
        return self._request.body_exists

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        received = 0
        async for chunk in self._request.content.iter_any():
            received += len(chunk)
            if self.limit is not None and received > self.limit:
                self.too_large = True
                raise RequestTooLarge()
            yield chunk


class HttpProxy:
    """Forwards plain HTTP requests; hands WebSocket upgrades to ``websocket_relay``."""

    def __init__(
        self,
        config: Config,
        pool: Pool,
        forwarding: Forwarding,
        upstream: Callable[[], Upstream],
        websocket_relay: Callable[[web.Request, Choice], Any],
        admission: Admission,
    ) -> None:
        self._pool = pool
        self._forwarding = forwarding
        self._admission = admission
        self.unavailable = Unavailable(config.unavailable)
        self._upstream = upstream
        self._relay_websocket = websocket_relay
        self._retries = config.retries
        self._max_body = config.limits.max_body_size
        self._connect_timeout = config.timeouts.connect
        self._read_timeout = config.timeouts.read

    async def choose(self, request: web.Request) -> Choice | None:
        """The sticky or balanced backend; waits in the queue while the right ones are full."""
        token = self._forwarding.token(request)
        pinned = self._pool.pinned(token)
        if pinned is not None and pinned.healthy and pinned.full and pinned.config.max_connections:
            # Keep the client's session: wait for a slot on its own backend (maxConnections 0
            # means out of service, so those clients are re-balanced instead).
            if await self._admission.wait_until(lambda: pinned.available, pinned.key):
                return Choice(pinned, repinned=False)
            return None
        choice = self._pool.choose(token)
        if choice is None and any(b.healthy for b in self._pool.backends):
            await self._admission.wait_until(lambda: self._pool.choose(token) is not None, "any")
            choice = self._pool.choose(token)
        return choice

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not await self._admission.enter():
            return await self.unavailable(request)
        try:
            choice = await self.choose(request)
            if choice is None:
                return await self.unavailable(request)
            if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
                return await self._relay_websocket(request, choice)  # type: ignore[no-any-return]
            return await self._proxy(request, choice)
        finally:
            self._admission.leave()

    async def _proxy(self, request: web.Request, choice: Choice) -> web.StreamResponse:
        target = origin_form(request.raw_path)
        if target is None:
            return web.json_response({"error": "Bad request target."}, status=400)
        if self._max_body is not None and (request.content_length or 0) > self._max_body:
            return error_response(RequestTooLarge())
        body = RequestBody(request, self._max_body)
        tried: tuple[Backend, ...] = ()
        while True:
            backend = choice.backend
            self._pool.acquire(backend)
            try:
                upstream = await self._send(request, backend, target, body)
                try:
                    return await self._relay_response(request, upstream, choice)
                finally:
                    upstream.release()
            except UpstreamError as exc:
                if body.too_large:
                    return error_response(RequestTooLarge())
                self._pool.record_passive_failure(backend, exc.reason)
                tried += (backend,)
                retry = self._retry_choice(request, body, exc, tried)
                if retry is None:
                    log.warning(
                        "%s %s -> backend %s failed: %s",
                        request.method,
                        request.path,
                        backend.id,
                        exc.reason,
                    )
                    return error_response(exc)
                log.info(
                    "%s %s -> backend %s failed (%s); retrying on backend %s",
                    request.method,
                    request.path,
                    backend.id,
                    exc.reason,
                    retry.backend.id,
                )
                choice = retry
            finally:
                self._pool.release(backend)

    def _retry_choice(
        self,
        request: web.Request,
        body: RequestBody,
        exc: UpstreamError,
        tried: tuple[Backend, ...],
    ) -> Choice | None:
        if len(tried) > self._retries or isinstance(exc, UpstreamTimeout):
            return None
        if body.started:  # the client's bytes are gone; nothing to send again
            return None
        if exc.request_sent and request.method not in IDEMPOTENT_METHODS:
            return None
        choice = self._pool.choose(None, exclude=tried)
        return None if choice is None else Choice(choice.backend, repinned=True)

    async def _send(
        self, request: web.Request, backend: Backend, target: str, body: RequestBody
    ) -> UpstreamResponse:
        headers = self._forwarding.upstream_headers(request, backend, DROP_REQUEST_HEADERS)
        chunks = body.chunks() if body.present else None
        return await self._upstream().request(backend, request.method, target, headers, chunks)

    async def _relay_response(
        self, request: web.Request, upstream: UpstreamResponse, choice: Choice
    ) -> web.StreamResponse:
        headers = downstream_headers(upstream.headers)
        self._forwarding.mark(headers, choice)
        reader = upstream.content
        if reader.is_eof() and request.method != "HEAD" and upstream.status not in NO_BODY:
            # The whole body came with the head (typical for small answers): one write, head
            # and body together, instead of one for the head and one per chunk.
            body = reader.read_nowait()
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=body
            )
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        try:
            await response.prepare(request)
            while True:
                try:
                    chunk = await reader.readany()
                except (TimeoutError, aiohttp.ClientError, HttpProcessingError, OSError) as exc:
                    reason = describe_client_error(exc, self._connect_timeout, self._read_timeout)
                    log.warning(
                        "%s %s: backend %s failed mid-response: %s",
                        request.method,
                        request.path,
                        choice.backend.id,
                        reason.reason,
                    )
                    self._abort_client(request)
                    return response
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # The client went away: drop the upstream connection rather than drain it.
            upstream.close()
            log.debug("%s %s: client disconnected", request.method, request.path)
        return response

    @staticmethod
    def _abort_client(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.close()
