"""Theory of operation: one request through the balancer, from its head to the end of its answer.

A ``RequestCycle`` is made for every request a client connection reads (``wire/client.py``) or
an embedding aiohttp application hands over (``embed.py``). It is the only owner of what the
request takes, and releases each in one place: the global ``maxConnections`` slot
(``_finish``), the backend slot (``_release_backend``), the backend connection (``_let_go``).
The hot path reads top to bottom:

1. ``begin``: the target is read; a path under ``admin.prefix`` (any spelling) goes to the
   balancer's own endpoints; otherwise a global slot and a backend are taken (``admit``), at
   once when one is free, else in the queue (``_admit_slowly``, the only task besides a connect).
2. ``_send``: an idle connection to that backend is leased (or one is opened), the request head
   written, and the body streamed as it comes (``request_body``, ``request_end``), after a
   ``100 Continue`` when the client asked for one.
3. ``response_head``, ``response_body``, ``response_end``: the answer is relayed as it arrives,
   with the pin (``Set-Cookie``) and ``x-backend-id`` added; a 101 to a WebSocket handshake
   turns both sockets into a ``Tunnel`` instead (``response_upgrade``).

Failures are typed (``core.errors``). A backend's failure before its answer began is retried on
another backend when that is safe (nothing of the body was sent, and the method is idempotent or
nothing of the request reached the backend), and counts toward its passive failures; one after
the answer began cuts the answer short, so the client sees the truncation. A client's failure
(it left, it stalled, it sent too much) and our own (out of file descriptors) never count
against a backend. A kept connection the backend had closed under us is retried once on a fresh
connection for replayable requests: the usual keep-alive race, nobody's failure.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from time import monotonic
from typing import NamedTuple, Protocol

from .access_log import Details
from .core.admission import Admission
from .core.affinity import StickyCookie
from .core.affinity_sources import Sought, Sources
from .core.errors import (
    BadRequest,
    ClientError,
    LocalResourceError,
    RequestTooLarge,
    StickyLBError,
    UpgradeRefused,
    UpstreamError,
    UpstreamTimeout,
)
from .core.headers import FORWARDING_HEADERS, Forwarding, Header, header_lines, not_forwarded
from .core.pool import MAINT, Backend, Choice, Pool
from .core.stats import AFFINITY_RESULTS, DURATION_BUCKETS, Stats
from .core.targets import AdminPrefix, origin_form, path_of
from .wire.backend import BackendConnection, Connections
from .wire.client import Request
from .wire.deadlines import Sweeper
from .wire.http1 import (
    BODY_METHODS,
    CHUNKED,
    IDEMPOTENT_METHODS,
    LENGTH,
    NO_BODY,
    Answer,
    chunk,
    last_chunk,
    status_line,
)
from .wire.tunnel import GOING_AWAY, Tunnel

log = logging.getLogger("stickylb.proxy")

# Where the admin endpoints' own app serves them, whatever ``admin.prefix`` is (it may change
# on a reload; the app does not).
INTERNAL_ADMIN_PREFIX = b"/_lb"
# Request ids: unique per process (a random prefix) and cheap (a counter).
_ID_PREFIX = os.urandom(6).hex().encode()
_ids = itertools.count(1)
# Indexes of ``Stats.affinity`` (``core.stats.AFFINITY_RESULTS``).
NEW, HIT, REPINNED, INVALID = range(4)
# Body bytes read before a backend connection is ready; past this the client is not read.
PENDING_BODY_LIMIT = 64 * 1024
NOT_FOUND = Answer(404, b"application/json; charset=utf-8", b'{"error": "Not found."}')
# Never copied from a request: "Expect" (answered here) and what the proxy writes itself.
_NOT_COPIED = frozenset({b"expect"}) | FORWARDING_HEADERS


class Client(Protocol):
    """What a cycle needs of the side that sent the request (``wire.client.ClientConnection``
    or ``embed.AiohttpClient``): who it is, and how its answer is written."""

    @property
    def peer(self) -> str | None: ...
    @property
    def peer_bytes(self) -> bytes: ...
    @property
    def scheme(self) -> bytes: ...

    def send_continue(self) -> None: ...
    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def send_head(
        self, status: int, reason: bytes, header_parts: list[bytes], framing: int, length: int
    ) -> None: ...
    def send_body(self, piece: bytes) -> None: ...
    def send_end(self, trailer_parts: list[bytes] | None) -> None: ...
    def send_answer(self, answer: Answer, *, close: bool = False) -> None: ...
    def abort(self) -> None: ...
    def upgrade(self, head: bytes, open_tunnel: Callable[..., None]) -> None: ...
    def tunnel_closed(self) -> None: ...


class Internal:
    """An in-process destination (the admin endpoints, the ``unavailable`` handler): requests
    go to it over ``connections`` exactly as to a backend, but it never fails over, is never
    counted, and its answers carry no pin."""

    def __init__(self, name: str, connections: Connections) -> None:
        self.name = name
        self.connections = connections


class PipelineSettings(NamedTuple):
    """What the pipeline takes from the config (``app.pipeline_settings``)."""

    sticky: bool
    backend_header: bool
    forwarding: Forwarding
    retries: int
    max_body: int | None
    max_message: int | None
    websocket_idle: float
    admin_prefix: str
    admin_allowed: Callable[[str | None, bytes | None, list[bytes]], bool]
    unavailable: Answer
    keep_backend_connections: bool
    request_id_header: str | None = "X-Request-Id"
    sources: Sources | None = None  # affinity.sources, when any are listed
    fail_closed: bool = False  # affinity.onFailure "fail"


class Pipeline:
    """What every request shares, worked out once from the config (and again on a reload)."""

    def __init__(
        self,
        *,
        pool: Pool,
        cookie: StickyCookie,
        admission: Admission,
        sweeper: Sweeper,
        settings: PipelineSettings,
        stats: Stats | None = None,
    ) -> None:
        self.pool = pool
        self.admission = admission
        self.sweeper = sweeper
        self.stats = stats if stats is not None else Stats()
        self.admin_link: Internal | None = None
        self.unavailable_link: Internal | None = None
        self.tunnels: dict[Tunnel, Backend | None] = {}
        self._no_tunnels: asyncio.Future[None] | None = None
        self.on_local_error: Callable[[], None] = lambda: None
        # What a client connection calls for each request it reads.
        self.exchange: Callable[[Client, Request], RequestCycle] = functools.partial(
            RequestCycle, self
        )
        self.configure(cookie, settings)

    def configure(self, cookie: StickyCookie, settings: PipelineSettings) -> None:
        """Take new settings (at start and on every reload); requests in flight keep going."""
        self.cookie = cookie
        self.sticky = settings.sticky
        self.backend_header = settings.backend_header
        self.forwarding = settings.forwarding
        self.retries = settings.retries
        self.max_body = settings.max_body
        self.max_message = settings.max_message
        self.websocket_idle = settings.websocket_idle
        self.admin = AdminPrefix(settings.admin_prefix)
        self.admin_allowed = settings.admin_allowed
        self.unavailable = settings.unavailable
        self.close_backend = b"" if settings.keep_backend_connections else b"Connection: close\r\n"
        name = settings.request_id_header
        self.request_id_name = name.encode() if name else None
        self.request_id_line = name.encode() + b": " if name else b""
        self.request_id_lower = name.lower().encode() if name else b""
        # Never copied from a client, nor from a backend's answer: we write our own. One-argument
        # caches over ``not_forwarded``, since these sets are fixed until the next reload.
        not_copied = _NOT_COPIED | {self.request_id_lower} if name else _NOT_COPIED
        not_returned = frozenset({self.request_id_lower}) if name else frozenset()
        self.request_skip = functools.lru_cache(maxsize=256)(
            lambda connection: not_forwarded(connection, not_copied)
        )
        self.answer_skip = functools.lru_cache(maxsize=256)(
            lambda connection: not_forwarded(connection, not_returned)
        )
        self.has_trusted = settings.forwarding.any_trusted
        self.sources = settings.sources
        self.learns = settings.sources is not None and settings.sources.learned is not None
        self.fail_closed = settings.fail_closed
        for backend in self.pool.backends:
            self.dress(backend)

    def timed_pin(self, backend: Backend, issued: int) -> bytes:
        """The Set-Cookie line of a timed token: made per answer (its times change)."""
        now = int(time.time())
        value = self.cookie.timed_token(backend.token, issued or now, now)
        return b"Set-Cookie: %s\r\n" % self.cookie.set_cookie_header(value).encode()

    def dress(self, backend: Backend) -> None:
        """What ``backend`` adds to its answers: worked out once, not per request."""
        backend.pin = (
            b"Set-Cookie: %s\r\n" % self.cookie.set_cookie_header(backend.token).encode()
            if self.sticky
            else b""
        )
        backend.id_line = (
            b"x-backend-id: %s\r\n" % str(backend.id).encode() if self.backend_header else b""
        )

    def admit(self, token: str | None, sought: Sought | None) -> Choice | None:
        """A global slot and a backend now, when nobody has to wait for one (the usual case).
        None holds nothing; ask ``admit_slowly`` then."""
        if not self.admission.try_enter():
            return None
        pool = self.pool
        held = _held(pool, token, sought)
        choice = None if held is not None and held.full else pool.choose(token, sought=sought)
        if choice is None:
            self.admission.leave()
        return choice

    async def admit_slowly(self, token: str | None, sought: Sought | None) -> Choice | None:
        """A global slot and a backend, waiting in the queue while they are taken. None (holding
        nothing) means the unavailable answer."""
        admission = self.admission
        started = monotonic()
        try:
            if not await admission.enter():
                return None
            try:
                choice = await self._choose(token, sought)
            except BaseException:
                admission.leave()
                raise
        finally:
            self.stats.queue_wait.observe(monotonic() - started)
        if choice is None:
            admission.leave()
        return choice

    async def _choose(self, token: str | None, sought: Sought | None) -> Choice | None:
        pool = self.pool
        pinned = _held(pool, token, sought)
        if (
            pinned is not None
            and pinned.healthy
            and pinned.full
            and pinned.config.max_connections
            and pinned.admin_state != MAINT
        ):
            # Keep the client's session: wait for a slot on its own backend (maxConnections 0
            # means out of service, so those clients are re-balanced instead).
            if await self.admission.wait_until(lambda: pinned.available, pinned.key):
                return Choice(pinned, repinned=token != pinned.token, held=True)
            return None
        choice = pool.choose(token, sought=sought)
        if choice is None and any(b.healthy for b in pool.backends):
            await self.admission.wait_until(lambda: pool.can_choose(token, sought), "any")
            choice = pool.choose(token, sought=sought)
        return choice

    def forwarded_request_id(self, peer: str | None, headers: list[Header]) -> bytes | None:
        """A trusted proxy's id for the request (when sane), to keep instead of a new one."""
        if self.forwarding.trusts(peer):
            wanted = self.request_id_lower
            for lname, _, value in headers:
                if (
                    lname == wanted
                    and 0 < len(value) <= 200
                    and value.isascii()
                    and b" " not in value
                ):
                    return value
        return None

    def close_tunnels(self) -> None:
        for tunnel in list(self.tunnels):
            tunnel.close(GOING_AWAY, "going away")

    def tunnel_gone(self, tunnel: Tunnel) -> None:
        owner = self.tunnels.pop(tunnel, None)
        if owner is not None:
            stats = owner.stats
            stats.tunnels -= 1
            sent, received = tunnel.messages()
            stats.ws_messages_in += sent
            stats.ws_messages_out += received
        if not self.tunnels and self._no_tunnels is not None and not self._no_tunnels.done():
            self._no_tunnels.set_result(None)

    async def tunnels_closed(self) -> None:
        """Until no WebSocket is open (a shutdown waits for this)."""
        if self.tunnels:
            self._no_tunnels = asyncio.get_running_loop().create_future()
            await self._no_tunnels

    def tunnels_of(self, backend: Backend | None = None) -> list[Tunnel]:
        """The open WebSockets on ``backend`` (all of them when None)."""
        return [t for t, owner in self.tunnels.items() if backend is None or owner is backend]

    def close_tunnels_spread(self, tunnels: list[Tunnel], within: float, code: int) -> None:
        """Close ``tunnels`` with ``code`` spread evenly over ``within`` seconds, the first at
        once, so their clients reconnect in a trickle rather than a herd."""
        if not tunnels:
            return
        loop = asyncio.get_running_loop()
        step = within / len(tunnels)
        for index, tunnel in enumerate(tunnels):
            loop.call_later(index * step, tunnel.close, code, "service restart")


