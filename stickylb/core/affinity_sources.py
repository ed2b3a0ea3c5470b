"""Theory of operation: where a client without a valid stickylb cookie belongs.

``affinity.sources`` is an ordered list; for a request whose cookie does not name a backend that
can take it, ``Sources.seek`` asks each in turn and the first that yields something decides:

- ``header``, ``query`` and ``ip`` yield a *key* (the header's value, the query parameter's,
  the client's address): the backend is the key's first choice by weighted rendezvous hashing
  (``strategies.rendezvous``) among those that may take new clients. Every stickylb with the
  same backends computes the same answer with nothing shared, and adding or removing a backend
  moves only the keys whose first choice it is (about 1/N of them).
- ``learnCookie`` yields a *held* backend: the application's own session cookie was seen in a
  backend's ``Set-Cookie`` (``Sources.learn``), and a later request carrying it goes back there,
  like one carrying our cookie (a drained backend keeps it). The table (``LearnedSessions``) is an
  LRU bounded by ``maxEntries`` whose entries are forgotten ``ttl`` after their last use; it
  keeps digests, not the values, so its memory does not depend on what clients send. In a
  cluster what one instance learns reaches the others within a second (``cluster.py``), never
  on a request's path.

With ``affinity.onFailure: "fail"`` a hashed key's first choice is worked out over every backend
meant to take clients, up or down, and held like a pin: while it is down the client gets 503
rather than a move (``pipeline.py`` decides that). An admin's ``maint`` or removal still moves
clients: that is what they are for.

Nothing here raises on what a client sends: a missing, empty or odd value yields nothing and the
next source is asked.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from ..config import AffinityConfig, AffinitySource
from .headers import Header, Network, original_client
from .pool import MAINT, Backend, Pool
from .stats import PLACED_BY, Stats
from .strategies import rendezvous

LEARNED = PLACED_BY.index("learnCookie")
_MAX_KEY = 1024  # bytes of a header or query value that are hashed; the rest is ignored
MAX_UNSHARED = 10_000  # learned sessions waiting to be passed to the cluster; more are not


class Sought(NamedTuple):
    """What the first source that yielded something says about a request."""

    source: int  # which kind of source: its index in ``core.stats.PLACED_BY``
    key: bytes | None  # hashed sources: where rendezvous hashing starts
    held: Backend | None  # the backend the client belongs to (a learned session's), if any
    learned: bytes | None = None  # the digest of a learned session cookie (to re-point it)


class LearnedSessions:
    """Application session cookies seen in backends' answers, by digest: which backend set
    each. Bounded (least recently used go first) and forgotten ``ttl`` seconds after last use."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        # In a cluster (``cluster.py`` sets ``shared``): what was learned or forgotten here, for
        # the other instances; bounded, and taken away four times a second.
        self.shared = False
        self.changes: list[tuple[bytes, str | None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(value: bytes) -> bytes:
        return hashlib.blake2b(value, digest_size=16).digest()

    def get(self, digest: bytes, now: float) -> str | None:
        """The id of the backend that set this session, refreshing its time; None if unknown."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        backend_id, expires = entry
        if expires <= now:
            del self._entries[digest]
            return None
        self._entries[digest] = (backend_id, now + self.ttl)
        self._entries.move_to_end(digest)
        return backend_id

    def put(self, digest: bytes, backend_id: str, now: float, *, tell: bool = True) -> None:
        entries = self._entries
        entries[digest] = (backend_id, now + self.ttl)
        entries.move_to_end(digest)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        if tell:
            self._changed(digest, backend_id)

    def forget(self, digest: bytes, *, tell: bool = True) -> None:
        self._entries.pop(digest, None)
        if tell:
            self._changed(digest, None)

    def _changed(self, digest: bytes, backend_id: str | None) -> None:
        if self.shared and len(self.changes) < MAX_UNSHARED:
            self.changes.append((digest, backend_id))


class Sources:
    """The configured sources, asked in order (see the module's docstring)."""

    def __init__(self, config: AffinityConfig, learned: LearnedSessions | None = None) -> None:
        self.config = config
        self.kinds = [source.kind for source in config.sources]
        self.fail_closed = config.on_failure == "fail"
        self._sources: list[tuple[str, bytes, int]] = []
        self.learned: LearnedSessions | None = None
        self.learn_prefix = b""
        for source in config.sources:
            self._sources.append((source.kind, _name_of(source), PLACED_BY.index(source.kind)))
            if source.learn_cookie is not None:
                self.learned = learned or LearnedSessions(source.ttl, source.max_entries)
                self.learned.ttl, self.learned.max_entries = source.ttl, source.max_entries
                self.learn_prefix = source.learn_cookie.encode() + b"="

    def seek(
        self,
        pool: Pool,
        headers: list[Header],
        target: bytes,
        cookie: bytes | None,
        peer: str | None,
        trusted: tuple[Network, ...],
    ) -> Sought | None:
        """The first source's word on a request, or None when none yields anything."""
        for kind, name, index in self._sources:
            if kind == "learnCookie":
                sought = self._learned(pool, cookie)
                if sought is not None:
                    return sought
                continue
            if kind == "header":
                key = _header_value(headers, name)
            elif kind == "query":
                key = _query_value(target, name)
            else:
                forwarded = [value for lname, _, value in headers if lname == b"x-forwarded-for"]
                client = original_client(peer, forwarded, trusted)
                key = client.encode() if client else None
            if key:
                key = key[:_MAX_KEY]
                held = _first_choice(pool, key) if self.fail_closed else None
                return Sought(index, key, held)
        return None

    def _learned(self, pool: Pool, cookie: bytes | None) -> Sought | None:
        learned = self.learned
        assert learned is not None
        value = cookie_value(cookie, self.learn_prefix)
        if value is None:
            return None
        digest = learned.digest(value)
        backend_id = learned.get(digest, time.monotonic())
        backend = pool.find(backend_id) if backend_id is not None else None
        if backend is None:
            return None
        return Sought(LEARNED, None, backend, digest)

    def learn(self, headers: list[Header], backend: Backend, cookie: bytes | None) -> None:
        """A backend's answer to a request carrying ``cookie``: remember the session cookie it
        sets, or forget the request's session when the answer clears it."""
        learned = self.learned
        if learned is None:
            return
        prefix = self.learn_prefix
        for lname, _, value in headers:
            if lname != b"set-cookie" or not value.startswith(prefix):
                continue
            pair, _, attributes = value.partition(b";")
            session = pair[len(prefix) :].strip().strip(b'"')
            if session and b"max-age=0" not in attributes.lower().replace(b" ", b""):
                learned.put(learned.digest(session), str(backend.id), time.monotonic())
            else:  # the application ended the session the request carried
                ended = cookie_value(cookie, prefix)
                if ended is not None:
                    learned.forget(learned.digest(ended))

    def moved(self, sought: Sought, backend: Backend) -> None:
        """A learned session was placed on another backend (its own could not serve it):
        it belongs there now."""
        if sought.learned is not None and self.learned is not None:
            self.learned.put(sought.learned, str(backend.id), time.monotonic())

    def public(self, stats: Stats) -> dict[str, object]:
        """For ``/_lb/health``: the sources, and what placed the new clients so far."""
        out: dict[str, object] = {
            "sources": self.kinds,
            "onFailure": self.config.on_failure,
            "placed": stats.placed_by(),
        }
        if self.learned is not None:
            out["learnedSessions"] = len(self.learned)
        return out


def _first_choice(pool: Pool, key: bytes) -> Backend | None:
    """Under ``onFailure: fail``: the key's first choice over every backend meant to take
    clients, up or down (positive weight; not in ``maint`` nor being removed, which an admin
    does to move clients on purpose)."""
    members = [
        b for b in pool.backends if b.set_weight > 0 and not b.removing and b.admin_state != MAINT
    ]
    return rendezvous(key, members) if members else None


def _name_of(source: AffinitySource) -> bytes:
    if source.header is not None:
        return source.header.lower().encode()
    if source.query is not None:
        return source.query.encode()
    return b""


def _header_value(headers: list[Header], lname: bytes) -> bytes | None:
    for name, _, value in headers:
        if name == lname:
            return value.strip()
    return None


def _query_value(target: bytes, name: bytes) -> bytes | None:
    _, mark, query = target.partition(b"?")
    if not mark:
        return None
    query = query.partition(b"#")[0]
    for part in query.split(b"&"):
        key, equals, value = part.partition(b"=")
        if equals and unquote_to_bytes(key.replace(b"+", b" ")) == name:
            return unquote_to_bytes(value.replace(b"+", b" "))
    return None


def cookie_value(cookie_header: bytes | None, prefix: bytes) -> bytes | None:
    """The value of the cookie ``prefix`` (``name=``) names in a ``Cookie`` header, or None."""
    if not cookie_header:
        return None
    for part in cookie_header.split(b";"):
        part = part.strip()
        if part.startswith(prefix):
            return part[len(prefix) :].strip().strip(b'"') or None
    return None
