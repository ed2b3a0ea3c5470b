"""Theory of operation: the sticky cookie that pins a client to one backend.

The cookie value is an opaque token derived from the backend's id, never its URL. Without a
secret it is a plain hash of the id (stable across restarts and processes). With
``cookie.secret`` it is an HMAC, so a client cannot pick its own backend, and every stickylb
process sharing the config and secret maps a token to the same backend. ``cookie.secret`` may
be a list: the first signs, the others are still read (as the same backend) and their tokens
are re-issued with the first, so a secret is rotated without moving anyone.

With ``cookie.idleTimeout`` or ``cookie.absoluteTimeout`` the token carries signed times:
6 bytes naming the backend (an HMAC of its id: the pool's key for it), when it was first
issued and when last seen (unix seconds), and a 10-byte MAC over them, base64url (32 chars).
``resolve`` checks the MAC against every listed secret and both times; an expired or forged
token reads as none. An active client's token is sent again with a new "last seen" at most
every ``REFRESH_AT_MOST_EVERY`` seconds (or half the idle timeout), so it never expires.

Reading is deliberately forgiving: a missing, malformed, unknown or forged value reads as "no
token", never as an error.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from typing import NamedTuple

from ..config import CookieConfig

_MAX_COOKIE_HEADER = 16 * 1024


_TAG = 6  # bytes naming the backend in a timed token
_MAC = 10  # bytes of HMAC-SHA256 over the tag and the times
_TIMED = _TAG + 4 + 4 + _MAC  # tag, issued, last seen (unix seconds), MAC: 32 base64 chars
REFRESH_AT_MOST_EVERY = 60.0  # seconds, or half the idle timeout when that is shorter


class Resolved(NamedTuple):
    """A valid timed token: the backend's tag, when it was first issued, and whether the
    client should get it again with a new "last seen" (or with the current secret)."""

    tag: str
    issued: int
    refresh: bool


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def backend_token(backend_id: int | str, secret: str | None) -> str:
    """The cookie value for a backend id."""
    message = f"stickylb:{backend_id}".encode()
    if secret:
        digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    else:
        digest = hashlib.sha256(message).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")


class StickyCookie:
    """Encodes and reads the affinity cookie.

    >>> from stickylb.config import CookieConfig
    >>> cookie = StickyCookie(CookieConfig())
    >>> token = cookie.token_for(0)
    >>> cookie.read(f"a=1; X-Backend-ID={token}") == token
    True
    """

    def __init__(self, config: CookieConfig) -> None:
        self.name = config.name
        secrets = config.secrets
        self._secret = secrets[0] if secrets else None
        self._older = secrets[1:]  # still accepted; tokens signed with them are re-issued
        self._keys = [secret.encode() for secret in secrets]
        self._idle = config.idle_timeout
        self._absolute = config.absolute_timeout
        self.timed = bool(config.idle_timeout or config.absolute_timeout)
        every = REFRESH_AT_MOST_EVERY
        self._refresh_after = min(every, config.idle_timeout / 2) if config.idle_timeout else every
        attributes = [f"Path={config.path}"]
        if config.domain:
            attributes.append(f"Domain={config.domain}")
        if config.max_age is not None:
            attributes.append(f"Max-Age={config.max_age}")
        if config.secure or config.same_site == "None":
            attributes.append("Secure")
        if config.http_only:
            attributes.append("HttpOnly")
        attributes.append(f"SameSite={config.same_site}")
        self._attributes = "; ".join(attributes)
        self._prefix = self.name + "="

    def token_for(self, backend_id: int | str) -> str:
        """What the pool knows a backend by: its token, or with times its tag."""
        if self.timed:
            return self._tag(backend_id, self._keys[0])
        return backend_token(backend_id, self._secret)

    def tokens_for(self, backend_id: int | str) -> tuple[str, ...]:
        """Every token that names ``backend_id``: the current one first, then those of older
        secrets (read as the same backend, answered with the current one)."""
        if self.timed:
            return tuple(self._tag(backend_id, key) for key in self._keys)
        older = (backend_token(backend_id, secret) for secret in self._older)
        return (self.token_for(backend_id), *older)

    # --- tokens with times (cookie.idleTimeout / cookie.absoluteTimeout) -------------------

    @staticmethod
    def _tag(backend_id: int | str, key: bytes) -> str:
        digest = hmac.new(key, f"stickylb-tag:{backend_id}".encode(), hashlib.sha256).digest()
        return _b64(digest[:_TAG])

    def timed_token(self, tag: str, issued: int, now: int) -> str:
        """A token for the backend tagged ``tag`` (with the current secret), first issued at
        ``issued``, seen ``now``."""
        raw = base64.urlsafe_b64decode(tag + "==") + struct.pack("!II", issued, now)
        mac = hmac.new(self._keys[0], raw, hashlib.sha256).digest()[:_MAC]
        return _b64(raw + mac)

    def resolve(self, cookie_header: bytes | str | None, now: float) -> Resolved | None:
        """The timed token in a ``Cookie`` header, when it is genuine and has not expired;
        None otherwise (then the client is balanced like a new one). Never raises."""
        value = self.read(cookie_header)
        if value is None or len(value) != 32:
            return None
        try:
            raw = base64.urlsafe_b64decode(value)
        except (ValueError, TypeError):
            return None
        if len(raw) != _TIMED:
            return None
        signed, mac = raw[: _TIMED - _MAC], raw[_TIMED - _MAC :]
        signer = next(
            (
                index
                for index, key in enumerate(self._keys)
                if hmac.compare_digest(hmac.new(key, signed, hashlib.sha256).digest()[:_MAC], mac)
            ),
            None,
        )
        if signer is None:  # forged, or signed with a secret no longer listed
            return None
        issued, seen = struct.unpack("!II", signed[_TAG:])
        if self._absolute is not None and now - issued > self._absolute:
            return None
        if self._idle is not None and now - seen > self._idle:
            return None
        refresh = signer > 0 or now - seen >= self._refresh_after
        return Resolved(_b64(signed[:_TAG]), issued, refresh)

    def read(self, cookie_header: bytes | str | None) -> str | None:
        """The token in a ``Cookie`` header, or None. Never raises on garbage."""
        if not cookie_header or len(cookie_header) > _MAX_COOKIE_HEADER:
            return None
        if isinstance(cookie_header, bytes):
            cookie_header = cookie_header.decode("utf-8", "surrogateescape")
        prefix = self._prefix
        for part in cookie_header.split(";"):
            part = part.strip()
            if part.startswith(prefix):
                value = part[len(prefix) :].strip().strip('"')
                return value or None
        return None

    def set_cookie_header(self, token: str) -> str:
        """The value of the ``Set-Cookie`` header that pins a client to ``token``."""
        return f"{self.name}={token}; {self._attributes}"
