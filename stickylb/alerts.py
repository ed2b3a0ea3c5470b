"""Theory of operation: alerts, by e-mail to a backend's owner and by webhook, when a backend
goes down or comes back, and when its admin state changes (drain, maint, ready, added, removed).

State changes arrive from the pool synchronously; this module never sends from there. Each
change becomes one *event* per channel (an e-mail when the backend has recipients, a POST for
every webhook whose ``events`` include it) in one bounded queue drained by one sender task, so a
slow, wrong or unreachable mail server or webhook receiver can only delay alerts, never traffic
or health checks. A full queue drops the new alert with a log line.

Flapping is merged: after an alert about a backend, further changes of that backend within
``email.cooldown`` (or the webhooks' ``cooldown``) are held and sent as one summary when the
cooldown ends; a single held change is sent as itself. A failed send is retried with exponential
backoff up to ``retries`` times, each failure logged as one line with no secret in it (no
password, no webhook path or header value). At shutdown the queue gets a short, bounded time to
drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import aiohttp
import aiosmtplib
from yarl import URL

from .config import Config, EmailConfig, WebhookConfig
from .core.pool import Backend, Pool, StateChange
from .core.stats import Stats
from .durations import iso
from .tasks import cancel

log = logging.getLogger("stickylb.alerts")

SHUTDOWN_FLUSH_SECONDS = 5.0
FIRST_RETRY_DELAY = 1.0

ADMIN_SUBJECTS = {
    "ready": "is ready again",
    "drain": "is draining",
    "maint": "is in maintenance",
    "added": "was added",
    "removed": "was removed",
}


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(slots=True)
class Alert:
    """What happened to one backend, as one alert says it (one change, or a summary)."""

    backend: Backend
    changes: list[StateChange]
    down_for: float | None  # for a recovery: seconds it had been down

    @property
    def final(self) -> StateChange:
        return self.changes[-1]

    @property
    def event(self) -> str:
        return self.final.event

    @property
    def subject(self) -> str:
        backend, final = self.backend, self.final
        if len(self.changes) > 1:
            now = _state(final).split(" ")[0].lower()
            return (
                f"[stickylb] Backend {backend.id} is flapping: "
                f"{plural(len(self.changes), 'change')}, now {now}"
            )
        if final.admin is not None:
            return f"[stickylb] Backend {backend.id} {ADMIN_SUBJECTS.get(final.admin, final.admin)}"
        if final.healthy:
            was = f" (was down {_for(self.down_for)})" if self.down_for is not None else ""
            return f"[stickylb] Backend {backend.id} recovered{was}"
        return f"[stickylb] Backend {backend.id} is down"

    def text(self, origin: str, cooldown: float) -> str:
        backend, final = self.backend, self.final
        lines = [
            f"Backend: {backend.id}",
            f"URL: {backend.config.url}",
            f"State{' now' if len(self.changes) > 1 else ''}: {_state(final)}",
            f"Reason: {_reason(final)}",
            f"Time: {_when(final.at)}",
            f"Load balancer: {origin}",
        ]
        if len(self.changes) > 1:
            lines += ["", f"Changes within the {cooldown:g} s cooldown:"]
            lines += [f"- {_when(c.at)}: {_state(c)} ({_reason(c)})" for c in self.changes]
        return "\n".join(lines) + "\n"

    def payload(self, origin: str) -> dict[str, Any]:
        backend, final = self.backend, self.final
        return {
            "event": self.event,
            "backend": backend.id,
            "url": backend.config.url,
            "healthy": final.healthy,
            "adminState": backend.admin_state,
            "reason": final.reason,
            "at": iso(final.at),
            "summary": self.subject.removeprefix("[stickylb] "),
            "balancer": origin,
            "changes": [
                {"event": c.event, "reason": c.reason, "at": iso(c.at)} for c in self.changes
            ],
        }


def _for(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _state(change: StateChange) -> str:
    if change.admin is not None:
        return change.admin.upper()
    return "UP (recovered)" if change.healthy else "DOWN"


def _reason(change: StateChange) -> str:
    if change.admin is not None or not change.healthy:
        return change.reason or "-"
    return "health checks pass again"


Send = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Outgoing:
    channel: str  # "email" or "webhook"
    what: str  # for log lines: the subject and where it goes, never a secret
    send: Send


class Alerts:
    """The alert channels of one balancer: e-mail and webhooks, one queue, one sender."""

    def __init__(self, config: Config, pool: Pool, stats: Stats | None = None) -> None:
        self._email: EmailConfig | None = config.email
        self._webhooks: list[WebhookConfig] = list(config.webhooks)
        self._stats = stats if stats is not None else Stats()
        self._origin = f"{socket.gethostname()}:{config.port}"
        settings = config.email or (self._webhooks[0] if self._webhooks else None)
        self._cooldown = settings.cooldown if settings is not None else 0.0
        self._retries = settings.retries if settings is not None else 0
        queue_size = config.email.queue_size if config.email else 100
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=queue_size)
        self._last_sent: dict[int | str, float] = {}
        self._down_since: dict[int | str, float] = {}
        self._held: dict[int | str, list[StateChange]] = {}
        self._held_down_for: dict[int | str, float | None] = {}
        self._timers: dict[int | str, asyncio.TimerHandle] = {}
        self._sender: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._busy = False
        self.sent = 0
        # Told of every alert sent or given up (the dashboard's event log).
        self.on_result: Callable[[str, str, str], None] = lambda channel, result, what: None
        # In a cluster only the instance holding the lease alerts (``cluster.py``).
        self.leading: Callable[[], bool] = lambda: True
        self._pool = pool
        pool.subscribe(self.on_change)

    @property
    def enabled(self) -> bool:
        return self._email is not None or bool(self._webhooks)

    # --- intake (called synchronously from the pool) ---------------------------------------

    def recipients(self, backend: Backend) -> list[str]:
        if self._email is None:
            return []
        people = [backend.config.owner] if backend.config.owner else []
        return people + [person for person in self._email.to if person not in people]

    def _wanted(self, backend: Backend, change: StateChange) -> bool:
        event = change.event
        return bool(self.recipients(backend)) or any(
            hook.events is None or event in hook.events for hook in self._webhooks
        )

    def on_change(self, change: StateChange) -> None:
        backend = change.backend
        key = backend.id
        down_for = None
        if change.admin is None:
            if change.healthy:
                since = self._down_since.pop(key, None)
                down_for = change.at - since if since is not None else None
            else:
                self._down_since.setdefault(key, change.at)
        if not self._wanted(backend, change) or not self.leading():
            return
        now = time.monotonic()
        last = self._last_sent.get(key)
        if key in self._held or (last is not None and now - last < self._cooldown):
            self._held.setdefault(key, []).append(change)
            self._held_down_for[key] = down_for
            if key not in self._timers:
                delay = self._cooldown - (now - (last or now))
                loop = asyncio.get_running_loop()
                self._timers[key] = loop.call_later(max(delay, 0.0), self._release_held, backend)
            return
        self._last_sent[key] = now
        self._dispatch(Alert(backend, [change], down_for))

    def _release_held(self, backend: Backend) -> None:
        self._timers.pop(backend.id, None)
        changes = self._held.pop(backend.id, [])
        down_for = self._held_down_for.pop(backend.id, None)
        if changes:
            self._last_sent[backend.id] = time.monotonic()
            self._dispatch(Alert(backend, changes, down_for))

    def _dispatch(self, alert: Alert) -> None:
        """One outgoing alert per channel that wants it."""
        if self.recipients(alert.backend):
            message = self._message(alert)
            self._enqueue(
                Outgoing(
                    "email", f"mail {alert.subject!r} to {message['To']}", self._mailer(message)
                )
            )
        for hook in self._webhooks:
            if hook.events is None or any(c.event in hook.events for c in alert.changes):
                where = _origin_of(hook.url.get_secret_value())
                self._enqueue(
                    Outgoing(
                        "webhook",
                        f"webhook {alert.subject!r} to {where}",
                        self._poster(hook, alert),
                    )
                )

    def _enqueue(self, outgoing: Outgoing) -> None:
        try:
            self._queue.put_nowait(outgoing)
        except asyncio.QueueFull:
            self._stats.alerts[(outgoing.channel, "dropped")] += 1
            log.warning("alert queue full (%d); dropped: %s", self._queue.maxsize, outgoing.what)

    # --- channels -------------------------------------------------------------------------

    def _message(self, alert: Alert) -> EmailMessage:
        assert self._email is not None
        message = EmailMessage()
        message["From"] = self._email.sender
        message["To"] = ", ".join(self.recipients(alert.backend))
        message["Subject"] = alert.subject
        message.set_content(alert.text(self._origin, self._cooldown))
        return message

    def _mailer(self, message: EmailMessage) -> Send:
        email = self._email
        assert email is not None

        async def send() -> None:
            password = email.auth.password.get_secret_value() if email.auth.password else None
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

        return send

    def _poster(self, hook: WebhookConfig, alert: Alert) -> Send:
        payload = alert.payload(self._origin)
        if hook.format == "slack":
            body: dict[str, Any] = {"text": f"{alert.subject}\n{_reason(alert.final)}"}
        else:
            body = payload
        headers = {name: value.get_secret_value() for name, value in hook.headers.items()}

        async def send() -> None:
            assert self._session is not None
            async with self._session.post(
                hook.url.get_secret_value(),
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=hook.timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
                if response.status >= 300:
                    raise WebhookRefused(response.status)

        return send

    # --- sending --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._webhooks:
            self._session = aiohttp.ClientSession(trust_env=False)
        self._sender = asyncio.create_task(self._send_forever(), name="stickylb-alerts")

    async def stop(self) -> None:
        self._pool.unsubscribe(self.on_change)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for key in list(self._held):
            changes = self._held.pop(key)
            self._dispatch(Alert(changes[-1].backend, changes, None))
        if self._sender is not None:
            try:
                async with asyncio.timeout(SHUTDOWN_FLUSH_SECONDS):
                    await self._queue.join()
            except TimeoutError:
                left = self._queue.qsize() + int(self._busy)
                if left:
                    log.warning("shutdown: abandoned %s", plural(left, "unsent alert"))
            sender, self._sender = self._sender, None
            await cancel(sender)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send_forever(self) -> None:
        while True:
            outgoing = await self._queue.get()
            self._busy = True
            try:
                await self._deliver(outgoing)
            finally:
                self._busy = False
                self._queue.task_done()

    async def _deliver(self, outgoing: Outgoing) -> None:
        attempts = self._retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await outgoing.send()
            except (
                TimeoutError,
                aiosmtplib.SMTPException,
                aiohttp.ClientError,
                OSError,
                WebhookRefused,
            ) as exc:
                log.warning(
                    "alert %s failed (attempt %d/%d): %s",
                    outgoing.what,
                    attempt,
                    attempts,
                    _describe(exc),
                )
                if attempt < attempts:
                    await asyncio.sleep(FIRST_RETRY_DELAY * 2 ** (attempt - 1))
                continue
            self.sent += 1
            self._stats.alerts[(outgoing.channel, "sent")] += 1
            log.info("alert %s sent", outgoing.what)
            self.on_result(outgoing.channel, "sent", outgoing.what)
            return
        self._stats.alerts[(outgoing.channel, "failed")] += 1
        self.on_result(outgoing.channel, "failed", outgoing.what)


class WebhookRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _origin_of(url: str) -> str:
    """Where a webhook goes, without its path or query (Slack's carry the secret)."""
    parsed = URL(url)
    port = f":{parsed.explicit_port}" if parsed.explicit_port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _describe(exc: BaseException) -> str:
    # Only the type and a code: server texts may echo what we sent.
    if isinstance(exc, WebhookRefused):
        return f"HTTP {exc.status}"
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}" + (f" (SMTP {code})" if code else "")
