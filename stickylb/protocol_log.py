"""A logger for aiohttp's connection handler that turns client errors into one quiet line.

aiohttp logs each malformed request (bad framing, oversized or invalid headers, a client that
vanished) at ERROR with a traceback. For a proxy those are routine events caused by clients:
they become a single INFO line naming the error class and status, never the offending bytes
(which may carry cookies or tokens).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any


class ClientErrorLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.pop("exc_info", None)
        if not isinstance(exc, BaseException):
            exc = sys.exc_info()[1]
        code = getattr(exc, "code", None) or getattr(exc, "status", None)
        detail = type(exc).__name__ + (f" ({code})" if code else "") if exc else "error"
        self.logger.info(str(msg) + ": %s", *args, detail)

    error = exception


PROTOCOL_LOGGER = ClientErrorLogger(logging.getLogger("stickylb.protocol"))
