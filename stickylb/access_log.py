"""The access log: one line per request, ``combined`` or ``json``, written off the event loop.

``combined`` is the Combined Log Format (``%a - - %t "%r" %s %b "%{Referer}i"
"%{User-Agent}i"``, what every log tool reads) followed by ``key=value`` fields; ``json`` is one
object per line for log shippers. Both carry the backend id, its status, the total and upstream
time in ms, bytes both ways, the affinity result (new, hit, repinned, invalid), retries and the
request id. ``%b`` / ``bytesOut`` count every byte written to the client for the request, head
included; ``bytesIn`` the request's head and body. Header values are shown as sent, with bytes
that are not printable escaped.

Lines go to a bounded queue; one task writes them in batches from a thread (``to_thread``), so
a slow disk or a full pipe never blocks the event loop. When the queue is full, lines are
dropped and counted, with one log line per second at most. A logging ``Logger`` can be the sink
instead (``Server(access_log=logger)``, for embedding).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import IO, NamedTuple

from .core.headers import Header
from .tasks import cancel

log = logging.getLogger("stickylb")

QUEUE_LINES = 10_000
BATCH_LINES = 512


class Details(NamedTuple):
    """What the request pipeline knows of one request, for its log line."""

    backend: str | None
    upstream_status: int | None
    total_ms: float
    upstream_ms: float | None
    affinity: str | None
    retries: int
    request_id: str | None
    bytes_in: int


class LineWriter:
    """A bounded queue of lines and the one task that writes them (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._file: IO[str] | None = None
        self._lines: deque[str] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self._last_warning = 0.0

    def start(self) -> None:
        self._file = sys.stdout if self._path == "-" else open(self._path, "a", encoding="utf-8")  # noqa: SIM115
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._write_forever(), name="stickylb-access-log")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)
        if self._lines and self._file is not None:
            self._write(list(self._lines))
            self._lines.clear()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def put(self, line: str) -> None:
        if len(self._lines) >= QUEUE_LINES:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_warning > 1.0:
                self._last_warning = now
                log.warning("access log: the writer is behind; %d line(s) dropped", self.dropped)
            return
        self._lines.append(line)
        if self._wake is not None:
            self._wake.set()

    async def _write_forever(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._lines:
                batch = [self._lines.popleft() for _ in range(min(BATCH_LINES, len(self._lines)))]
                await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[str]) -> None:
        if self._file is None:
            return
        try:
            self._file.write("".join(line + "\n" for line in batch))
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.warning("access log: cannot write: %s", exc)


class AccessLog:
    """Formats one line per request and hands it to its sink."""

    def __init__(self, sink: Callable[[str], None], *, format: str = "combined") -> None:
        self._sink = sink
        self._json = format == "json"
        self.writer: LineWriter | None = None

    @classmethod
    def to_logger(cls, logger: logging.Logger, format: str = "combined") -> AccessLog:
        return cls(logger.info, format=format)

    @classmethod
    def to_path(cls, path: str, format: str = "combined") -> AccessLog:
        writer = LineWriter(path)
        access_log = cls(writer.put, format=format)
        access_log.writer = writer
        return access_log

    def log(
        self,
        peer: str | None,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Iterable[Header],
        status: int,
        sent: int,
        details: Details | None = None,
    ) -> None:
        referer = agent = b"-"
        for lname, _, value in headers:
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                agent = value
        if self._json:
            self._sink(
                _json_line(peer, method, target, version, status, sent, referer, agent, details)
            )
            return
        line = '%s - - %s "%s %s HTTP/%s" %d %d "%s" "%s"' % (  # noqa: UP031 (one format, fast)
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
        if details is not None:
            upstream_ms = details.upstream_ms
            line += (
                f" backend={details.backend or '-'}"
                f" upstream_status={details.upstream_status or '-'}"
                f" total_ms={details.total_ms:.1f}"
                f" upstream_ms={'-' if upstream_ms is None else f'{upstream_ms:.1f}'}"
                f" bytes_in={details.bytes_in} bytes_out={sent}"
                f" affinity={details.affinity or '-'} retries={details.retries}"
                f" request_id={details.request_id or '-'}"
            )
        self._sink(line)


def _json_line(
    peer: str | None,
    method: bytes,
    target: bytes,
    version: bytes,
    status: int,
    sent: int,
    referer: bytes,
    agent: bytes,
    details: Details | None,
) -> str:
    entry: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client": peer,
        "method": _text(method),
        "target": _text(target),
        "protocol": f"HTTP/{_text(version)}",
        "status": status,
        "bytesOut": sent,
        "referer": None if referer == b"-" else _text(referer),
        "userAgent": None if agent == b"-" else _text(agent),
    }
    if details is not None:
        entry.update(
            backend=details.backend,
            upstreamStatus=details.upstream_status,
            totalMs=round(details.total_ms, 3),
            upstreamMs=None if details.upstream_ms is None else round(details.upstream_ms, 3),
            bytesIn=details.bytes_in,
            affinity=details.affinity,
            retries=details.retries,
            requestId=details.request_id,
        )
    return json.dumps(entry, ensure_ascii=False)


def _text(value: bytes) -> str:
    return value.decode("ascii", "backslashreplace").replace('"', '\\"')[:2000]
