"""Theory of operation: several stickylb sharing one view through Redis (``cluster``).

Redis is the source of truth for what runtime control changed, and pub/sub carries each change
to every instance; nothing here is on a request's path. Keys, under ``cluster.name`` (``N``):

- ``N:backends`` (hash): per backend id, what the API changed (admin state, weight, an
  API-added or registered backend with its TTL), as the stateFile holds it. Written by the
  instance that made the change, right after making it locally.
- ``N:ops`` (channel): each operation (``control.py``) as JSON with the instance that made it;
  every other instance carries it out as if made there (a reload reloads its own file).
- ``N:instance:<id>`` (string, expires after ``INSTANCE_TTL``) and ``N:instances`` (sorted set
  by last report): each instance's report four times a second: its active connections per
  backend and the backends its health checks see down. Others add the counts to their own
  (``elsewhere``: ``least-connections`` and ``maxConnections`` use the fleet's sum); a
  vanished instance's report expires within ``INSTANCE_TTL``.
- ``N:learned:<digest>`` (string, expires after the source's ``ttl``) and ``N:learned``
  (channel): application sessions a ``learnCookie`` source learned (``affinity_sources.py``),
  passed on with the reports; an instance that joins later loads them.
- ``N:lease`` (string, ``SET NX PX``): the instance that holds it sends the alerts and
  expires registered backends whose heartbeats stopped, for the whole fleet; it renews it every
  ``leaseTime / 5``, and when it dies another takes it within ``leaseTime``.

When Redis cannot be reached, every instance goes on with what it last knew, logs one line, and
refuses admin writes (503) rather than diverge; when Redis is back it logs one line and either
adopts what Redis holds (changes made while it was away) or, if Redis came back empty, writes
what it holds so the fleet's state returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import ClusterConfig
from .control import ControlError
from .durations import iso
from .tasks import cancel

if TYPE_CHECKING:
    from .app import Balancer

log = logging.getLogger("stickylb.cluster")

REPORT_EVERY = 0.25  # seconds between reports of counts (and reads of the others')
INSTANCE_TTL = 3.0  # seconds: a report older than this is an instance gone
STORE_TIMEOUT = 1.0  # seconds for any one Redis command; the store is never waited on longer
# Renew the lease only if it is still ours (atomic: another instance may hold it by now).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Cluster:
    """This instance's membership of the cluster (see the module's docstring)."""

    def __init__(self, balancer: Balancer, config: ClusterConfig) -> None:
        self._balancer = balancer
        self.config = config
        self.where = config.where()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.started = time.time()
        prefix = config.name
        self._backends_key = f"{prefix}:backends"
        self._channel = f"{prefix}:ops"
        self._instances_key = f"{prefix}:instances"
        self._instance_prefix = f"{prefix}:instance:"
        self._lease_key = f"{prefix}:lease"
        self._learned_channel = f"{prefix}:learned"
        self._learned_prefix = f"{prefix}:learned:"
        self._redis = redis.from_url(
            config.redis.get_secret_value(),
            decode_responses=True,
            socket_timeout=STORE_TIMEOUT,
            socket_connect_timeout=STORE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.connected = False
        self.leader = False
        self.others: dict[str, dict[str, Any]] = {}  # instance id -> its last report
        self._outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._tasks: list[asyncio.Task[None]] = []
        self._ever_connected = False
        self._said_unreachable = False
        control = balancer.control
        control.publish = self._publish
        control.elsewhere = self._elsewhere
        control.store_ok = lambda: self.connected
        # Expiry needs the store (the removal must reach it); alerts go on without it.
        control.leads = lambda: self.leader and self.connected

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._report_forever(), name="stickylb-cluster-report"),
            asyncio.create_task(self._listen_forever(), name="stickylb-cluster-listen"),
            asyncio.create_task(self._send_forever(), name="stickylb-cluster-send"),
        ]

    async def stop(self) -> None:
        await cancel(*self._tasks)
        self._tasks = []
        if self.connected:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.delete(self._instance_prefix + self.id)
                    pipe.zrem(self._instances_key, self.id)
                    pipe.eval(_RELEASE, 1, self._lease_key, self.id)
                    await pipe.execute()
            except (RedisError, OSError):
                pass  # it expires by itself
        self.leader = False
        await self._redis.aclose()

    # --- what this instance tells the others -----------------------------------------------

    def _publish(self, op: dict[str, Any]) -> None:
        """An operation made here: written to Redis and announced (in order, off the caller's
        path). Refused at the API while Redis is away, so nothing is lost here normally."""
        try:
            self._outgoing.put_nowait(op)
        except asyncio.QueueFull:
            log.error("cluster: too many changes waiting for Redis; %s not shared", op.get("op"))

    async def _send_forever(self) -> None:
        while True:
            op = await self._outgoing.get()
            try:
                await self._share(op)
            except (RedisError, OSError) as exc:
                self._lost(exc)
                log.error("cluster: the %s operation was not shared: Redis unavailable", op["op"])

    async def _share(self, op: dict[str, Any]) -> None:
        control = self._balancer.control
        async with self._redis.pipeline(transaction=False) as pipe:
            if op.get("op") in ("state", "weight", "put", "delete"):
                key = str(op.get("id"))
                backend = control.pool.find(key)
                entry = control.entry(backend) if backend is not None else None
                if not entry or op.get("op") == "delete":
                    pipe.hdel(self._backends_key, key)
                else:
                    pipe.hset(self._backends_key, key, json.dumps(entry))
            message = {"from": self.id, "op": op}
            pipe.publish(self._channel, json.dumps(message, separators=(",", ":")))
            await pipe.execute()

    def _report(self) -> dict[str, Any]:
        pool = self._balancer.pool
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "listen": self._balancer.listening,
            "started": self.started,
            "leader": self.leader,
            "active": {str(b.id): b.active for b in pool.backends if b.active},
            # Only what is down: the usual case is an empty list, whatever the fleet's size.
            "down": [str(b.id) for b in pool.backends if not b.healthy],
        }

    async def _report_forever(self) -> None:
        beat = 0
        lease_every = max(1, round(self.config.lease_time / 5 / REPORT_EVERY))
        while True:
            try:
                await self._report_once(lease=beat % lease_every == 0)
            except (RedisError, OSError) as exc:
                self._lost(exc)
            except Exception:  # a bad report must not end the membership
                log.exception("cluster: report failed")
            beat += 1
            await asyncio.sleep(REPORT_EVERY)

    async def _report_once(self, *, lease: bool) -> None:
        now_ms = int(time.time() * 1000)
        ttl_ms = int(INSTANCE_TTL * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._instance_prefix + self.id, json.dumps(self._report()), px=ttl_ms)
            pipe.zadd(self._instances_key, {self.id: now_ms})
            pipe.zrangebyscore(self._instances_key, now_ms - ttl_ms, "+inf")
            if lease:
                pipe.zremrangebyscore(self._instances_key, "-inf", now_ms - 10 * ttl_ms)
            self._share_learned(pipe)
            _, _, alive, *_ = await pipe.execute()
        if not self.connected:
            await self._found()
        others = [other for other in alive if other != self.id]
        keys = [self._instance_prefix + other for other in others]
        reports = await self._redis.mget(keys) if keys else []
        fresh: dict[str, dict[str, Any]] = {}
        for other, raw in zip(others, reports, strict=True):
            if raw:
                try:
                    fresh[other] = json.loads(raw)
                except ValueError:
                    continue
        self.others = fresh
        if lease:
            await self._hold_lease()

    def _share_learned(self, pipe: Any) -> None:
        """What a ``learnCookie`` source learned or forgot since the last report, for the
        others now and for instances that join later (the keys expire with the source's ttl)."""
        learned = self._balancer.sources.learned
        if learned is None:
            return
        learned.shared = True
        changes, learned.changes = learned.changes, []
        if not self.connected or not changes:
            return  # lost while Redis is away: each instance keeps learning for itself
        ttl_ms = int(learned.ttl * 1000)
        rows = []
        for digest, backend_id in changes:
            key = self._learned_prefix + digest.hex()
            if backend_id is None:
                pipe.delete(key)
            else:
                pipe.set(key, backend_id, px=ttl_ms)
            rows.append([digest.hex(), backend_id])
        message = {"from": self.id, "learned": rows}
        pipe.publish(self._learned_channel, json.dumps(message, separators=(",", ":")))

    async def _load_learned(self) -> None:
        """Joining (or back): the sessions the fleet learned, up to this table's size."""
        learned = self._balancer.sources.learned
        if learned is None:
            return
        keys = []
        async for key in self._redis.scan_iter(match=self._learned_prefix + "*", count=1000):
            keys.append(str(key))
            if len(keys) >= learned.max_entries:
                break
        now = time.monotonic()
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            for key, backend_id in zip(batch, await self._redis.mget(batch), strict=True):
                if backend_id:
                    digest = bytes.fromhex(key[len(self._learned_prefix) :])
                    learned.put(digest, str(backend_id), now, tell=False)

    async def _hold_lease(self) -> None:
        ms = int(self.config.lease_time * 1000)
        held = False
        if self.leader:
            held = bool(await self._redis.eval(_RENEW, 1, self._lease_key, self.id, ms))
        if not held:  # not ours, or lost with a store that came back empty: try to take it
            held = bool(await self._redis.set(self._lease_key, self.id, nx=True, px=ms))
        was, self.leader = self.leader, bool(held)
        if self.leader != was:
            log.info(
                "cluster: this instance %s the alerting lease",
                "holds" if self.leader else "no longer holds",
            )

    def _elsewhere(self) -> Mapping[str, int]:
        """Active connections of every other instance, by backend id."""
        total: dict[str, int] = {}
        for report in self.others.values():
            for backend, count in report.get("active", {}).items():
                total[backend] = total.get(backend, 0) + int(count)
        return total

    # --- Redis lost and found ----------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self.connected or not self._said_unreachable:
            log.error(
                "cluster: lost the store at %s (%s); serving with the last known state,"
                " admin writes refused until it is back",
                self.where,
                type(exc).__name__,
            )
        self._said_unreachable = True
        self.connected = False
        self.others = {}  # their counts are stale now; our own still count

    async def _found(self) -> None:
        """Redis answers (at start, or again): take what it holds, or give it ours."""
        held = await self._redis.hgetall(self._backends_key)
        mine = self._balancer.control.snapshot()["backends"]
        if held:
            entries: dict[str, dict[str, Any]] = {}
            expired = []
            for key, raw in held.items():
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if entry.get("expiresAt") is not None and entry["expiresAt"] <= time.time():
                    expired.append(key)  # registered, and its heartbeats stopped while no
                    continue  # instance was there to expire it
                entries[str(key)] = entry
            if expired:
                await self._redis.hdel(self._backends_key, *expired)
            self._balancer.control.adopt(entries, by="the cluster store")
        elif mine:
            await self._redis.hset(
                self._backends_key, mapping={key: json.dumps(e) for key, e in mine.items()}
            )
        await self._load_learned()
        if self._ever_connected:
            log.warning("cluster: the store at %s is back", self.where)
        else:
            log.info("cluster: joined %r at %s as %s", self.config.name, self.where, self.id)
        self._ever_connected = True
        self.connected = True

    # --- what the others tell this instance -------------------------------------------------

    async def _listen_forever(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel, self._learned_channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message.get("channel") == self._learned_channel:
                        self._learn(message.get("data"))
                    else:
                        await self._carry_out(message.get("data"))
            except (RedisError, OSError):
                await asyncio.sleep(REPORT_EVERY)  # the report loop says so, once
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _learn(self, data: object) -> None:
        """Sessions another instance learned or forgot."""
        learned = self._balancer.sources.learned
        try:
            message = json.loads(str(data))
            if learned is None or message["from"] == self.id:
                return
            now = time.monotonic()
            for digest, backend_id in message["learned"]:
                if backend_id is None:
                    learned.forget(bytes.fromhex(digest), tell=False)
                else:
                    learned.put(bytes.fromhex(digest), str(backend_id), now, tell=False)
        except (ValueError, KeyError, TypeError):
            return

    async def _carry_out(self, data: object) -> None:
        try:
            message = json.loads(str(data))
            sender, op = str(message["from"]), message["op"]
        except (ValueError, KeyError, TypeError):
            return
        if sender == self.id:
            return
        try:
            by = f"{op.get('by', '?')}, through instance {sender}"
            await self._balancer.control.execute(op, by=by, local=False)
        except ControlError as exc:
            log.debug("operation from instance %s not applied: %s", sender, exc)
        except Exception:  # a bad message must not end the listener
            log.exception("operation from instance %s failed", sender)

    # --- for /_lb/health and the dashboard ---------------------------------------------------

    def public(self) -> dict[str, Any]:
        """``/_lb/health``'s ``cluster`` and ``instances`` sections: every instance alive (this
        one first) and what its checks see."""
        now = time.time()
        ids = [str(b.id) for b in self._balancer.pool.backends]
        reports = [(self.id, self._report()), *sorted(self.others.items())]
        instances = []
        for instance, report in reports:
            down = set(report.get("down", ()))
            instances.append(
                {
                    "id": instance,
                    "self": instance == self.id,
                    "host": report.get("host"),
                    "pid": report.get("pid"),
                    "listen": report.get("listen", []),
                    "started": iso(report.get("started")),
                    "leader": bool(report.get("leader")),
                    # What its checks see of the backends this instance knows.
                    "sees": {i: "down" if i in down else "up" for i in ids},
                    "activeConnections": sum(report.get("active", {}).values()),
                }
            )
        return {
            "cluster": {
                "name": self.config.name,
                "store": self.where,
                "connected": self.connected,
                "instance": self.id,
                "leader": self.leader,
                "checkedAt": iso(now),
            },
            "instances": instances,
        }
