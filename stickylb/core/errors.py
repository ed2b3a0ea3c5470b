"""The exceptions of one request through the balancer, whose fault each one is, and the answer
each one implies.

StickyLBError                         answer  fault
├── InternalError                      500     a bug of stickylb's (logged with its traceback)
├── ClientError                        4xx     the client's: never held against a backend
│   ├── BadRequest                     400     malformed or ambiguous request
│   ├── RequestTimeout                 408     the head or the body did not arrive in time
│   ├── RequestTooLarge                413     the body exceeds ``limits.maxBodySize``
│   ├── UriTooLong                     414     the request line exceeds ``limits.maxHeaderSize``
│   ├── HeadersTooLarge                431     one header or the whole head is too large
│   ├── NotImplementedCoding           501     a transfer coding other than chunked, or a method
│   ├── VersionNotSupported            505     an HTTP version other than 1.0 and 1.1
│   └── ClientGone                     -       the client went away or stopped reading
├── NoBackendAvailable                 503     nothing can take the request (the "unavailable")
├── LocalResourceError                 503     stickylb itself ran out of a resource (EMFILE, ...)
└── UpstreamError                      502     the backend's
    ├── UpstreamConnectError           502     nothing reached the backend (safe to retry)
    ├── UpgradeRefused                 502     it answered a WebSocket handshake without 101
    └── UpstreamTimeout                504     the backend went silent for ``timeouts.read``

The public messages are fixed: an answer never echoes what the client or the backend sent
(CVE-2012-0053 is the classic case of a 400 page that quoted a cookie back).
"""

from __future__ import annotations

from typing import Literal

Fault = Literal["client", "backend", "local"]


class StickyLBError(Exception):
    status = 500
    public_message = "Internal error."
    fault: Fault = "local"

    @property
    def reason(self) -> str:
        """A short, secret-free description for logs (never shown to clients)."""
        return str(self) or self.public_message


class InternalError(StickyLBError):
    pass


class ClientError(StickyLBError):
    fault: Fault = "client"


class BadRequest(ClientError):
    status = 400
    public_message = "Bad request."


class RequestTimeout(ClientError):
    status = 408
    public_message = "Request timeout."


class RequestTooLarge(ClientError):
    status = 413
    public_message = "Request body too large."


class UriTooLong(ClientError):
    status = 414
    public_message = "Request line too long."


class HeadersTooLarge(ClientError):
    status = 431
    public_message = "Request header fields too large."


class NotImplementedCoding(ClientError):
    status = 501
    public_message = "Not implemented."


class VersionNotSupported(ClientError):
    status = 505
    public_message = "HTTP version not supported."


class ClientGone(ClientError):
    """The client closed its connection, half-way through its request or our answer."""

    status = 499  # never sent: there is nobody to send it to (nginx logs the same code)
    public_message = "Client closed the request."


class NoBackendAvailable(StickyLBError):
    status = 503
    public_message = "No healthy backends available."


class LocalResourceError(StickyLBError):
    """stickylb could not open a socket of its own (EMFILE, ENFILE, ENOBUFS, ENOMEM)."""

    status = 503
    public_message = "Service temporarily unavailable."


class UpstreamError(StickyLBError):
    """The backend failed; ``request_sent`` says whether any of the request reached it."""

    status = 502
    public_message = "Bad gateway: the backend did not answer properly."
    fault: Fault = "backend"

    def __init__(self, reason: str, *, request_sent: bool) -> None:
        super().__init__(reason)
        self.request_sent = request_sent


class UpstreamConnectError(UpstreamError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, request_sent=False)


class UpgradeRefused(UpstreamError):
    """A backend that answers a WebSocket handshake with anything but 101 is alive and chose
    to: the client gets 502, and the backend is neither retried nor counted as failing."""


class UpstreamTimeout(UpstreamError):
    status = 504
    public_message = "Gateway timeout: the backend took too long to answer."
