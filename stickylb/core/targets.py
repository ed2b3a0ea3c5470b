"""Theory of operation: request targets, and whether one names the balancer's own endpoints.

Pure functions over bytes. A request target is forwarded in origin-form (``/path?query``): an
absolute-form target (``http://host/path``, RFC 9112 3.2.2) keeps only its path and query,
because the backend is ours to choose, never the client's. Anything else (``*``, authority-form)
has no backend to go to.

Whether a path is under the admin prefix is decided the way the most lenient backend could read
it, so that no spelling of ``/_lb/...`` ever reaches one: every percent-escape decoded,
backslashes read as slashes, repeated slashes collapsed, dot segments removed, letters compared
without case. The admin endpoints get the same normalized path with its case kept, so
``/%5Flb/health`` and ``//_lb/./health`` are the health page, ``/_LB/health`` is the balancer's
404, and none is ever proxied.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(rb"/{2,}")


def origin_form(target: bytes) -> bytes | None:
    """The target to send upstream, or None when it names no path of ours.

    >>> origin_form(b"/a?b"), origin_form(b"http://evil.test:9/x?y"), origin_form(b"*")
    (b'/a?b', b'/x?y', None)
    """
    if target.startswith(b"/"):
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    cut = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    path = rest[min(cut) :] if cut else b""
    return path if path.startswith(b"/") else b"/" + path


def path_of(target: bytes) -> bytes:
    """The path part of an origin-form target (without the query)."""
    end = target.find(b"?")
    return target if end < 0 else target[:end]


def _decoded(path: bytes) -> bytes:
    return _ESCAPE.sub(lambda match: bytes((int(match.group(1), 16),)), path)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4, on a path that starts with "/"."""
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == b".":
            if last:
                out.append(b"")
        elif segment == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


class AdminPrefix:
    """Whether a path names the balancer's own endpoints, under any spelling.

    >>> admin = AdminPrefix("/_lb")
    >>> [admin.matches(p) for p in (b"/_lb", b"/_lb/health", b"//_lb/x", b"/_lb%2Fhealth")]
    [True, True, True, True]
    >>> [admin.matches(p) for p in (b"/_lbx", b"/app/_lb", b"/")]
    [False, False, False]
    >>> admin.normalized(b"//x/./%5Flb/../_lb//health")
    b'/x/_lb/health'
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self._folded = self.prefix.lower()
        # Paths that contain none of these read the same however they are decoded.
        self._tricky = re.compile(rb"%|\\|//|/\.")
        # A target with neither those nor the prefix itself (any case) cannot be ours: the one
        # test most requests need.
        self._maybe = re.compile(rb"%|\\|//|/\.|" + re.escape(self.prefix), re.IGNORECASE)

    def normalized(self, path: bytes) -> bytes:
        """``path`` as the most lenient server would read it (its case kept)."""
        if not self._tricky.search(path):
            return path
        path = _decoded(path).replace(b"\\", b"/")
        return _remove_dot_segments(_SLASHES.sub(b"/", path))

    def internal(self, path: bytes, prefix: bytes) -> bytes:
        """``path`` (which ``matches``) with the configured prefix, in whatever case and
        spelling, replaced by ``prefix``: where the endpoints' own app serves it.

        >>> AdminPrefix("/ops").internal(b"/OPS//health", b"/_lb")
        b'/_lb/health'
        """
        return prefix + self.normalized(path)[len(self.prefix) :]

    def matches(self, target: bytes) -> bool:
        """Whether an origin-form target (path and query) is under the prefix."""
        if not self._maybe.search(target):
            return False
        folded = self.normalized(path_of(target)).lower()
        prefix = self._folded
        return folded == prefix or folded.startswith(prefix + b"/")
