"""WebSocket framing, only as much as a relay that passes frames through untouched needs (pure).

``FrameTracker`` follows frame boundaries in one direction's byte stream (RFC 6455 5.2): it adds
up each message's size, knows whether the stream sits between frames (the only place a relay
may put a frame of its own, a close), and refuses what no endpoint may send (5.2, 5.5): a
reserved opcode, a control frame longer than 125 bytes or fragmented, a client frame without a
mask or a server frame with one. Payloads are skipped, never read or copied.
"""

from __future__ import annotations

import os
import struct
from typing import Final

OK: Final = 0
PROTOCOL_ERROR: Final = 1002
MESSAGE_TOO_BIG: Final = 1009

_CONTROL = 0x8  # opcodes 8-15 are control frames; they never belong to a message
_FINAL = 0x80  # FIN: the last frame of a message
_KNOWN_CONTROL = frozenset({0x8, 0x9, 0xA})  # close, ping, pong


class FrameTracker:
    """Frame boundaries, message sizes and frame rules in one direction of a WebSocket;
    ``masked`` is whether this direction's frames must be masked (client to server).

    >>> tracker = FrameTracker(limit=10, masked=False)
    >>> tracker.feed(b"\\x01\\x04abcd")  # first fragment: 4 bytes of a text message
    0
    >>> tracker.at_boundary
    True
    >>> tracker.feed(b"\\x80\\x07abcdefg")  # last fragment: 11 bytes in all, over the limit
    1009
    >>> FrameTracker(limit=10, masked=False).feed(b"\\x09\\x7e\\x00\\x80")  # a 128-byte ping
    1002
    """

    __slots__ = ("_head", "_limit", "_mask", "_message", "_skip", "at_boundary", "messages")

    def __init__(self, limit: int | None, *, masked: bool) -> None:
        self._limit = limit
        self._mask = 0x80 if masked else 0
        self._head = b""  # the start of a frame header whose length field is cut short
        self._skip = 0  # bytes left in the current frame (the mask, then the payload)
        self._message = 0  # bytes so far in the current (possibly fragmented) message
        self.at_boundary = True  # whether everything fed so far ends with a whole frame
        self.messages = 0  # whole data messages seen (for metrics)

    def feed(self, data: bytes) -> int:
        """Follow ``data``: ``OK``, or the close code it calls for (1002 or 1009). After a
        code, ``at_boundary`` still describes everything fed before ``data``."""
        if self._head:  # a header split across reads: joined to this one (rare, < 10 bytes)
            data, self._head = self._head + data, b""
        pos, end = self._skip, len(data)
        mask, limit, message = self._mask, self._limit, self._message
        header = 6 if mask else 2  # a frame's header without its extended length
        while pos < end:
            # Only the first two bytes and the length field are read; the mask and the
            # payload are skipped like the rest of the frame.
            if end - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            if second & 0x80 != mask:
                return PROTOCOL_ERROR
            length = second & 0x7F
            size = header
            if first & _CONTROL:
                if length > 125 or not first & _FINAL or first & 0x0F not in _KNOWN_CONTROL:
                    return PROTOCOL_ERROR
            else:
                if first & 0x0F > 2:  # 3-7 are reserved
                    return PROTOCOL_ERROR
                if length > 125:
                    extra = 2 if length == 126 else 8
                    if end - pos < 2 + extra:
                        break
                    length = int.from_bytes(data[pos + 2 : pos + 2 + extra], "big")
                    size += extra
                message += length
                if limit is not None and message > limit:
                    return MESSAGE_TOO_BIG
                if first & _FINAL:
                    message = 0
                    self.messages += 1
            pos += size + length
        self._message = message
        if pos < end:  # the length field is cut short: the rest comes with the next read
            self._head, self._skip = data[pos:], 0
        else:
            self._skip = pos - end
        self.at_boundary = pos == end
        return OK


def close_frame(code: int, reason: str = "", *, masked: bool) -> bytes:
    """A close frame; ``masked`` for frames a client sends (to a backend, RFC 6455 5.3).

    >>> close_frame(1001, masked=False)
    b'\\x88\\x02\\x03\\xe9'
    """
    payload = struct.pack("!H", code) + reason.encode()[:123]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + mask + body
