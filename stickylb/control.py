"""Theory of operation: changing a running balancer (HAProxy's Runtime API, for stickylb).

Every change is an *operation*, a small JSON-ready dict, carried out by ``Control.execute``:

- ``{"op": "state", "id": ID, "state": "ready" | "drain" | "maint"}``
- ``{"op": "weight", "id": ID, "weight": N}``
- ``{"op": "put", "id": ID, "backend": {...as in the file...}, "ttl": seconds | None}``
- ``{"op": "delete", "id": ID, "timeout": seconds}``
- ``{"op": "reload"}``: the config file and the environment are read again and the difference
  applied by backend id (``reload``).

The admin API, ``SIGHUP``, the agent header of health checks and the TTL of registered backends
all come here, and so do operations made on another worker (``--workers``: the supervisor
passes each one on, ``workers.py``). Operations are idempotent where it matters: a heartbeat
``put`` with an unchanged backend only renews its TTL.

A backend leaves in two steps: it is drained (no new clients), then removed once nothing is
active on it in the whole process group, or when its ``timeout`` passes (``_tick``). Removal
makes its cookie unknown, so its pinned clients are balanced again on their next request.

What the API changed (admin states, weights, backends added or registered) is kept in
``stateFile`` when one is set, written atomically after every change, and restored at startup.
A reload leaves it alone: the file governs only the backends it lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .config import BackendConfig, Config, ConfigError, format_validation_error
from .core.pool import ADMIN_STATES, DRAIN, MAINT, READY, Backend, Pool, new_backend
from .durations import format_duration, parse_duration
from .tasks import cancel

if TYPE_CHECKING:
    from .app import Balancer

log = logging.getLogger("stickylb.control")

DEFAULT_REMOVE_TIMEOUT = 30.0
TICK = 0.25  # seconds between looks at slow starts, expiries and removals
SERVICE_RESTART = 1012
# Settings read only when the process starts; a reload names them when they changed.
RESTART_SETTINGS = {"port": "port", "host": "host", "accessLog": "access_log", "cluster": "cluster"}


class ControlError(Exception):
    """An operation that cannot be done: an HTTP status and one line per problem."""

    def __init__(self, status: int, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.status = status
        self.problems = problems


@dataclass(slots=True)
class Removal:
    backend: Backend
    deadline: float  # monotonic


def backend_id(text: object) -> int | str:
    """An id as a path gives it: digits read as a number, as ids in a config file usually are."""
    value = str(text)
    return int(value) if value.isdigit() and (value == "0" or value[0] != "0") else value


class Control:
    """Runtime control of one balancer (see the module's docstring)."""

    def __init__(self, balancer: Balancer, loader: Callable[[], Config] | None) -> None:
        self._balancer = balancer
        self._loader = loader
        self._removals: dict[Backend, Removal] = {}
        self._specs: dict[Backend, dict[str, Any]] = {}  # API backends: the object as PUT
        self._agent: dict[Backend, str] = {}  # the last state each backend's agent asked for
        self._task: asyncio.Task[None] | None = None
        self._state_file = balancer.config.state_file
        # Told of every operation made here (not of those passed on from elsewhere).
        self.publish: Callable[[dict[str, Any]], None] | None = None
        # Set by ``--workers``: the active connections of every other worker, by backend id,
        # and their metrics samples (``metrics.Samples``).
        self.elsewhere: Callable[[], Mapping[str, int]] | None = None
        self.elsewhere_samples: Callable[[], Any] | None = None
        # Set by ``cluster``: whether the shared store can take a change now (writes are
        # refused otherwise), and whether this instance expires registered backends.
        self.store_ok: Callable[[], bool] | None = None
        self.leads: Callable[[], bool] | None = None

    @property
    def pool(self) -> Pool:
        return self._balancer.pool

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.restore()
        self._task = asyncio.create_task(self._tick_forever(), name="stickylb-control")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    # --- operations -------------------------------------------------------------------------

    async def execute(
        self, op: Mapping[str, Any], *, by: str, local: bool = True
    ) -> dict[str, Any]:
        """Carry out one operation; the answer is JSON-ready. ``ControlError`` when it cannot."""
        kind = op.get("op")
        if kind == "reload":
            answer = await self.reload(by=by)
        elif kind == "state":
            answer = self._set_state(self._find(op["id"]), str(op["state"]), by=by)
        elif kind == "weight":
            answer = self._set_weight(self._find(op["id"]), op["weight"], by=by)
        elif kind == "put":
            answer = self._put(backend_id(op["id"]), op["backend"], op.get("ttl"), by=by)
        elif kind == "delete":
            answer = self._delete(self._find(op["id"]), op.get("timeout"), by=by)
        else:
            raise ControlError(400, [f"unknown operation {kind!r}"])
        if local and self.publish is not None:
            self.publish({**op, "by": by})
        return answer

    def _find(self, wanted: object) -> Backend:
        backend = self.pool.find(wanted)
        if backend is None:
            raise ControlError(404, [f"no backend with id {str(wanted)[:100]!r}"])
        return backend

    def _set_state(self, backend: Backend, state: str, *, by: str) -> dict[str, Any]:
        if state not in ADMIN_STATES:
            raise ControlError(400, [f"state: must be one of {', '.join(ADMIN_STATES)}"])
        if backend in self._removals and state == READY:
            self._cancel_removal(backend)
            log.info("backend %s: removal cancelled (by %s)", backend.id, by)
        if self.pool.set_state(backend, state, f"set to {state} by {by}"):
            log.info("backend %s: state %s (by %s)", backend.id, state, by)
            if state == MAINT:
                self._close_websockets(backend)
            self.save()
        return {"id": backend.id, "adminState": backend.admin_state}

    def _set_weight(self, backend: Backend, weight: object, *, by: str) -> dict[str, Any]:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ControlError(400, ["weight: must be a number, 0 or more"])
        if weight == backend.set_weight:
            return {"id": backend.id, "weight": backend.weight}
        self.pool.set_weight(backend, float(weight))
        log.info("backend %s: weight %g (by %s)", backend.id, weight, by)
        self.save()
        return {"id": backend.id, "weight": backend.weight}

    def _put(self, wanted: int | str, body: object, ttl: object, *, by: str) -> dict[str, Any]:
        """Add or replace a backend; with ``ttl`` it is registered and this is its heartbeat."""
        if not isinstance(body, dict):
            raise ControlError(400, ["body: must be a JSON object"])
        spec = dict(body)
        problems: list[str] = []
        ttl_seconds = None
        if ttl is not None:
            try:
                ttl_seconds = parse_duration(ttl)
            except ValueError as exc:
                problems.append(f"ttl: {exc}")
            else:
                if ttl_seconds <= 0:
                    problems.append("ttl: must be greater than 0")
        if "id" in spec and str(spec["id"]) != str(wanted):
            problems.append(f"id: {spec['id']!r} differs from the id in the path ({wanted!r})")
        spec["id"] = wanted
        try:
            config = BackendConfig.model_validate(spec)
        except ValidationError as exc:
            problems += format_validation_error(exc)
        if problems:
            raise ControlError(400, problems)
        return self.add_or_replace(config, spec, ttl_seconds, by=by)

    def add_or_replace(
        self, config: BackendConfig, spec: dict[str, Any], ttl: float | None, *, by: str
    ) -> dict[str, Any]:
        balancer = self._balancer
        source = "registered" if ttl is not None else "api"
        backend = self.pool.find(config.id)
        if backend is not None and backend in self._removals:
            self._cancel_removal(backend)
            self.pool.set_state(backend, READY, f"back (by {by})")
            log.info("backend %s: removal cancelled by a new PUT (by %s)", backend.id, by)
        created = backend is None
        if backend is None:
            health = balancer.config.health_for(config)
            backend = new_backend(
                config, health, balancer.cookie, source=source, checked=balancer.checking
            )
            balancer.add_backend(backend)
            log.info("backend %s added (%s, by %s)", backend.id, config.url, by)
        elif backend.config != config:
            balancer.update_backend(backend, config)
            backend.weight_override = None
            self.pool.set_weight(backend, None)
            log.info("backend %s replaced (%s, by %s)", backend.id, config.url, by)
        backend.source = source
        backend.ttl = ttl
        backend.expires_at = time.time() + ttl if ttl is not None else None
        self._specs[backend] = spec
        self.save()
        return {"id": backend.id, "created": created}

    def _delete(self, backend: Backend, timeout: object, *, by: str) -> dict[str, Any]:
        seconds = DEFAULT_REMOVE_TIMEOUT if timeout is None else float(timeout)  # type: ignore[arg-type]
        self.remove(backend, seconds, why=f"by {by}")
        return {"id": backend.id, "removing": True}

    def remove(self, backend: Backend, timeout: float, *, why: str) -> None:
        """Drain ``backend``, then remove it when idle or after ``timeout`` seconds."""
        if backend not in self._removals:
            log.info("backend %s: draining for removal (%s; at most %gs)", backend.id, why, timeout)
        self._removals[backend] = Removal(backend, time.monotonic() + timeout)
        backend.removing = True
        if backend.admin_state == READY:
            self.pool.set_state(backend, DRAIN, f"removal {why}")
        self._close_websockets(backend)
        self.save()

    def _cancel_removal(self, backend: Backend) -> None:
        del self._removals[backend]
        backend.removing = False

    def _finish_removal(self, backend: Backend) -> None:
        self._removals.pop(backend, None)
        self._specs.pop(backend, None)
        self._agent.pop(backend, None)
        self._balancer.drop_backend(backend)
        log.info("backend %s removed", backend.id)
        self.save()

    def agent_says(self, backend: Backend, value: str | None) -> None:
        """A health check's answer carried the agent header: a backend sets its own state,
        when what it asks for changes (so an operator may still override it)."""
        state = (value or "").strip().lower()
        if state not in ADMIN_STATES or self._agent.get(backend) == state:
            return
        self._agent[backend] = state
        if backend in self.pool.backends and backend not in self._removals:
            self._set_state(backend, state, by="the backend's agent header")

    # --- reload -------------------------------------------------------------------------------

    async def reload(self, *, by: str) -> dict[str, Any]:
        """Read the config again and apply the difference; the old config stays on error."""
        if self._loader is None:
            raise ControlError(400, ["this balancer was not started from a config file"])
        try:
            new = self._loader()
        except ConfigError as exc:
            log.error(
                "reload (by %s) rejected, the old config stays: %s", by, "; ".join(exc.problems)
            )
            raise ControlError(400, exc.problems) from None
        balancer = self._balancer
        old = balancer.config
        restart = [
            name
            for name, attr in RESTART_SETTINGS.items()
            if getattr(old, attr) != getattr(new, attr)
        ]
        old_tls, new_tls = old.tls, new.tls
        if (old_tls is None) != (new_tls is None) or (
            old_tls is not None
            and new_tls is not None
            and old_tls.redirect_http_port != new_tls.redirect_http_port
        ):
            restart.append("tls")  # HTTPS turned on or off, or its redirect port; certs reload
        await balancer.apply(new)
        self._state_file = new.state_file
        added, removed, updated = [], [], []
        listed = {str(b.id): b for b in new.backends}
        for backend in list(self.pool.backends):
            if backend.source != "config":
                continue
            wanted = listed.get(str(backend.id))
            if wanted is None:
                if backend not in self._removals:
                    self.remove(backend, DEFAULT_REMOVE_TIMEOUT, why=f"reload by {by}")
                    removed.append(backend.id)
            else:
                if backend in self._removals:  # listed again: stays
                    self._cancel_removal(backend)
                    self.pool.set_state(backend, READY, f"listed again (reload by {by})")
                if backend.config != wanted or backend.health != new.health_for(wanted):
                    if backend.config != wanted:
                        updated.append(backend.id)
                    balancer.update_backend(backend, wanted)
        for config in new.backends:
            existing = self.pool.find(config.id)
            if existing is None:
                balancer.add_backend(
                    new_backend(
                        config, new.health_for(config), balancer.cookie, checked=balancer.checking
                    )
                )
                added.append(config.id)
            elif existing.source != "config":
                log.warning(
                    "reload: backend %s is managed through the API; its entry in the file is"
                    " not applied",
                    existing.id,
                )
        if restart:
            log.warning("reload: %s changed; it takes effect after a restart", ", ".join(restart))
        log.info(
            "reloaded (by %s): %d added, %d removed, %d updated",
            by,
            len(added),
            len(removed),
            len(updated),
        )
        self.save()
        balancer.events.publish(
            {"type": "reload", "by": by, "added": added, "removed": removed, "updated": updated}
        )
        return {
            "reloaded": True,
            "added": added,
            "removed": removed,
            "updated": updated,
            "restartNeeded": restart,
        }

    # --- waiting, ticking ----------------------------------------------------------------------

    def active(self, backend: Backend) -> int:
        """Active connections on ``backend`` in the whole process group."""
        return backend.active + backend.elsewhere

    async def wait_drained(self, backend: Backend, within: float) -> bool:
        """Whether nothing is active on ``backend`` within ``within`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.active(backend) > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        return True

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self._tick()
            except Exception:  # one bad tick must not end runtime control
                log.exception("runtime control tick failed")

    def _tick(self) -> None:
        now = time.monotonic()
        self.pool.ramp(now)
        if self.elsewhere is not None:
            counts = self.elsewhere()
            for backend in self.pool.backends:
                backend.elsewhere = counts.get(str(backend.id), 0)
            if self._balancer.admission.queued:
                self._balancer.admission.wake()  # a backend full fleet-wide may have room now
        wall = time.time()
        leads = self.leads is None or self.leads()  # in a cluster, one instance expires
        for backend in list(self.pool.backends) if leads else ():
            expires = backend.expires_at
            if expires is not None and wall >= expires and backend not in self._removals:
                log.warning(
                    "backend %s: no heartbeat for %gs; draining it for removal",
                    backend.id,
                    backend.ttl or 0,
                )
                self.remove(backend, DEFAULT_REMOVE_TIMEOUT, why="its TTL ran out")
                if self.publish is not None:
                    self.publish({"op": "delete", "id": backend.id, "by": "its TTL"})
        for removal in list(self._removals.values()):
            if self.active(removal.backend) == 0 or now >= removal.deadline:
                self._finish_removal(removal.backend)

    def _close_websockets(self, backend: Backend) -> None:
        within = self._balancer.config.websocket.drain_timeout
        if within is None:
            return
        self._balancer.pipeline.close_tunnels_spread(
            self._balancer.pipeline.tunnels_of(backend), within, SERVICE_RESTART
        )

    # --- state file ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What the API changed, as the state file holds it."""
        entries = {str(b.id): entry for b in self.pool.backends if (entry := self.entry(b))}
        return {"version": 1, "backends": entries}

    def entry(self, backend: Backend) -> dict[str, Any]:
        """What the API changed of one backend (empty: nothing), as the state file holds it."""
        entry: dict[str, Any] = {}
        if backend.admin_state != READY or backend in self._removals:
            entry["adminState"] = backend.admin_state
        if backend.weight_override is not None:
            entry["weight"] = backend.weight_override
        if backend.source != "config":
            entry["source"] = backend.source
            entry["backend"] = self._specs.get(backend, {"url": backend.config.url})
            if backend.ttl is not None:
                entry["ttl"] = format_duration(backend.ttl)
                entry["expiresAt"] = backend.expires_at
        return entry

    def save(self) -> None:
        path = self._state_file
        if not path:
            return
        data = json.dumps(self.snapshot(), indent=1, sort_keys=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            log.error("cannot write stateFile %s: %s", path, exc.strerror or exc)
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def restore(self) -> None:
        path = self._state_file
        if not path or not Path(path).exists():
            return
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            entries = data["backends"]
            assert isinstance(entries, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            log.error("stateFile %s is unreadable; starting without the saved state", path)
            return
        restored = 0
        for key, entry in entries.items():
            try:
                restored += self._restore_one(key, entry, by="the stateFile", tell=False)
            except (ControlError, KeyError, TypeError, ValueError) as exc:
                log.warning("stateFile: backend %s not restored: %s", key, exc)
        if restored:
            log.info("restored the state of %d backend(s) from %s", restored, path)

    def adopt(self, entries: Mapping[str, dict[str, Any]], *, by: str) -> None:
        """Make this balancer's runtime changes the ones ``entries`` (snapshot entries: the
        cluster store's) hold: what they name is set, what they do not is undone."""
        for key, entry in entries.items():
            try:
                self._restore_one(key, entry, by=by, tell=True)
            except (ControlError, KeyError, TypeError, ValueError) as exc:
                log.warning("%s: backend %s not adopted: %s", by, key, exc)
        for backend in list(self.pool.backends):
            if str(backend.id) in entries or backend in self._removals:
                continue
            if backend.source != "config":
                self.remove(backend, DEFAULT_REMOVE_TIMEOUT, why=f"gone from {by}")
            else:
                self._restore_one(str(backend.id), {}, by=by, tell=True)
        self.save()

    def _restore_one(self, key: str, entry: dict[str, Any], *, by: str, tell: bool) -> int:
        """Set one backend as a snapshot entry says (added if it was an API backend); what the
        entry leaves out is the default: ``ready``, the config's weight."""
        if entry.get("source") in ("api", "registered"):
            ttl = entry.get("ttl")
            expires = entry.get("expiresAt")
            if ttl is not None and expires is not None and expires <= time.time():
                return 0
            self._put(backend_id(key), entry["backend"], ttl, by=by)
            if expires is not None:
                self._find(key).expires_at = float(expires)
        backend = self.pool.find(key)
        if backend is None:
            return 0
        weight = entry.get("weight")
        if (None if weight is None else float(weight)) != backend.weight_override:
            self.pool.set_weight(backend, None if weight is None else float(weight))
        state = entry.get("adminState", READY)
        if state in ADMIN_STATES:
            self.pool.set_state(backend, state, f"set from {by}", tell=tell)
        return 1
