"""Theory of operation: HTTP/1.1 message framing, decided in one place for both directions.

How a message's body is delimited (RFC 9112 6) is decided here and nowhere else, from the
method, the status and the framing headers, as h11's ``_body_framing`` does:

- a request has a body when it says ``Content-Length`` or ``Transfer-Encoding: chunked``; any
  other transfer coding is refused with 501, and ``Transfer-Encoding`` from an HTTP/1.0 client
  with 400 (the parser has already refused both headers together, duplicates, and bad syntax);
- an answer has no body after HEAD, after a 1xx, 204 or 304; otherwise its length, or chunks, or
  (no framing at all) everything until the backend closes; a transfer coding other than chunked
  is the backend's error (502);
- what the client gets is re-framed for it: the length when it is known, else chunks for an
  HTTP/1.1 client and the end of the connection for an HTTP/1.0 one.

The heads written here take header bytes as they came (see ``core.headers``); a status line
uses the backend's reason phrase when it gave one.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Final

from ..core.errors import BadRequest, NotImplementedCoding, StickyLBError, UpstreamError

NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Requests with these methods say "Content-Length: 0" when they carry nothing (as curl does).
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def request_framing(
    version: bytes, content_length: bytes | None, transfer_encoding: list[bytes]
) -> tuple[int, int]:
    """(framing, length) of a request body, or the error to answer with."""
    if transfer_encoding:
        if version == b"1.0":
            raise BadRequest("Transfer-Encoding from an HTTP/1.0 client")
        if len(transfer_encoding) != 1 or transfer_encoding[0].strip().lower() != b"chunked":
            raise NotImplementedCoding("a transfer coding other than chunked")
        return CHUNKED, 0
    if content_length is not None:
        length = int(content_length)  # digits only: the parser has checked
        return (LENGTH, length) if length else (NO_BODY, 0)
    return NO_BODY, 0


def response_framing(
    head_request: bool, status: int, content_length: bytes | None, transfer_encoding: bytes | None
) -> tuple[int, int]:
    """(framing, length) of a backend's answer, or ``UpstreamError``."""
    if head_request or status < 200 or status in (204, 304):
        return NO_BODY, 0
    if transfer_encoding is not None:
        if transfer_encoding.strip().lower() != b"chunked":
            raise UpstreamError("a transfer coding other than chunked", request_sent=True)
        return CHUNKED, 0
    if content_length is not None:
        length = int(content_length)
        return (LENGTH, length) if length else (NO_BODY, 0)
    return UNTIL_CLOSE, 0


def chunk(piece: bytes) -> tuple[bytes, bytes, bytes]:
    """``piece`` (not empty: that would end the body) as one chunk, in parts to write."""
    return b"%x\r\n" % len(piece), piece, b"\r\n"


def last_chunk(trailers: list[bytes] | None) -> bytes:
    """The end of a chunked body, with trailer lines (header-line parts) when there are any."""
    if not trailers:
        return LAST_CHUNK
    return b"".join((b"0\r\n", *trailers, b"\r\n"))


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_STATUS_LINES = {
    (version, status): b"HTTP/%s %d %s\r\n" % (version, status, reason_phrase(status))
    for version in (b"1.0", b"1.1")
    for status in range(100, 600)
}


def status_line(version: bytes, status: int, reason: bytes = b"") -> bytes:
    if reason:
        return b"HTTP/%s %d %s\r\n" % (version, status, reason)
    return _STATUS_LINES[version, status]


class Answer:
    """A complete answer of stickylb's own (an error, the "unavailable" page): status, content
    type and body, written with whatever framing the client needs."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, content_type: bytes, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body

    @classmethod
    def of(cls, error: StickyLBError) -> Answer:
        body = json.dumps({"error": error.public_message}).encode()
        return cls(error.status, b"application/json; charset=utf-8", body)
