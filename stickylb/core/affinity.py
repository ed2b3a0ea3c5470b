"""Theory of operation: the sticky cookie that pins a client to one backend.

The cookie value is an opaque token derived from the backend's id, never its URL. Without a
secret it is a plain hash of the id (stable across restarts and processes). With
``cookie.secret`` it is an HMAC, so a client cannot pick its own backend, and every stickylb
process sharing the config and secret maps a token to the same backend. ``cookie.secret`` may
be a list: the first signs, the others are still read (as the same backend) and their tokens
are re-issued with the first, so a secret is rotated without moving anyone.

Reading is deliberately forgiving: a missing, malformed, unknown or forged value reads as "no
token", never as an error.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from ..config import CookieConfig

_MAX_COOKIE_HEADER = 16 * 1024


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
        return backend_token(backend_id, self._secret)

    def tokens_for(self, backend_id: int | str) -> tuple[str, ...]:
        """Every token that names ``backend_id``: the current one first, then those of older
        secrets (read as the same backend, answered with the current one)."""
        older = (backend_token(backend_id, secret) for secret in self._older)
        return (self.token_for(backend_id), *older)

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