class RequestCycle:
    """One request, from its head to the end of its answer (see the module's docstring)."""

    __slots__ = (
        "_admitted",
        "_affinity",
        "_answered",
        "_attached",
        "_backend",
        "_body_received",
        "_body_sent",
        "_choice",
        "_client",
        "_conn",
        "_connections",
        "_ended",
        "_finished",
        "_fresh_retry",
        "_internal",
        "_issued",
        "_p",
        "_refresh",
        "_request",
        "_request_id",
        "_sent",
        "_sought",
        "_started",
        "_target",
        "_task",
        "_token",
        "_tried",
        "_upstream_status",
    )

    def __init__(self, pipeline: Pipeline, client: Client, request: Request) -> None:
        self._p = pipeline
        self._client = client
        self._request = request
        self._target = b""
        self._token: str | None = None
        self._sought: Sought | None = None  # an affinity source's word (no usable cookie)
        self._choice: Choice | None = None
        self._backend: Backend | None = None
        self._internal: Internal | None = None
        self._connections: Connections | None = None
        self._conn: BackendConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._tried: tuple[Backend, ...] = ()
        self._admitted = False
        self._answered = False  # the client has (part of) an answer: no other can follow
        self._finished = False
        self._fresh_retry = False
        self._body_sent = False
        self._body_received = 0
        self._started = monotonic()
        self._sent = 0  # answer body bytes relayed
        self._attached = 0.0  # when the request went to the backend (monotonic)
        self._ended = 0.0  # when the backend's answer ended
        self._upstream_status = 0
        self._affinity = -1
        self._request_id = b""
        self._refresh = False  # a timed cookie to send again with a new "last seen"
        self._issued = 0  # when the client's timed cookie was first issued

    # --- 1. the request ----------------------------------------------------------------------

    def begin(self) -> None:
        request = self._request
        p = self._p
        target: bytes | None = request.target
        if request.target[:1] != b"/":  # absolute-form or worse: rarely
            target = origin_form(request.target)
        if target is None:
            self._refuse(BadRequest("request target is not a path"))
            return
        self._target = target
        if p.admin.matches(target):
            self._serve_admin()
            return
        if p.max_body is not None and request.framing == LENGTH and request.length > p.max_body:
            self._refuse(RequestTooLarge("Content-Length over limits.maxBodySize"))
            return
        for piece in request.pending:
            if not self._count_body(piece):
                return
        if p.sticky and request.cookie is not None:
            if p.cookie.timed:  # signed times in the token: checked, maybe refreshed
                resolved = p.cookie.resolve(request.cookie, time.time())
                if resolved is not None:
                    self._token, self._issued, self._refresh = resolved
            else:
                self._token = p.cookie.read(request.cookie)
        if p.request_id_name is not None:
            kept = (
                p.forwarded_request_id(self._client.peer, request.headers)
                if p.has_trusted
                else None
            )
            self._request_id = kept or _ID_PREFIX + b"%x" % next(_ids)
        if (p.sources is not None or p.fail_closed) and not self._seek():
            return
        choice = p.admit(self._token, self._sought)
        if choice is not None:
            self._admitted = True
            self._count_affinity(choice)
            self._send(choice)
        else:
            self._task = asyncio.get_running_loop().create_task(self._admit_slowly())

    def _seek(self) -> bool:
        """Affinity beyond our cookie: what the sources say of a client whose cookie names no
        backend that can take it. Under ``onFailure: fail`` a client whose own backend is down
        gets the unavailable answer (False) instead of a move."""
        p = self._p
        request = self._request
        pinned = p.pool.pinned(self._token)
        if p.sources is not None and (pinned is None or not pinned.available):
            self._sought = p.sources.seek(
                p.pool,
                request.headers,
                self._target,
                request.cookie,
                self._client.peer,
                p.forwarding.trusted,
            )
        if p.fail_closed:
            held = _held(p.pool, self._token, self._sought)
            if held is not None and not held.healthy:
                log.debug(  # per request, and said once already by the health checker
                    "%s %s: backend %s is down and affinity.onFailure is fail: unavailable",
                    self._method(),
                    self._path(),
                    held.id,
                )
                self._serve_unavailable()
                return False
        return True

    async def _admit_slowly(self) -> None:
        choice = await self._p.admit_slowly(self._token, self._sought)
        self._task = None
        if self._finished:  # the client left while we waited
            if choice is not None:
                self._p.admission.leave()
            return
        if choice is None:
            self._serve_unavailable()
            return
        self._admitted = True
        self._count_affinity(choice)
        self._send(choice)

    def _count_affinity(self, choice: Choice) -> None:
        """Why the client is where it is: the answer to "why did my session move?"."""
        p = self._p
        sought = self._sought
        if sought is not None and choice.repinned:  # a source placed it (else the strategy)
            p.stats.placed[sought.source] += 1
            if sought.learned is not None and not choice.held:
                assert p.sources is not None
                p.sources.moved(sought, choice.backend)
        token = self._token if p.sticky else None
        if token is None:
            result = NEW
        elif not choice.repinned:
            result = HIT
        else:
            pinned = p.pool.pinned(token)
            if pinned is choice.backend:
                result = HIT  # kept, with a token of an older secret re-issued
            elif pinned is None:
                result = INVALID  # forged, from an unknown secret, or of a backend now gone
            else:
                result = REPINNED  # its backend could not take it
        p.stats.affinity[result] += 1
        self._affinity = result

    def request_body(self, piece: bytes) -> None:
        if self._finished or not self._count_body(piece):
            return
        conn = self._conn
        if conn is None:
            pending = self._request.pending
            pending.append(piece)
            if sum(map(len, pending)) > PENDING_BODY_LIMIT:
                self._client.pause_body()
            return
        self._write_body(conn, piece)

    def request_end(self, trailers: list[Header] | None) -> None:
        conn = self._conn
        if conn is not None and not self._finished:
            self._end_body(conn, trailers)

    def _count_body(self, piece: bytes) -> bool:
        self._body_received += len(piece)
        max_body = self._p.max_body
        if max_body is not None and self._body_received > max_body:
            self.client_failed(RequestTooLarge("body over limits.maxBodySize"))
            return False
        return True

    # --- 2. sending ----------------------------------------------------------------------

    def _send(self, choice: Choice) -> None:
        """Lease a connection to ``choice``'s backend (or open one) and send the request."""
        backend = choice.backend
        self._choice = choice
        self._backend = backend
        self._p.pool.acquire(backend)
        self._dispatch(backend.connections, fresh=False)

    def _send_internal(self, internal: Internal | None) -> None:
        if internal is None:
            self._answer(self._p.unavailable)
            return
        self._internal = internal
        self._dispatch(internal.connections, fresh=False)

    def _dispatch(self, connections: Connections, *, fresh: bool) -> None:
        self._connections = connections
        conn = None if fresh else connections.take()
        if conn is not None:
            self._attach(conn)
        else:
            self._task = asyncio.get_running_loop().create_task(self._connect(connections))

    async def _connect(self, connections: Connections) -> None:
        try:
            conn = await connections.open()
        except (UpstreamError, LocalResourceError) as error:
            self._task = None
            if not self._finished:
                self._failed(error, None)
            return
        self._task = None
        if self._finished:
            connections.release(conn, reusable=True)
            return
        self._attach(conn)

    def _attach(self, conn: BackendConnection) -> None:
        """Send the request on ``conn``: the head with whatever of the body has arrived, in one
        write (a small request is one packet); the rest follows as it comes."""
        self._conn = conn
        self._attached = monotonic()
        request = self._request
        out = [self._request_head()]
        if request.framing != NO_BODY:
            self._client.send_continue()
            pending = request.pending
            if pending:
                self._body_sent = True
                if request.framing == CHUNKED:
                    for piece in pending:
                        out += chunk(piece)
                else:
                    out += pending
                pending.clear()
            if request.complete and request.framing == CHUNKED:
                out.append(self._last_chunk(request.trailers))
        conn.start(
            self,
            out[0] if len(out) == 1 else b"".join(out),
            head_request=request.method == b"HEAD",
            upgrade=request.upgrade is not None,
        )
        if request.complete:
            conn.request_done()
        else:
            self._client.resume_body()

    def _request_head(self) -> bytes:
        request = self._request
        p = self._p
        if self._internal is not None:
            prefix, host = b"", b"stickylb"
            target = self._target
            if self._internal is p.admin_link:
                end = target.find(b"?")
                query = b"" if end < 0 else target[end:]
                target = p.admin.internal(path_of(target), INTERNAL_ADMIN_PREFIX) + query
        else:
            assert self._backend is not None
            prefix, host, target = self._backend.prefix, self._backend.host_header, self._target
        if request.framing == LENGTH:
            extra = b"Content-Length: %d\r\n" % request.length
        elif request.framing == CHUNKED:
            extra = b"Transfer-Encoding: chunked\r\n"
        elif request.method in BODY_METHODS:
            extra = b"Content-Length: 0\r\n"
        else:
            extra = b""
        if request.upgrade is not None:
            extra += b"Connection: Upgrade\r\nUpgrade: " + request.upgrade + b"\r\n"
        else:
            extra += p.close_backend
        if self._request_id:
            extra += p.request_id_line + self._request_id + b"\r\n"
        client = self._client
        return p.forwarding.head(
            b"%s %s%s HTTP/1.1\r\n" % (request.method, prefix, target),
            request.headers,
            p.request_skip(request.connection),
            peer=client.peer,
            peer_bytes=client.peer_bytes,
            scheme=client.scheme,
            client_host=request.host,
            backend_host=host,
            extra=extra,
        )

    def _write_body(self, conn: BackendConnection, piece: bytes) -> None:
        self._body_sent = True
        if self._request.framing == CHUNKED:
            conn.writelines(chunk(piece))
        else:
            conn.write(piece)

    def _end_body(self, conn: BackendConnection, trailers: list[Header] | None) -> None:
        if self._request.framing == CHUNKED:
            conn.write(self._last_chunk(trailers))
        conn.request_done()

    @staticmethod
    def _last_chunk(trailers: list[Header] | None) -> bytes:
        return last_chunk(_trailer_lines(trailers))

    def backend_writable(self, writable: bool) -> None:
        if writable:
            self._client.resume_body()
        else:
            self._client.pause_body()

    def client_writable(self, writable: bool) -> None:
        conn = self._conn
        if conn is not None:
            if writable:
                conn.resume_reading()
            else:
                conn.pause_reading()

    # --- 3. the answer -------------------------------------------------------------------

    def response_head(
        self, status: int, reason: bytes, headers: list[Header], framing: int, length: int
    ) -> None:
        conn = self._conn
        assert conn is not None
        self._answered = True
        self._upstream_status = status
        parts = header_lines(headers, self._p.answer_skip(conn.connection))
        length_header = conn.content_length
        if framing == NO_BODY and length_header is not None and status >= 200 and status != 204:
            parts += (b"Content-Length: ", length_header, b"\r\n")  # what HEAD or 304 stand for
        self._mark(parts)
        backend = self._backend
        if backend is not None:
            backend.stats.answers[status // 100 - 1] += 1
            if self._p.learns:
                assert self._p.sources is not None
                self._p.sources.learn(headers, backend, self._request.cookie)
        self._client.send_head(status, reason, parts, framing, length)

    def response_body(self, piece: bytes) -> None:
        self._sent += len(piece)
        self._client.send_body(piece)

    def response_end(self, trailers: list[Header] | None) -> None:
        backend = self._backend
        if backend is not None:
            stats = backend.stats
            self._ended = now = monotonic()
            took = now - self._started
            durations = stats.durations  # Histogram.observe, inlined: once per request
            durations.counts[bisect_left(DURATION_BUCKETS, took)] += 1
            durations.total += took
            stats.response_bytes += self._sent
        self._let_go(reusable=self._request.complete)
        self._finish()
        self._client.send_end(_trailer_lines(trailers))

    def response_upgrade(
        self, conn: BackendConnection, reason: bytes, headers: list[Header], early: bytes
    ) -> None:
        """The backend said 101: the client gets its 101, then both sockets become a tunnel."""
        self._conn = None
        upgrade = b""
        for lname, _, value in headers:
            if lname == b"upgrade":
                upgrade = value.lower()
        if self._request.upgrade is None or b"websocket" not in upgrade:
            conn.close()
            self.backend_failed(UpstreamError("101 without a WebSocket upgrade", request_sent=True))
            return
        self._answered = True
        self._upstream_status = 101
        parts = header_lines(headers, self._p.answer_skip(conn.connection))
        self._mark(parts)
        owner = self._choice.backend if self._choice is not None else None
        if owner is not None:
            owner.stats.answers[0] += 1
        head = b"".join(
            (
                status_line(b"1.1", 101, reason),
                *parts,
                b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            )
        )

        def open_tunnel(
            client: asyncio.Transport | None, client_protocol: asyncio.BaseProtocol | None = None
        ) -> None:
            backend = conn.transport
            if client is None or backend is None or self._finished:
                conn.close()
                if client is not None:
                    client.close()
                self._finish()
                return
            p = self._p
            tunnel = Tunnel(
                client,
                backend,
                max_message=p.max_message,
                idle=p.websocket_idle,
                sweeper=p.sweeper,
                on_closed=self._tunnel_closed,
                client_protocol=client_protocol,
            )
            p.tunnels[tunnel] = owner
            if owner is not None:
                owner.stats.tunnels += 1
            tunnel.start(self._request.early, early)

        self._client.upgrade(head, open_tunnel)

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        self._p.tunnel_gone(tunnel)
        self._finish()
        self._client.tunnel_closed()

    def _mark(self, parts: list[bytes]) -> None:
        """Our additions to a backend's answer: the pin for a client newly placed, our id."""
        choice = self._choice
        if choice is None or self._internal is not None:
            return
        backend = choice.backend
        if choice.repinned or self._refresh:
            p = self._p
            if p.cookie.timed and p.sticky:
                # The same session (kept or re-issued) keeps its first time; a move starts anew.
                same = self._token is not None and p.pool.pinned(self._token) is backend
                parts.append(p.timed_pin(backend, self._issued if same else 0))
            else:
                parts.append(backend.pin)
        parts.append(backend.id_line)
        if self._request_id:
            parts += (self._p.request_id_line, self._request_id, b"\r\n")

    # --- failures ------------------------------------------------------------------------

    def backend_failed(self, error: UpstreamError) -> None:
        conn, self._conn = self._conn, None
        if self._finished:
            return
        if self._answered:
            where = self._where()
            log.warning(
                "%s %s: %s failed mid-answer: %s",
                self._method(),
                self._path(),
                where,
                error.reason,
            )
            self._let_go(reusable=False)
            self._finish()
            self._client.abort()
            return
        self._failed(error, conn)

    def _failed(self, error: StickyLBError, conn: BackendConnection | None) -> None:
        """Nothing of an answer reached the client yet: retry, or answer the error."""
        self._let_go(reusable=False, conn=conn)
        backend = self._backend
        self._release_backend()
        if isinstance(error, LocalResourceError):
            log.warning(
                "%s %s: %s (local: not %s's fault); pausing new connections",
                self._method(),
                self._path(),
                error.reason,
                self._where(backend),
            )
            self._p.on_local_error()
            self._answer(Answer.of(error))
            return
        assert isinstance(error, UpstreamError)
        if self._internal is not None or backend is None or isinstance(error, UpgradeRefused):
            log.warning("%s: %s failed: %s", self._path(), self._where(), error.reason)
            self._answer(Answer.of(error))
            return
        if self._stale(conn, error):
            self._fresh_retry = True
            self._backend = backend
            self._p.pool.acquire(backend)
            self._dispatch(backend.connections, fresh=True)
            return
        self._p.pool.record_passive_failure(backend, error.reason)
        self._tried += (backend,)
        retry = self._retry_choice(error)
        if retry is None:
            log.warning(
                "%s %s -> backend %s failed: %s",
                self._method(),
                self._path(),
                backend.id,
                error.reason,
            )
            self._answer(Answer.of(error))
            return
        backend.stats.retries += 1
        log.info(
            "%s %s -> backend %s failed (%s); retrying on backend %s",
            self._method(),
            self._path(),
            backend.id,
            error.reason,
            retry.backend.id,
        )
        self._send(retry)

    def _stale(self, conn: BackendConnection | None, error: StickyLBError) -> bool:
        """A kept connection the backend had already closed when we reused it."""
        return (
            conn is not None
            and conn.reused
            and not conn.received
            and type(error) is UpstreamError
            and not self._fresh_retry
            and not self._body_sent
            and self._request.method in IDEMPOTENT_METHODS
        )

    def _retry_choice(self, error: UpstreamError) -> Choice | None:
        if len(self._tried) > self._p.retries or isinstance(error, UpstreamTimeout):
            return None
        if self._body_sent:  # the client's bytes are gone; nothing to resend
            return None
        if error.request_sent and self._request.method not in IDEMPOTENT_METHODS:
            return None
        choice = self._choice
        if self._p.fail_closed and choice is not None and choice.held:
            return None  # affinity.onFailure "fail": the client's own backend, or nothing
        choice = self._p.pool.choose(None, exclude=self._tried, sought=self._sought)
        return None if choice is None else Choice(choice.backend, repinned=True)

    def client_failed(self, error: ClientError) -> None:
        """The client left, stalled or sent too much: everything is let go, nothing is held
        against the backend."""
        if self._finished:
            return
        if self._task is not None:
            self._task.cancel()
            self._task = None
        log.info(
            "%s %s: %s (the client's, not %s's)",
            self._method(),
            self._path(),
            error.reason,
            self._where(),
        )
        self._let_go(reusable=False)
        answered = self._answered
        self._finish()
        if answered or error.status == 499:
            self._client.abort()
        else:
            self._client.send_answer(Answer.of(error), close=True)

    def _refuse(self, error: ClientError) -> None:
        self._finish()
        self._client.send_answer(Answer.of(error), close=True)

    # --- our own answers -------------------------------------------------------------------

    def _serve_admin(self) -> None:
        p = self._p
        request = self._request
        authorization = None
        forwarded_for: list[bytes] = []
        for lname, _, value in request.headers:
            if lname == b"authorization":
                authorization = value
            elif lname == b"x-forwarded-for":
                forwarded_for.append(value)
        if not p.admin_allowed(self._client.peer, authorization, forwarded_for):
            self._answer(NOT_FOUND)
            return
        self._send_internal(p.admin_link)

    def _serve_unavailable(self) -> None:
        link = self._p.unavailable_link
        if link is not None:
            self._send_internal(link)
        else:
            self._answer(self._p.unavailable)

    def _answer(self, answer: Answer) -> None:
        self._finish()
        self._client.send_answer(answer)

    # --- letting go ------------------------------------------------------------------------

    def _let_go(self, *, reusable: bool, conn: BackendConnection | None = None) -> None:
        """Give the connection back (kept when the exchange ended cleanly), or close it."""
        conn = conn or self._conn
        self._conn = None
        if conn is None:
            return
        connections = self._connections
        if connections is not None and conn.user is self:
            connections.release(conn, reusable=reusable and conn.reusable)
        else:
            conn.close()

    def _release_backend(self) -> None:
        """The one place a backend slot is given back."""
        backend, self._backend = self._backend, None
        if backend is not None:
            self._p.pool.release(backend)
            admission = self._p.admission
            if admission.queued:
                admission.wake()  # clients queued for this backend may go now

    def _finish(self) -> None:
        """The one place the cycle ends: the backend slot and the global slot are given back."""
        if self._finished:
            return
        self._finished = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._release_backend()
        if self._admitted:
            self._admitted = False
            self._p.admission.leave()

    # --- for logs ----------------------------------------------------------------------------

    def details(self, head_size: int) -> Details:
        """This request as its access-log line tells it (read only when that log is on)."""
        choice = self._choice
        now = monotonic()
        upstream = None
        if self._attached:
            upstream = ((self._ended or now) - self._attached) * 1000
        return Details(
            backend=str(choice.backend.id) if choice is not None else None,
            upstream_status=self._upstream_status or None,
            total_ms=(now - self._started) * 1000,
            upstream_ms=upstream,
            affinity=AFFINITY_RESULTS[self._affinity] if self._affinity >= 0 else None,
            retries=len(self._tried),
            request_id=self._request_id.decode("latin-1") or None,
            bytes_in=head_size + self._body_received,
        )

    def _method(self) -> str:
        return self._request.method.decode("latin-1")

    def _path(self) -> str:
        return path_of(self._target or self._request.target).decode("latin-1")[:200]

    def _where(self, backend: Backend | None = None) -> str:
        if self._internal is not None:
            return self._internal.name
        backend = backend or self._backend or (self._choice.backend if self._choice else None)
        return f"backend {backend.id}" if backend is not None else "no backend"


def _held(pool: Pool, token: str | None, sought: Sought | None) -> Backend | None:
    """The backend a client belongs to: its cookie's, else a learned session's."""
    pinned = pool.pinned(token)
    if pinned is None and sought is not None:
        return sought.held
    return pinned


def _trailer_lines(trailers: list[Header] | None) -> list[bytes] | None:
    """Trailers as they cross the proxy (either way): hop-by-hop and framing names dropped."""
    return header_lines(trailers, not_forwarded(b"")) if trailers else None
