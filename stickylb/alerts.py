"""Theory of operation: e-mail alerts to a backend's owner when it goes down or comes back.

State changes arrive from the pool synchronously; this module never sends from there. Each
change becomes a message in a bounded queue drained by one sender task, so a slow, wrong or
unreachable mail server can only delay mail, never traffic or health checks. A full queue drops
the new message with a log line.

Flapping is merged: after a mail about a backend, further changes of that backend within
``email.cooldown`` are held and sent as one summary mail when the cooldown ends. A failed send is
retried with exponential backoff up to ``email.retries`` times, each failure logged as one line
with no secret in it. At shutdown the queue gets a short, bounded time to drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from contextlib import suppress
from datetime import UTC, datetime
from email.message import EmailMessage

import aiosmtplib

from .config import Config, EmailConfig
from .core.pool import Backend, Pool, StateChange

log = logging.getLogger("stickylb.alerts")

SHUTDOWN_FLUSH_SECONDS = 5.0
FIRST_RETRY_DELAY = 1.0


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class AlertMailer:
    def __init__(self, config: Config, pool: Pool) -> None:
        assert config.email is not None
        self._email: EmailConfig = config.email
        self._origin = f"{socket.gethostname()}:{config.port}"
        self._queue: asyncio.Queue[EmailMessage] = asyncio.Queue(maxsize=config.email.queue_size)
        self._last_sent: dict[int | str, float] = {}
        self._held: dict[int | str, list[StateChange]] = {}
        self._timers: dict[int | str, asyncio.TimerHandle] = {}
        self._sender: asyncio.Task[None] | None = None
        self.sent = 0
        pool.subscribe(self.on_change)

    # --- intake (called synchronously from the pool) ---------------------------------------

    def recipients(self, backend: Backend) -> list[str]:
        people = [backend.config.owner] if backend.config.owner else []
        return people + [person for person in self._email.to if person not in people]

    def on_change(self, change: StateChange) -> None:
        backend = change.backend
        if not self.recipients(backend):
            return
        key = backend.id
        now = time.monotonic()
        last = self._last_sent.get(key)
        if key in self._held or (last is not None and now - last < self._email.cooldown):
            self._held.setdefault(key, []).append(change)
            if key not in self._timers:
                delay = self._email.cooldown - (now - (last or now))
                loop = asyncio.get_running_loop()
                self._timers[key] = loop.call_later(max(delay, 0.0), self._release_held, backend)
            return
        self._last_sent[key] = now
        self._enqueue(self._single_message(change))

    def _release_held(self, backend: Backend) -> None:
        self._timers.pop(backend.id, None)
        changes = self._held.pop(backend.id, [])
        if changes:
            self._last_sent[backend.id] = time.monotonic()
            self._enqueue(self._summary_message(backend, changes))

    def _enqueue(self, message: EmailMessage) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning(
                "alert queue full (%d); dropped: %s", self._queue.maxsize, message["Subject"]
            )

    # --- messages -------------------------------------------------------------------------

    def _base_message(self, backend: Backend, subject: str) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self._email.sender
        message["To"] = ", ".join(self.recipients(backend))
        message["Subject"] = subject
        return message

    def _single_message(self, change: StateChange) -> EmailMessage:
        backend = change.backend
        if change.admin is not None:
            subject = f"[stickylb] Backend {backend.id} {ADMIN_SUBJECTS[change.admin]}"
        elif change.healthy:
            subject = f"[stickylb] Backend {backend.id} recovered"
        else:
            subject = f"[stickylb] Backend {backend.id} is down"
        message = self._base_message(backend, subject)
        message.set_content(
            f"Backend: {backend.id}\n"
            f"URL: {backend.config.url}\n"
            f"State: {_state(change)}\n"
            f"Reason: {_reason(change)}\n"
            f"Time: {_when(change.at)}\n"
            f"Load balancer: {self._origin}\n"
        )
        return message

    def _summary_message(self, backend: Backend, changes: list[StateChange]) -> EmailMessage:
        final = changes[-1]
        state = _state(final).split(" ")[0].lower()
        subject = (
            f"[stickylb] Backend {backend.id} is flapping: {len(changes)} changes, now {state}"
        )
        message = self._base_message(backend, subject)
        lines = [f"- {_when(c.at)}: {_state(c)} ({_reason(c)})" for c in changes]
        message.set_content(
            f"Backend: {backend.id}\n"
            f"URL: {backend.config.url}\n"
            f"State now: {_state(final)}\n"
            f"Reason: {_reason(final)}\n"
            f"Time: {_when(final.at)}\n"
            f"Load balancer: {self._origin}\n\n"
            f"Changes within the {self._email.cooldown:g} s cooldown:\n" + "\n".join(lines) + "\n"
        )
        return message

    # --- sending --------------------------------------------------------------------------

    async def start(self) -> None:
        self._sender = asyncio.create_task(self._send_forever(), name="stickylb-alerts")

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for key in list(self._held):
            backend_changes = self._held.pop(key)
            self._enqueue(self._summary_message(backend_changes[-1].backend, backend_changes))
        self._timers.clear()
        if self._sender is None:
            return
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH_SECONDS):
                await self._queue.join()
        except TimeoutError:
            log.warning("shutdown: abandoned %d unsent alert(s)", self._queue.qsize())
        self._sender.cancel()
        with suppress(asyncio.CancelledError):
            await self._sender
        self._sender = None

    async def _send_forever(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self._deliver(message)
            finally:
                self._queue.task_done()

    async def _deliver(self, message: EmailMessage) -> None:
        email = self._email
        password = email.auth.password.get_secret_value() if email.auth.password else None
        attempts = email.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await aiosmtplib.send(
                    message,
                    hostname=email.smtp_host,
                    port=email.smtp_port,
                    username=email.auth.user if password else None,
                    password=password,
                    use_tls=email.smtp_security == "tls",
                    start_tls=email.smtp_security == "starttls",
                    timeout=email.timeout,
                    cert_bundle=email.ca_file,
                )
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                log.warning(
                    "alert mail %r to %s failed (attempt %d/%d): %s",
                    message["Subject"],
                    message["To"],
                    attempt,
                    attempts,
                    _describe(exc),
                )
                if attempt < attempts:
                    await asyncio.sleep(FIRST_RETRY_DELAY * 2 ** (attempt - 1))
                continue
            self.sent += 1
            log.info("alert mail sent: %s", message["Subject"])
            return


ADMIN_SUBJECTS = {
    "ready": "is ready again",
    "drain": "is draining",
    "maint": "is in maintenance",
    "removed": "was removed",
}


def _state(change: StateChange) -> str:
    if change.admin is not None:
        return change.admin.upper()
    return "UP (recovered)" if change.healthy else "DOWN"


def _reason(change: StateChange) -> str:
    if change.admin is not None or not change.healthy:
        return change.reason or "-"
    return "health checks pass again"


def _describe(exc: BaseException) -> str:
    # Only the type and the SMTP code: server texts may echo what we sent.
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}" + (f" (SMTP {code})" if code else "")
