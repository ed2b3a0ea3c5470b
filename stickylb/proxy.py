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
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

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
from .streaming import read_piece
from .upstream import IDEMPOTENT_METHODS, Upstream, UpstreamResponse, describe_client_error

log = logging.getLogger("stickylb.proxy")

# aiohttp's server has already answered "100 Continue" to the client by the time we forward.
DROP_REQUEST_HEADERS = frozenset({"expect"})
BACKEND_ID_HEADER = "x-backend-id"
NO_BODY = frozenset({204, 304})  # statuses whose answers never carry a body
# What reading a backend's body can raise once its answer has started.
MID_RESPONSE_ERRORS = (TimeoutError, aiohttp.ClientError, HttpProcessingError, OSError)


class Incoming(NamedTuple):
    """What the proxy needs of a client's request, whichever server parsed it (aiohttp's or
    ``front.py``'s)."""

    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    peer: str | None
    scheme: str

    @classmethod
    def of(cls, request: web.BaseRequest) -> Incoming:
        return cls(
            request.method, request.raw_path, request.headers, request.remote, request.scheme
        )


class Forwarding:
    """What both relays (HTTP and WebSocket) do around a request: read the pin, build the
    upstream headers, and mark the answer with the pin and the backend's id."""

    def __init__(self, config: Config, cookie: StickyCookie) -> None:
        self._cookie = cookie
        self._sticky = config.sticky
        self._backend_header = config.backend_header
        self._preserve_host = config.preserve_host
        self._trusted = parse_networks(config.trusted_proxies)

    def token(self, headers: CIMultiDictProxy[str]) -> str | None:
        return self._cookie.read(headers.get(hdrs.COOKIE)) if self._sticky else None

    def upstream_headers(
        self, incoming: Incoming, backend: Backend, drop: frozenset[str]
    ) -> CIMultiDict[str]:
        return upstream_headers(
            incoming.headers,
            peer=incoming.peer,
            scheme=incoming.scheme,
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


class Answer(NamedTuple):
    """A complete answer of our own (errors, "unavailable"), for either server."""

    status: int
    content_type: str
    body: bytes

    @classmethod
    def error(cls, error: StickyLBError) -> Answer:
        body = json.dumps({"error": error.public_message}).encode()
        return cls(error.status, "application/json; charset=utf-8", body)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, headers={hdrs.CONTENT_TYPE: self.content_type}
        )


def error_response(error: StickyLBError) -> web.Response:
    return Answer.error(error).response()


class Unavailable:
    """The answer when no backend can take a request: JSON 503 unless ``unavailable`` is set."""

    def __init__(self, config: UnavailableConfig | None) -> None:
        self._config = config
        self.has_handler = config is not None and config.handler is not None
        if config is None:
            self.fixed = Answer.error(NoBackendAvailable())
        else:
            body = config.body if config.body is not None else NoBackendAvailable.public_message
            self.fixed = Answer(config.status, config.content_type, body.encode())

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        config = self._config
        if config is None or config.handler is None:
            return self.fixed.response()
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


class RequestBody:
    """The client's body, streamed at most once; remembers whether any of it was read."""

    __slots__ = ("_content", "limit", "started", "too_large")

    def __init__(self, content: StreamReader, limit: int | None) -> None:
        self._content = content
        self.limit = limit
        self.started = False
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        received = 0
        while chunk := await read_piece(self._content):
            received += len(chunk)
            if self.limit is not None and received > self.limit:
                self.too_large = True
                raise RequestTooLarge()
            yield chunk


class Exchange:
    """A request a backend has answered: ``end()`` once its answer is relayed (or abandoned)."""

    __slots__ = ("_pool", "choice", "response")

    def __init__(self, pool: Pool, choice: Choice, response: UpstreamResponse) -> None:
        self._pool = pool
        self.choice = choice
        self.response = response

    def end(self) -> None:
        self.response.release()
        self._pool.release(self.choice.backend)


