"""The balancer's own endpoints under ``admin.prefix`` (``/_lb`` by default), as an aiohttp app.

``GET /_lb/health`` answers with the JSON of smart-stick-loadbalancer, extended with each
backend's state details; ``/_lb/backends`` is the runtime API (reads, and writes carried out by
``control.py``). Reads are limited to ``admin.allow`` networks (the forwarded client when the
peer is a trusted proxy) or a bearer ``admin.token``; anyone else gets a 404, as if the path did
not exist. Writes need the token, compared in constant time; without one configured they do not
exist. Nothing under the prefix is ever proxied, and no header value or secret is ever part of
an answer.

The endpoints are an ordinary ``web.Application``. ``python -m stickylb`` serves it in-process
through aiohttp's public API: the request pipeline checks read access, then sends the request
to the app's ``web.Server`` over a socket pair (``wire.backend.socketpair_opener``), exactly as
it would to a backend, with the path moved under a fixed prefix (so ``admin.prefix`` may change
on a reload). An embedding application gets the same routes added to it (``install``), and then
the routes check access themselves.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from .config import Config
from .control import DEFAULT_REMOVE_TIMEOUT, ControlError
from .core.headers import original_client, parse_networks, peer_in
from .core.pool import Backend
from .durations import iso, parse_duration
from .events import sse
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import exposition, registry_for
from .pipeline import INTERNAL_ADMIN_PREFIX

if TYPE_CHECKING:
    from .app import Balancer

log = logging.getLogger("stickylb.control")

DEFAULT_WAIT = 30.0
KEEPALIVE_COMMENT = 15.0  # seconds of silence on an event stream before a comment line
DASHBOARD = Path(__file__).with_name("dashboard.html")
MAX_WAIT = 3600.0


def backend_status(backend: Backend, active: int | None = None) -> dict[str, Any]:
    """One backend as ``/_lb/health`` and ``/_lb/backends`` show it (``active``: the whole
    process group's count, when it differs from this process's)."""
    tracker = backend.tracker
    status = {
        "id": backend.id,
        "url": backend.config.url,
        "healthy": backend.healthy,
        "state": "up" if backend.healthy else "down",
        "adminState": backend.admin_state,
        "weight": _number(backend.weight),
        "configWeight": _number(backend.config.weight),
        "source": backend.source,
        "requests": backend.requests,
        "activeConnections": backend.active if active is None else active,
        "maxConnections": backend.config.max_connections,
        "lastChecked": iso(backend.last_checked),
        "lastChange": iso(backend.last_change),
        "lastFailureReason": tracker.last_reason,
        "lastFailureAt": iso(backend.last_failure),
        "consecutiveSuccesses": tracker.successes,
        "consecutiveFailures": tracker.failures,
        "healthCheck": backend.health.public(),
    }
    if backend.weight_override is not None:
        status["apiWeight"] = _number(backend.weight_override)
    if backend.expires_at is not None:
        status["expiresAt"] = iso(backend.expires_at)
    if backend.removing:
        status["removing"] = True
    return status


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 3)


class AdminAccess:
    """Who may read the endpoints: a client in ``admin.allow`` (seen through ``trustedProxies``
    when it comes through one), or one with the bearer ``admin.token``. Writes need the token."""

    def __init__(self, config: Config) -> None:
        self._allow = parse_networks(config.admin.allow)
        self.trusted = parse_networks(config.trusted_proxies)
        token = config.admin.token
        self._token = f"Bearer {token.get_secret_value()}".encode() if token else None

    @property
    def writes_enabled(self) -> bool:
        return self._token is not None

    def client(self, peer: str | None, forwarded_for: Iterable[bytes | str] = ()) -> str | None:
        return original_client(peer, forwarded_for, self.trusted)

    def __call__(
        self,
        peer: str | None,
        authorization: bytes | str | None,
        forwarded_for: Iterable[bytes | str] = (),
    ) -> bool:
        if peer_in(self.client(peer, forwarded_for), self._allow):
            return True
        return self.token_ok(authorization)

    def token_ok(self, authorization: bytes | str | None) -> bool:
        """The bearer token, compared in constant time."""
        if self._token is None or authorization is None:
            return False
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(authorization, self._token)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NO_STORE = {"Cache-Control": "no-store"}
WAIT_HEARTBEAT = 5.0  # seconds between the blanks a long ?wait= sends to keep its client


def error(status: int, problems: list[str], **headers: str) -> web.Response:
    return web.json_response(
        {"error": "\n".join(problems), "problems": problems},
        status=status,
        headers={**NO_STORE, **headers},
    )


class AdminEndpoints:
    """The endpoints, reading the balancer's current config and state at every request."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer
        self._internal: web.Application | None = None  # the app the pipeline reaches
        self._registry: CollectorRegistry | None = None

    def routes(self, app: web.Application, prefix: str, *, check_access: bool) -> None:
        """Add the endpoints under ``prefix`` to ``app``; ``check_access`` when nothing in
        front checked it (embedding)."""
        read = self._guarded if check_access else _unguarded
        router = app.router
        router.add_get(f"{prefix}/health", read(self.health), allow_head=True)
        router.add_get(f"{prefix}/", read(self.dashboard), allow_head=True)
        router.add_get(prefix, read(self.to_dashboard), allow_head=True)
        router.add_get(f"{prefix}/events", read(self.events))
        router.add_get(f"{prefix}/metrics", read(self.metrics), allow_head=True)
        router.add_get(f"{prefix}/backends", read(self.backends), allow_head=True)
        router.add_get(f"{prefix}/backends/{{id}}", read(self.backend), allow_head=True)
        write = self._writing
        router.add_post(f"{prefix}/backends/{{id}}/state", write(self.set_state))
        router.add_post(f"{prefix}/backends/{{id}}/weight", write(self.set_weight))
        router.add_put(f"{prefix}/backends/{{id}}", write(self.put_backend))
        router.add_delete(f"{prefix}/backends/{{id}}", write(self.delete_backend))
        router.add_post(f"{prefix}/reload", write(self.reload))
        router.add_route("*", f"{prefix}/{{tail:.*}}", self.not_found)

    def app(self) -> web.Application:
        """The endpoints alone, for the request pipeline (which has checked read access)."""
        app = self._internal = web.Application()
        self.routes(app, INTERNAL_ADMIN_PREFIX.decode(), check_access=False)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    # --- access ---------------------------------------------------------------------------

    def client(self, request: web.Request) -> str:
        """The client's address, for the log of changes."""
        access = self._balancer.access
        forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, [])
        if request.app is not self._internal:  # embedded: aiohttp saw the peer itself
            return access.client(request.remote, forwarded) or "?"
        # Through the pipeline: the last address of the chain is the peer it saw.
        chain = [part.strip() for value in forwarded for part in value.split(",")]
        if not chain:
            return "?"
        return access.client(chain[-1], chain[:-1]) or "?"

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            access = self._balancer.access
            forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, [])
            if not access(request.remote, request.headers.get(hdrs.AUTHORIZATION), forwarded):
                return await self.not_found(request)
            return await handler(request)

        return guarded

    def _writing(self, handler: Handler) -> Handler:
        """Writes need the bearer token, wherever the request comes from."""

        async def write(request: web.Request) -> web.StreamResponse:
            access = self._balancer.access
            if not access.writes_enabled:  # no token configured: writes do not exist
                return await self.not_found(request)
            if not access.token_ok(request.headers.get(hdrs.AUTHORIZATION)):
                log.warning(
                    "refused %s %s from %s: missing or wrong admin token",
                    request.method,
                    request.path,
                    self.client(request),
                )
                return error(
                    401, ["a valid admin token is required"], **{"WWW-Authenticate": "Bearer"}
                )
            store_ok = self._balancer.control.store_ok
            if store_ok is not None and not store_ok():  # a change now would diverge
                return error(503, ["cluster store unavailable"])
            return await handler(request)

        return write

    # --- reads ------------------------------------------------------------------------------

    def status(self, backend: Backend) -> dict[str, Any]:
        return backend_status(backend, self._balancer.control.active(backend))

    async def health(self, request: web.Request) -> web.StreamResponse:
        balancer = self._balancer
        healthy, unhealthy = balancer.pool.counts()
        payload = {
            "timestamp": iso(datetime.now(UTC).timestamp()),
            "strategy": balancer.config.strategy,
            "total": len(balancer.pool.backends),
            "healthy": healthy,
            "unhealthy": unhealthy,
            "backends": [self.status(backend) for backend in balancer.pool.backends],
            **(balancer.cluster.public() if balancer.cluster is not None else {}),
            "affinity": {
                **balancer.sources.public(balancer.stats),
                "results": balancer.stats.affinity_results(),
            },
        }
        return web.json_response(payload, headers=NO_STORE)

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        page = DASHBOARD.read_bytes()
        return web.Response(
            body=page,
            headers={
                **NO_STORE,
                "Content-Type": "text/html; charset=utf-8",
                # Everything it needs is inline or ours: nothing from elsewhere may run.
                "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline';"
                " script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
                "X-Frame-Options": "DENY",
            },
        )

    async def to_dashboard(self, request: web.Request) -> web.StreamResponse:
        # The page reaches the API by relative URLs: it must be read at "prefix/".
        location = self._balancer.config.admin.prefix + "/"
        return web.Response(status=308, headers={"Location": location, **NO_STORE})

    async def events(self, request: web.Request) -> web.StreamResponse:
        hub = self._balancer.events
        queue = hub.subscribe()
        response = web.StreamResponse(
            headers={**NO_STORE, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        try:
            await response.prepare(request)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_COMMENT)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                await response.write(sse(event))
        except ConnectionError:
            pass  # the reader left
        finally:
            hub.unsubscribe(queue)
        return response

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        if self._registry is None:
            self._registry = registry_for(self._balancer)
        body = exposition(self._registry)
        return web.Response(body=body, headers={**NO_STORE, "Content-Type": METRICS_TYPE})

    async def backends(self, request: web.Request) -> web.StreamResponse:
        pool = self._balancer.pool
        return web.json_response(
            {"backends": [self.status(backend) for backend in pool.backends]}, headers=NO_STORE
        )

    async def backend(self, request: web.Request) -> web.StreamResponse:
        backend = self._balancer.pool.find(request.match_info["id"])
        if backend is None:
            return error(404, [f"no backend with id {request.match_info['id'][:100]!r}"])
        wait = request.query.get("wait")
        if wait is None:
            return web.json_response(self.status(backend), headers=NO_STORE)
        if wait != "drained":
            return error(400, ["wait: the only value is 'drained'"])
        try:
            timeout = query_duration(request.query.get("timeout"), DEFAULT_WAIT)
        except ValueError as exc:
            return error(400, [f"timeout: {exc}"])
        return await self._wait_drained(request, backend, timeout)

    async def _wait_drained(
        self, request: web.Request, backend: Backend, within: float
    ) -> web.StreamResponse:
        """Answer once nothing is active on ``backend`` or ``within`` passed (both 200). A
        long wait sends a blank now and then (JSON allows it) so no idle timeout on the way
        cuts it."""
        control = self._balancer.control
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        response: web.StreamResponse | None = None
        drained = control.active(backend) == 0
        while not drained and loop.time() < deadline:
            step = min(WAIT_HEARTBEAT, deadline - loop.time())
            drained = await control.wait_drained(backend, step)
            if not drained and loop.time() < deadline:
                if response is None:
                    response = web.StreamResponse(headers=NO_STORE)
                    response.content_type = "application/json"
                    await response.prepare(request)
                await response.write(b" ")
        body = {**self.status(backend), "drained": drained}
        if response is None:
            return web.json_response(body, headers=NO_STORE)
        await response.write(json.dumps(body).encode())
        await response.write_eof()
        return response

    # --- writes -----------------------------------------------------------------------------

    async def _run(
        self, request: web.Request, op: dict[str, Any], status: int = 200
    ) -> web.Response:
        try:
            answer = await self._balancer.control.execute(op, by=self.client(request))
        except ControlError as exc:
            return error(exc.status, exc.problems)
        if op["op"] in ("state", "weight", "put", "delete"):
            backend = self._balancer.pool.find(op["id"])
            if backend is not None:
                answer = {**answer, **self.status(backend)}
        if answer.pop("created", False):
            status = 201
        return web.json_response(answer, status=status, headers=NO_STORE)

    async def set_state(self, request: web.Request) -> web.StreamResponse:
        return await self._set(request, "state", "state: required (ready, drain or maint)")

    async def set_weight(self, request: web.Request) -> web.StreamResponse:
        return await self._set(request, "weight", "weight: required")

    async def _set(self, request: web.Request, field: str, missing: str) -> web.StreamResponse:
        """``{field: value}`` in, the operation of the same name on the backend."""
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        if field not in body:
            return error(400, [missing])
        return await self._run(
            request, {"op": field, "id": request.match_info["id"], field: body[field]}
        )

    async def put_backend(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        ttl = body.pop("ttl", None)
        op = {"op": "put", "id": request.match_info["id"], "backend": body, "ttl": ttl}
        return await self._run(request, op)

    async def delete_backend(self, request: web.Request) -> web.StreamResponse:
        try:
            timeout = query_duration(request.query.get("timeout"), DEFAULT_REMOVE_TIMEOUT)
        except ValueError as exc:
            return error(400, [f"timeout: {exc}"])
        op = {"op": "delete", "id": request.match_info["id"], "timeout": timeout}
        return await self._run(request, op, status=202)

    async def reload(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, {"op": "reload"})

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "Not found."}, status=404)


def _unguarded(handler: Handler) -> Handler:
    return handler


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        return error(400, ["body: not valid JSON"])
    if not isinstance(body, dict):
        return error(400, ["body: must be a JSON object"])
    return body


def query_duration(value: str | None, default: float) -> float:
    """A duration in a query string: "30s", "500ms", "2m"; a bare number is seconds there."""
    if value is None or value == "":
        return default
    if value.replace(".", "", 1).isdigit():
        value += "s"
    seconds = parse_duration(value)
    if seconds > MAX_WAIT:
        raise ValueError(f"at most {MAX_WAIT:g}s")
    return seconds
