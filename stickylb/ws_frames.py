"""WebSocket framing, only as much as a relay that passes frames through untouched needs (pure).

``FrameTracker`` follows frame boundaries in one direction's byte stream (RFC 6455 5.2) to add
up each message's size and to know whether the stream sits between frames, which is the only
place a relay may put a frame of its own (a close). Payloads are skipped, never read or copied.
"""

from __future__ import annotations

import os
import struct

_CONTROL = 0x8  # opcodes 8-15 are control frames; they never belong to a message
_FINAL = 0x80  # FIN: the last frame of a message
_MAX_HEADER = 14  # 2 + 8 bytes of length + 4 of mask


class FrameTracker:
    """Frame boundaries and message sizes in one direction of a WebSocket.

    >>> tracker = FrameTracker(limit=10)
    >>> tracker.feed(b"\\x01\\x04abcd")  # first fragment: 4 bytes of a text message
    False
    >>> tracker.at_boundary
    True
    >>> tracker.feed(b"\\x80\\x07abcdefg")  # last fragment: 11 bytes in all, over the limit
    True
    """

    __slots__ = ("_head", "_limit", "_message", "_skip", "at_boundary")

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._head = b""  # a frame header split across reads
        self._skip = 0  # payload bytes left in the current frame
        self._message = 0  # bytes so far in the current (possibly fragmented) message
        self.at_boundary = True  # whether everything fed so far ends with a whole frame

    def feed(self, data: bytes) -> bool:
        """Follow ``data``; True when a message has grown past the limit."""
        pos, end = 0, len(data)
        skip, head = self._skip, self._head
        while True:
            if skip:  # payload: passed over, never read
                step = min(skip, end - pos)
                skip -= step
                pos += step
            if pos >= end:
                break
            if head:  # a header split across reads: complete it from this one
                known = len(head)
                buffer, at = head + data[pos : pos + _MAX_HEADER - known], 0
            else:  # the usual case: the header is in ``data`` itself, read in place
                known, buffer, at = 0, data, pos
            frame = _frame_header(buffer, at)
            if frame is None:
                head = buffer[at:]  # the rest of the header comes with the next read
                break
            size, first, length = frame
            pos += size - known
            head = b""
            if not first & _CONTROL:
                self._message += length
                if self._limit is not None and self._message > self._limit:
                    return True
                if first & _FINAL:
                    self._message = 0
            skip = length
        self._skip, self._head = skip, head
        self.at_boundary = not skip and not head
        return False


def _frame_header(buffer: bytes, at: int) -> tuple[int, int, int] | None:
    """The frame header starting at ``buffer[at]``: (its size, its first byte, the payload
    length), or None when the buffer ends before the header does."""
    available = len(buffer) - at
    if available < 2:
        return None
    second = buffer[at + 1]
    length = second & 0x7F
    extra = 2 if length == 126 else 8 if length == 127 else 0
    size = 2 + extra + (4 if second & 0x80 else 0)
    if available < size:
        return None
    if extra:
        length = int.from_bytes(buffer[at + 2 : at + 2 + extra], "big")
    return size, buffer[at], length


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
