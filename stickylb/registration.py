"""Self-registration, for backends: ``async with stickylb.registered(...)``.

A backend that registers itself is added to the balancer with a TTL and renews it (a heartbeat,
the same ``PUT``) every third of the TTL, so two lost heartbeats in a row are survived. On
exit it deregisters (``DELETE``: the balancer drains it, then removes it) and waits, up to
``drain_timeout``, until its last request through the balancer has ended, so the application
can stop right after the block without cutting anyone off.

A heartbeat that fails (the balancer restarting, say) is logged and tried again at the next
beat; only the first registration must succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .durations import parse_duration
from .tasks import cancel

log = logging.getLogger("stickylb.registration")


class RegistrationError(Exception):
    """The balancer refused the registration, or could not be reached."""


class Registration:
    """A backend registered with a balancer (what ``registered`` yields)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        body: dict[str, Any],
        headers: dict[str, str],
        ttl: float,
    ) -> None:
        self._session = session
        self.endpoint = endpoint
        self._body = body
        self._headers = headers
        self.ttl = ttl
        self.heartbeats = 0

    async def renew(self) -> dict[str, Any]:
        """One heartbeat (the registration itself is the first)."""
        try:
            async with self._session.put(
                self.endpoint, json=self._body, headers=self._headers
            ) as response:
                answer = await response.json(content_type=None)
                if response.status >= 400:
                    problem = answer.get("error") if isinstance(answer, dict) else None
                    raise RegistrationError(f"{response.status}: {problem or response.reason}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RegistrationError(f"{self.endpoint}: {type(exc).__name__}: {exc}") from None
        self.heartbeats += 1
        return answer  # type: ignore[no-any-return]

    async def beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except RegistrationError as exc:
                log.warning("heartbeat to the balancer failed (trying again): %s", exc)

    async def deregister(self, drain_timeout: float) -> None:
        """Leave: the balancer drains us; wait until our last request is done (bounded)."""
        timeout = urllib.parse.quote(f"{drain_timeout}s")
        try:
            async with self._session.delete(
                f"{self.endpoint}?timeout={timeout}", headers=self._headers
            ) as response:
                if response.status >= 400:
                    log.warning("deregistering failed: %s", response.status)
                    return
            async with self._session.get(
                f"{self.endpoint}?wait=drained&timeout={timeout}", headers=self._headers
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("deregistering failed: %s", type(exc).__name__)


@contextlib.asynccontextmanager
async def registered(
    lb_url: str,
    *,
    id: int | str,  # the backend's id, as in the config (shadows the builtin on purpose)
    url: str,
    ttl: str | float = "30s",
    token: str | None = None,
    prefix: str = "/_lb",
    drain_timeout: float = 30.0,
    **backend: Any,
) -> AsyncIterator[Registration]:
    """Register ``url`` as backend ``id`` with the balancer at ``lb_url`` for the duration of
    the block. ``backend`` takes the other keys of a backend object (``weight``, ``owner``,
    ``maxConnections``, ``healthPath`` ...); ``token`` defaults to
    ``$STICKYLB_ADMIN__TOKEN``. Raises ``RegistrationError`` when the first ``PUT`` fails.

    >>> # async with stickylb.registered("http://127.0.0.1:3001", id="web-7",
    >>> #                                url="http://127.0.0.1:5007", ttl="30s"):
    >>> #     await serve_forever()
    """
    seconds = parse_duration(ttl)
    if seconds <= 0:
        raise ValueError("ttl must be greater than 0")
    token = token if token is not None else os.environ.get("STICKYLB_ADMIN__TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    quoted = urllib.parse.quote(str(id), safe="")
    endpoint = f"{lb_url.rstrip('/')}{prefix}/backends/{quoted}"
    body = {"url": url, **backend, "ttl": ttl if isinstance(ttl, str) else f"{seconds}s"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=drain_timeout + 10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        registration = Registration(session, endpoint, body, headers, seconds)
        await registration.renew()
        heartbeat = asyncio.create_task(registration.beat_forever(), name="stickylb-heartbeat")
        try:
            yield registration
        finally:
            await cancel(heartbeat)
            await registration.deregister(drain_timeout)
