"""The access log (``--access-log``): one line per request at INFO on ``stickylb.access``.

The line has aiohttp's default format (the Common Log Format plus referer and user agent), so
logs read the same whether stickylb serves a request itself or an embedding aiohttp application
does: ``%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"``. ``%b`` counts every byte written to
the client for the request, head included. Header values are shown as sent, with bytes that are
not printable escaped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from .core.headers import Header


class AccessLog:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def log(
        self,
        peer: str | None,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Iterable[Header],
        status: int,
        sent: int,
    ) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        referer = agent = b"-"
        for lname, _, value in headers:
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                agent = value
        self._logger.info(
            '%s %s "%s %s HTTP/%s" %d %d "%s" "%s"',
            peer or "-",
            time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
            _text(method),
            _text(target),
            _text(version),
            status,
            sent,
            _text(referer),
            _text(agent),
        )


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace").replace('"', '\\"')[:2000]