class HttpProxy:
    """Forwards plain HTTP requests; hands WebSocket upgrades to ``websocket_relay``.

    ``handle`` serves aiohttp's requests (``app.py``); ``front.py`` serves the common requests
    of ``python -m stickylb`` itself, sharing ``admit`` and ``send`` with it.
    """

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
        self.forwarding = forwarding
        self.admission = admission
        self.unavailable = Unavailable(config.unavailable)
        self._upstream = upstream
        self._relay_websocket = websocket_relay
        self._retries = config.retries
        self.max_body = config.limits.max_body_size
        self._connect_timeout = config.timeouts.connect
        self._read_timeout = config.timeouts.read

    def choose_now(self, token: str | None) -> Choice | None:
        """The backend when nobody has to wait for one; None: ask ``choose``, which may wait."""
        pinned = self._pool.pinned(token)
        if pinned is not None and pinned.full:
            return None
        return self._pool.choose(token)

    async def choose(self, token: str | None) -> Choice | None:
        """The sticky or balanced backend; waits in the queue while the right ones are full."""
        pinned = self._pool.pinned(token)
        if pinned is not None and pinned.healthy and pinned.full and pinned.config.max_connections:
            # Keep the client's session: wait for a slot on its own backend (maxConnections 0
            # means out of service, so those clients are re-balanced instead).
            if await self.admission.wait_until(lambda: pinned.available, pinned.key):
                return Choice(pinned, repinned=False)
            return None
        choice = self._pool.choose(token)
        if choice is None and any(b.healthy for b in self._pool.backends):
            await self.admission.wait_until(lambda: self._pool.choose(token) is not None, "any")
            choice = self._pool.choose(token)
        return choice

    async def admit(self, headers: CIMultiDictProxy[str]) -> Choice | None:
        """A global slot and a backend for a request, waiting in the queue if need be. None
        (holding nothing) means the unavailable answer; otherwise ``admission.leave()`` when
        the request is done. Nothing awaits in the usual case: a free slot, nobody queued."""
        if not (self.admission.try_enter() or await self.admission.enter()):
            return None
        token = self.forwarding.token(headers)
        try:
            choice = self.choose_now(token) or await self.choose(token)
        except BaseException:
            self.admission.leave()
            raise
        if choice is None:
            self.admission.leave()
        return choice

    async def handle(self, request: web.Request) -> web.StreamResponse:
        choice = await self.admit(request.headers)
        if choice is None:
            return await self.unavailable(request)
        try:
            if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
                return await self._relay_websocket(request, choice)  # type: ignore[no-any-return]
            return await self._proxy(request, choice)
        finally:
            self.admission.leave()

    async def _proxy(self, request: web.Request, choice: Choice) -> web.StreamResponse:
        target = origin_form(request.raw_path)
        if target is None:
            return web.json_response({"error": "Bad request target."}, status=400)
        if self.max_body is not None and (request.content_length or 0) > self.max_body:
            return error_response(RequestTooLarge())
        body = RequestBody(request.content, self.max_body) if request.body_exists else None
        try:
            exchange = await self.send(Incoming.of(request), target, choice, body)
        except StickyLBError as exc:
            return error_response(exc)
        try:
            return await self._relay_response(request, exchange)
        finally:
            exchange.end()

    async def send(
        self, incoming: Incoming, target: str, choice: Choice, body: RequestBody | None
    ) -> Exchange:
        """Send the request to ``choice``'s backend, retrying on others where that is safe.

        Raises the ``StickyLBError`` to answer with when no backend answered (already logged).
        """
        tried: tuple[Backend, ...] = ()
        while True:
            backend = choice.backend
            self._pool.acquire(backend)
            try:
                headers = self.forwarding.upstream_headers(incoming, backend, DROP_REQUEST_HEADERS)
                chunks = body.chunks() if body is not None else None
                response = await self._upstream().request(
                    backend, incoming.method, target, headers, chunks
                )
                return Exchange(self._pool, choice, response)
            except UpstreamError as exc:
                self._pool.release(backend)
                if body is not None and body.too_large:
                    raise RequestTooLarge() from None
                self._pool.record_passive_failure(backend, exc.reason)
                tried += (backend,)
                retry = self._retry_choice(incoming.method, body, exc, tried)
                if retry is None:
                    log.warning(
                        "%s %s -> backend %s failed: %s",
                        incoming.method,
                        target,
                        backend.id,
                        exc.reason,
                    )
                    raise
                log.info(
                    "%s %s -> backend %s failed (%s); retrying on backend %s",
                    incoming.method,
                    target,
                    backend.id,
                    exc.reason,
                    retry.backend.id,
                )
                choice = retry
            except BaseException:
                self._pool.release(backend)
                raise

    def _retry_choice(
        self,
        method: str,
        body: RequestBody | None,
        exc: UpstreamError,
        tried: tuple[Backend, ...],
    ) -> Choice | None:
        if len(tried) > self._retries or isinstance(exc, UpstreamTimeout):
            return None
        if body is not None and body.started:  # the client's bytes are gone; nothing to resend
            return None
        if exc.request_sent and method not in IDEMPOTENT_METHODS:
            return None
        choice = self._pool.choose(None, exclude=tried)
        return None if choice is None else Choice(choice.backend, repinned=True)

    def failed_mid_response(
        self, exc: BaseException, method: str, target: str, backend: Backend
    ) -> None:
        reason = describe_client_error(exc, self._connect_timeout, self._read_timeout)
        log.warning(
            "%s %s: backend %s failed mid-response: %s", method, target, backend.id, reason.reason
        )

    async def _relay_response(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        upstream = exchange.response
        headers = downstream_headers(upstream.headers)
        self.forwarding.mark(headers, exchange.choice)
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
                    chunk = await read_piece(reader)
                except MID_RESPONSE_ERRORS as exc:
                    self.failed_mid_response(
                        exc, request.method, request.path, exchange.choice.backend
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
