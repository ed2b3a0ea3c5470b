"""The exceptions stickylb raises while proxying, and the HTTP status each one implies.

StickyLBError
├── NoBackendAvailable        503  nothing is up (or every backend is full)
├── RequestTooLarge           413  the body exceeds ``limits.maxBodySize``
└── UpstreamError             502  the backend failed
    ├── UpstreamConnectError  502  nothing reached the backend (safe to retry)
    └── UpstreamTimeout       504  the backend did not answer within ``timeouts.read``
"""

from __future__ import annotations


class StickyLBError(Exception):
    status = 500
    public_message = "Internal error."


class NoBackendAvailable(StickyLBError):
    status = 503
    public_message = "No healthy backends available."


class RequestTooLarge(StickyLBError):
    status = 413
    public_message = "Request body too large."


class UpstreamError(StickyLBError):
    """The backend failed; ``reason`` is a short, secret-free description for logs and health."""

    status = 502
    public_message = "Bad gateway: the backend did not answer properly."

    def __init__(self, reason: str, *, request_sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_sent = request_sent


class UpstreamConnectError(UpstreamError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, request_sent=False)


class UpstreamTimeout(UpstreamError):
    status = 504
    public_message = "Gateway timeout: the backend took too long to answer."
