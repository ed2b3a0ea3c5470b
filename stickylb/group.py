"""Theory of operation: how the workers of ``--workers N`` share runtime changes and counts.

Each worker has one socket pair to the supervisor, carrying JSON lines:

- worker -> supervisor ``{"op": {...}}``: an operation made through this worker's admin API
  (``control.py``). The supervisor passes it to every other worker, which carries it out as
  if made there, and keeps the latest operation per backend (and the last reload) so that a
  worker started later (one replacing a dead one) replays them first.
- worker -> supervisor ``{"active": {id: n}}``, four times a second: its active connections.
- supervisor -> worker ``{"elsewhere": {id: n}}``, as often: the sum of every *other*
  worker's counts, so that each worker's reads (and ``?wait=drained``) cover the process group.
- worker -> supervisor ``{"metrics": samples}`` once a second, passed on to every other worker
  as ``{"metrics": samples, "worker": index}`` (``{"gone": index}`` when a worker dies), so a
  scrape of ``/_lb/metrics`` answered by any worker covers the group (``metrics.py``).

So a change made through any worker reaches every other within a fraction of a second. The
supervisor never blocks on a worker: a worker that does not read its socket for a second loses
messages (with a log line), never the supervisor's loop. With ``cluster`` the workers share
through Redis instead (``cluster.py``: each worker is an instance) and close this channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import selectors
import socket
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from . import metrics
from .control import ControlError
from .tasks import cancel

if TYPE_CHECKING:
    from .app import Balancer

log = logging.getLogger("stickylb")

REPORT_EVERY = 0.25  # seconds between count reports, each way
SAMPLES_EVERY = 4  # metrics samples go once every this many reports (once a second)
MAX_LINE = 1 << 20


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _replay_key(op: dict[str, Any]) -> tuple[str, str]:
    kind = str(op.get("op"))
    if kind in ("put", "delete"):
        return ("backend", str(op.get("id")))
    if kind == "reload":
        return ("reload", "")
    return (kind, str(op.get("id")))


class Hub:
    """The supervisor's end of every worker's channel (synchronous, driven by ``poll``)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._ends: dict[int, socket.socket] = {}
        self._buffers: dict[int, bytes] = {}
        self._counts: dict[int, dict[str, int]] = {}
        self._replay: dict[tuple[str, str], dict[str, Any]] = {}
        self._last_report = 0.0

    def join(self, index: int, end: socket.socket) -> None:
        """Worker ``index`` (new or replacing a dead one) talks to us over ``end``."""
        self.leave(index)
        end.settimeout(1.0)
        self._ends[index] = end
        self._buffers[index] = b""
        self._selector.register(end, selectors.EVENT_READ, index)
        for op in self._replay.values():
            self._send(index, {"op": op})

    def leave(self, index: int) -> None:
        end = self._ends.pop(index, None)
        self._counts.pop(index, None)
        self._buffers.pop(index, None)
        if end is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(end)
            end.close()
            for other in list(self._ends):
                self._send(other, {"gone": index})

    def close(self) -> None:
        for index in list(self._ends):
            self.leave(index)
        self._selector.close()

    def close_in_child(self) -> None:
        """In a newly forked worker: close the inherited copies without unregistering them,
        since the epoll instance is shared with the supervisor (an unregister here would
        unregister there)."""
        for end in self._ends.values():
            end.close()
        self._selector.close()

    def poll(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            self._read(key.data)
        now = time.monotonic()
        if now - self._last_report >= REPORT_EVERY:
            self._last_report = now
            self._report()

    def _read(self, index: int) -> None:
        end = self._ends.get(index)
        if end is None:
            return
        try:
            data = end.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone; its replacement joins again
            self.leave(index)
            return
        buffer = self._buffers[index] + data
        *lines, rest = buffer.split(b"\n")
        self._buffers[index] = rest if len(rest) <= MAX_LINE else b""
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "active" in message:
                self._counts[index] = message["active"]
            elif "metrics" in message:
                for other in list(self._ends):
                    if other != index:
                        self._send(other, {"metrics": message["metrics"], "worker": index})
            elif "op" in message:
                op = message["op"]
                key = _replay_key(op)
                self._replay.pop(key, None)
                self._replay[key] = op
                for other in list(self._ends):
                    if other != index:
                        self._send(other, {"op": op})

    def _report(self) -> None:
        for index in list(self._ends):
            elsewhere: dict[str, int] = {}
            for other, counts in self._counts.items():
                if other != index:
                    for backend, count in counts.items():
                        elsewhere[backend] = elsewhere.get(backend, 0) + count
            self._send(index, {"elsewhere": elsewhere})

    def _send(self, index: int, message: dict[str, Any]) -> None:
        end = self._ends.get(index)
        if end is None:
            return
        try:
            end.sendall(_line(message))
        except TimeoutError:
            log.warning("worker %d is not reading its channel; a message was dropped", index)
        except OSError:
            self.leave(index)


class Member:
    """A worker's end of its channel: passes on its own operations and counts, carries out
    the others'."""

    def __init__(self, balancer: Balancer, end: socket.socket) -> None:
        self._balancer = balancer
        self._end = end
        self._elsewhere: dict[str, int] = {}
        self._samples: dict[int, metrics.Samples] = {}  # the other workers', by index
        self._writer: asyncio.StreamWriter | None = None
        control = balancer.control
        control.publish = self._publish
        control.elsewhere = lambda: self._elsewhere
        control.elsewhere_samples = self._samples_elsewhere

    async def run(self, main: Awaitable[None]) -> None:
        """Run ``main`` (the worker's ``serve``) with the channel open alongside."""
        self._end.setblocking(False)
        reader, self._writer = await asyncio.open_connection(sock=self._end, limit=MAX_LINE)
        tasks = [
            asyncio.create_task(self._listen(reader), name="stickylb-group-listen"),
            asyncio.create_task(self._report_forever(), name="stickylb-group-report"),
        ]
        try:
            await main
        finally:
            await cancel(*tasks)
            self._writer.close()

    def _publish(self, op: dict[str, Any]) -> None:
        self._write({"op": op})

    def _write(self, message: dict[str, Any]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(_line(message))

    def _samples_elsewhere(self) -> metrics.Samples:
        total: metrics.Samples = {}
        for samples in self._samples.values():
            metrics.add(total, samples)
        return total

    async def _report_forever(self) -> None:
        beat = 0
        while True:
            counts = {str(b.id): b.active for b in self._balancer.pool.backends if b.active}
            self._write({"active": counts})
            if beat % SAMPLES_EVERY == 0:
                self._write({"metrics": metrics.to_wire(metrics.samples(self._balancer))})
            beat += 1
            await asyncio.sleep(REPORT_EVERY)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, ConnectionError):
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "elsewhere" in message:
                self._elsewhere = message["elsewhere"]
            elif "metrics" in message:
                self._samples[int(message["worker"])] = metrics.from_wire(message["metrics"])
            elif "gone" in message:
                self._samples.pop(int(message["gone"]), None)
            elif "op" in message:
                op = message["op"]
                try:
                    by = f"{op.get('by', '?')}, through another worker"
                    await self._balancer.control.execute(op, by=by, local=False)
                except ControlError as exc:
                    log.debug("operation from another worker not applied: %s", exc)
                except Exception:  # a bad message must not end the channel
                    log.exception("operation from another worker failed")
