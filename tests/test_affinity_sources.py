"""Affinity beyond the cookie (issue 17, part 3): ``affinity.sources`` (header, query, ip,
learnCookie), weighted rendezvous hashing, and ``affinity.onFailure``, against real in-process
balancers, real backends and real clients (one of them python-socketio without cookies)."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
import socketio
from aiohttp import web

from stickylb.core.strategies import rendezvous

from .support import (
    FAST_HEALTH,
    LISTEN_RE,
    NAME,
    Running,
    backends,
    backends_config,
    balancer,
    client_session,
    lb_status,
    metric,
    run_cli,
    spawn,
    start_app,
    wait_for_state,
)

COOKIE = "X-Backend-ID"


def config(*servers, sources, **extra) -> dict:
    return {
        "port": 0,
        "backends": backends_config(*servers),
        "health": {"interval": "60s"},
        "affinity": {"sources": sources, **extra.pop("affinity", {})},
        **extra,
    }


def cookieless() -> aiohttp.ClientSession:
    """A client that never sends cookies back (an API client, a mobile app)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())


async def name_of(client: aiohttp.ClientSession, url: str, **kwargs) -> str:
    async with client.get(url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


# --- hashed keys -------------------------------------------------------------------------------


async def test_a_header_keeps_clients_without_cookies_on_one_backend():
    async with backends("a", "b", "c") as servers:
        cfg = config(*servers, sources=[{"header": "X-Session-Id"}])
        async with balancer(cfg) as lb, cookieless() as client:
            homes = {}
            for user in range(24):
                seen = {
                    await name_of(client, lb.url + "/", headers={"X-Session-Id": f"user-{user}"})
                    for _ in range(4)
                }
                assert len(seen) == 1, (user, seen)
                homes[user] = seen.pop()
            assert len(set(homes.values())) == 3  # keys spread over every backend
            # A client placed by the header also gets our cookie, to stick by in a browser.
            async with client.get(lb.url + "/", headers={"X-Session-Id": "user-0"}) as resp:
                assert resp.cookies[COOKIE].value
            status = await lb_status(lb.url)
            assert status["affinity"]["sources"] == ["header"]
            assert status["affinity"]["placed"]["header"] == 24 * 4 + 1
            assert status["affinity"]["placed"]["strategy"] == 0
            assert await metric(lb.url, 'stickylb_affinity_placed_total{source="header"}') == 97
            # Without the header: the strategy places the client.
            await name_of(client, lb.url + "/")
            assert (await lb_status(lb.url))["affinity"]["placed"]["strategy"] == 1


async def test_our_cookie_comes_first():
    async with backends("a", "b") as servers:
        cfg = config(*servers, sources=[{"header": "X-Session-Id"}])
        async with balancer(cfg) as lb, client_session() as client:
            home = await name_of(client, lb.url + "/")  # placed by the strategy, cookie kept
            for user in range(10):  # whatever the header would say, the cookie decides
                assert (
                    await name_of(client, lb.url + "/", headers={"X-Session-Id": str(user)}) == home
                )


async def test_two_balancers_with_the_same_config_agree_with_nothing_shared():
    async with backends("a", "b", "c", "d") as servers:
        cfg = config(*servers, sources=[{"query": "sid"}])
        async with balancer(cfg) as one, balancer(cfg) as two, cookieless() as client:
            for sid in range(20):
                first = await name_of(client, f"{one.url}/?x=1&sid=s{sid}")
                second = await name_of(client, f"{two.url}/?sid=s{sid}")
                assert first == second
            # A query without the parameter is placed by the strategy.
            await name_of(client, one.url + "/?other=1")
            placed = (await lb_status(one.url))["affinity"]["placed"]
            assert placed["query"] == 20 and placed["strategy"] == 1


async def test_ip_affinity_uses_the_forwarded_address_behind_a_trusted_proxy():
    async with backends("a", "b", "c") as servers:
        cfg = config(*servers, sources=[{"ip": True}], trustedProxies=["127.0.0.1/32"])
        async with balancer(cfg) as lb, cookieless() as client:
            homes = collections.defaultdict(set)
            for client_ip in range(1, 31):
                address = f"203.0.113.{client_ip}"
                for _ in range(3):
                    headers = {"X-Forwarded-For": address}
                    homes[address].add(await name_of(client, lb.url + "/", headers=headers))
            assert all(len(seen) == 1 for seen in homes.values())
            assert len({next(iter(seen)) for seen in homes.values()}) > 1
        # Not trusted: X-Forwarded-For is the client's word; its own address decides.
        cfg = config(*servers, sources=[{"ip": True}])
        async with balancer(cfg) as lb, cookieless() as client:
            seen = {
                await name_of(client, lb.url + "/", headers={"X-Forwarded-For": f"198.51.100.{i}"})
                for i in range(1, 21)
            }
            assert len(seen) == 1


async def test_a_down_backend_sends_its_keys_to_their_second_choice_and_back():
    async with backends("a", "b", "c") as servers:
        cfg = config(*servers, sources=[{"header": "X-Session-Id"}], health=FAST_HEALTH)
        async with balancer(cfg) as lb, cookieless() as client:

            async def homes() -> dict[int, str]:
                out = {}
                for user in range(30):
                    headers = {"X-Session-Id": f"u{user}"}
                    out[user] = await name_of(client, lb.url + "/", headers=headers)
                return out

            before = await homes()
            servers[0].knobs.health_status = 503
            await wait_for_state(lb.url, "a", False)
            during = await homes()
            assert "a" not in during.values()
            # Only a's keys moved.
            assert all(during[u] == before[u] for u in before if before[u] != "a")
            servers[0].knobs.health_status = 200
            await wait_for_state(lb.url, "a", True)
            assert await homes() == before


# --- rendezvous hashing --------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    weight: float = 1.0

    @property
    def hash_id(self) -> bytes:
        return self.name.encode() + b"\0"


def test_adding_a_backend_moves_about_one_nth_of_the_keys_all_to_it():
    rng = random.Random(20261130)
    keys = [rng.randbytes(12) for _ in range(20_000)]
    four = [Member(f"b{i}") for i in range(4)]
    five = [*four, Member("b4")]
    before = {key: rendezvous(key, four).name for key in keys}
    after = {key: rendezvous(key, five).name for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(after[key] == "b4" for key in moved)  # nothing moves between the old ones
    assert abs(len(moved) / len(keys) - 1 / 5) < 0.02
    # Removing it again moves exactly those keys back.
    assert {key: rendezvous(key, four).name for key in keys} == before


def test_rendezvous_follows_the_weights():
    rng = random.Random(7)
    members = [Member("light", 1), Member("heavy", 3)]
    counts = collections.Counter(rendezvous(rng.randbytes(8), members).name for _ in range(20_000))
    assert abs(counts["heavy"] / 20_000 - 0.75) < 0.02


# --- learned application sessions --------------------------------------------------------------


HEALTH = web.AppKey("health", list)  # [status]: changed while the app runs


def session_app(name: str) -> web.Application:
    """An application with its own session cookie (a Java app's JSESSIONID)."""

    async def login(request: web.Request) -> web.Response:
        response = web.Response(text=name)
        response.set_cookie("JSESSIONID", f"{name}-{uuid.uuid4().hex}")
        return response

    async def logout(request: web.Request) -> web.Response:
        response = web.Response(text=name)
        response.del_cookie("JSESSIONID")
        return response

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=request.app[HEALTH][0], text="ok")

    app = web.Application()
    app[NAME] = name
    app[HEALTH] = [200]
    app.router.add_get("/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/", page)
    app.router.add_get("/health", health)
    return app


@asynccontextmanager
async def session_backends(*names: str) -> AsyncIterator[list[Running]]:
    servers = [await start_app(session_app(name), handle_signals=False) for name in names]
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def login(client: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    async with client.get(url + "/login") as resp:
        return await resp.text(), resp.cookies["JSESSIONID"].value


async def test_a_learned_session_cookie_brings_clients_back_to_the_backend_that_set_it():
    async with session_backends("a", "b", "c") as servers:
        cfg = config(*servers, sources=[{"learnCookie": "JSESSIONID"}])
        async with balancer(cfg) as lb, cookieless() as client:
            sessions = [await login(client, lb.url) for _ in range(9)]
            assert len({home for home, _ in sessions}) == 3
            for home, session in sessions:
                for _ in range(3):  # only the application's cookie, never ours
                    headers = {"Cookie": f"theme=dark; JSESSIONID={session}"}
                    assert await name_of(client, lb.url + "/", headers=headers) == home
            status = await lb_status(lb.url)
            assert status["affinity"]["learnedSessions"] == 9
            assert status["affinity"]["placed"]["learnCookie"] == 27
            # Logging out clears the cookie: the session is forgotten.
            home, session = sessions[0]
            headers = {"Cookie": f"JSESSIONID={session}"}
            async with client.get(lb.url + "/logout", headers=headers) as resp:
                assert await resp.text() == home
            assert (await lb_status(lb.url))["affinity"]["learnedSessions"] == 8
            # An unknown session is placed by the strategy.
            await name_of(client, lb.url + "/", headers={"Cookie": "JSESSIONID=never-seen"})
            assert (await lb_status(lb.url))["affinity"]["placed"]["strategy"] >= 1


async def test_learned_sessions_are_bounded_by_max_entries():
    async with session_backends("a", "b") as servers:
        cfg = config(*servers, sources=[{"learnCookie": "JSESSIONID", "maxEntries": 5}])
        async with balancer(cfg) as lb, cookieless() as client:
            sessions = [await login(client, lb.url) for _ in range(12)]
            status = await lb_status(lb.url)
            assert status["affinity"]["learnedSessions"] == 5
            assert await metric(lb.url, "stickylb_affinity_learned_sessions") == 5
            # The five most recent are still followed.
            for home, session in sessions[-5:]:
                headers = {"Cookie": f"JSESSIONID={session}"}
                assert await name_of(client, lb.url + "/", headers=headers) == home
            placed = (await lb_status(lb.url))["affinity"]["placed"]
            assert placed["learnCookie"] == 5


async def test_a_learned_session_whose_backend_is_down_moves_and_stays_moved():
    async with session_backends("a", "b") as servers:
        cfg = config(*servers, sources=[{"learnCookie": "JSESSIONID"}], health=FAST_HEALTH)
        async with balancer(cfg) as lb, cookieless() as client:
            home, session = await login(client, lb.url)
            owner = next(s for s in servers if s.name == home)
            owner.app[HEALTH][0] = 503
            await wait_for_state(lb.url, home, False)
            headers = {"Cookie": f"JSESSIONID={session}"}
            elsewhere = await name_of(client, lb.url + "/", headers=headers)
            assert elsewhere != home
            owner.app[HEALTH][0] = 200
            await wait_for_state(lb.url, home, True)
            # The session was re-learned where it went: it does not bounce back.
            assert await name_of(client, lb.url + "/", headers=headers) == elsewhere


# --- onFailure ------------------------------------------------------------------------------------


async def test_on_failure_fail_answers_503_while_the_clients_backend_is_down():
    async with backends("a", "b") as servers:
        cfg = config(
            *servers,
            sources=[{"header": "X-Session-Id"}],
            health=FAST_HEALTH,
            affinity={"onFailure": "fail"},
        )
        async with balancer(cfg) as lb, client_session() as browser, cookieless() as api:
            home = await name_of(browser, lb.url + "/")  # pinned by our cookie
            users = {}
            for user in range(12):
                headers = {"X-Session-Id": f"u{user}"}
                users[user] = await name_of(api, lb.url + "/", headers=headers)
            down = next(s for s in servers if s.name == home)
            down.knobs.health_status = 503
            await wait_for_state(lb.url, home, False)
            for _ in range(2):
                async with browser.get(lb.url + "/") as resp:
                    assert resp.status == 503
            for user, where in users.items():
                async with api.get(lb.url + "/", headers={"X-Session-Id": f"u{user}"}) as resp:
                    assert resp.status == (503 if where == home else 200)
            down.knobs.health_status = 200
            await wait_for_state(lb.url, home, True)
            assert await name_of(browser, lb.url + "/") == home  # back, nobody moved


async def test_on_failure_rebalance_moves_the_client():
    async with backends("a", "b") as servers:
        cfg = config(*servers, sources=[], health=FAST_HEALTH)
        async with balancer(cfg) as lb, client_session() as browser:
            home = await name_of(browser, lb.url + "/")
            next(s for s in servers if s.name == home).knobs.health_status = 503
            await wait_for_state(lb.url, home, False)
            assert await name_of(browser, lb.url + "/") != home


async def test_on_failure_fail_does_not_retry_a_clients_request_elsewhere():
    async with backends("a", "b") as servers:
        cfg = config(*servers, sources=[], affinity={"onFailure": "fail"})
        async with balancer(cfg) as lb, client_session() as browser:
            home = await name_of(browser, lb.url + "/")
            await next(s for s in servers if s.name == home).stop()  # not yet seen as down
            async with browser.get(lb.url + "/") as resp:
                assert resp.status == 502  # its own backend failed; no move to the other


# --- a Socket.IO client that keeps no cookies --------------------------------------------

# python-engineio's WebSocket client needs aiohttp 3.11 (ClientWSTimeout); on the lowest aiohttp
# stickylb allows, the client stays on long-polling (several requests per session all the same).
WEBSOCKET = hasattr(aiohttp, "ClientWSTimeout")


async def socketio_backend(name: str):
    # Short pings: a long-poll pending at disconnect ends within seconds, not half a minute.
    server = socketio.AsyncServer(async_mode="aiohttp", ping_interval=1, ping_timeout=1)
    app = web.Application()
    server.attach(app)

    @server.event
    async def whoami(sid, data):
        return {"backend": name, "echo": data}

    return await start_app(app, handle_signals=False)


@pytest.mark.parametrize(
    ("source", "transports"),
    [
        # The query string is on every request the client makes: long-polling alone works.
        ({"query": "session"}, ["polling", "websocket"] if WEBSOCKET else ["polling"]),
        # Custom headers go only with the handshake and the WebSocket upgrade (not with later
        # long-polling requests): the header source needs the client to upgrade.
        pytest.param(
            {"header": "X-Session-Id"},
            ["polling", "websocket"],
            marks=pytest.mark.skipif(not WEBSOCKET, reason="python-engineio needs aiohttp 3.11"),
        ),
    ],
    ids=["query", "header"],
)
async def test_a_socketio_client_without_cookies_stays_on_one_backend(source, transports):
    servers = [await socketio_backend(name) for name in ("a", "b", "c")]
    try:
        cfg = {
            "port": 0,
            "backends": [{"id": i, "url": s.url} for i, s in enumerate(servers)],
            "health": {"interval": "60s", "path": "/socket.io/?EIO=4&transport=polling"},
            "affinity": {"sources": [source]},
        }
        async with balancer(cfg) as lb:

            async def one_user(user: int) -> set[str]:
                async with cookieless() as session:
                    client = socketio.AsyncClient(http_session=session, reconnection=False)
                    # Long-polling first: several HTTP requests that must reach one backend
                    # (the handshake's sid exists only there); then, maybe, the upgrade.
                    await client.connect(
                        f"{lb.url}/?session=socket-user-{user}",
                        headers={"X-Session-Id": f"socket-user-{user}"},
                        transports=transports,
                        wait_timeout=5,
                    )
                    try:
                        answers = [
                            await client.call("whoami", {"n": n}, timeout=5) for n in range(5)
                        ]
                    finally:
                        await client.disconnect()
                    assert [a["echo"] for a in answers] == [{"n": n} for n in range(5)]
                    return {a["backend"] for a in answers}

            for seen in await asyncio.gather(*(one_user(user) for user in range(4))):
                assert len(seen) == 1
            placed = (await lb_status(lb.url))["affinity"]["placed"]
            assert placed[next(iter(source))] > 0 and placed["strategy"] == 0
    finally:
        for server in servers:
            await server.stop()


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("affinity", "problem"),
    [
        (
            {"sources": [{}]},
            "affinity.sources.0: give exactly one of header, query, ip, learnCookie",
        ),
        (
            {"sources": [{"header": "X-A", "query": "b"}]},
            "affinity.sources.0: give exactly one of header, query, ip, learnCookie",
        ),
        (
            {"sources": [{"header": "X-A", "ttl": "1m"}]},
            "ttl and maxEntries belong to a learnCookie",
        ),
        ({"sources": [{"learnCookie": "X-Backend-ID"}]}, "is stickylb's own cookie"),
        ({"sources": [{"header": "bad name"}]}, "'bad name' is not a valid header name"),
        ({"onFailure": "retry"}, "affinity.onFailure: Input should be 'rebalance' or 'fail'"),
        ({"sources": [{"cookie": "x"}]}, "affinity.sources.0.cookie: unknown key"),
    ],
)
def test_a_bad_affinity_is_one_line_naming_the_field(tmp_path, affinity, problem):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {"port": 1, "backends": [{"id": 0, "url": "http://127.0.0.1:1"}], "affinity": affinity}
        )
    )
    result = run_cli(["--check", str(path)], tmp_path)
    assert result.returncode == 2
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- through the command line ---------------------------------------------------------------


async def test_sources_through_the_command_line_and_a_reload_keeps_learned_sessions(tmp_path):
    path = tmp_path / "config.json"
    async with session_backends("a", "b", "c") as servers:

        def write(sources: list[dict]) -> None:
            path.write_text(json.dumps({**config(*servers, sources=sources), "host": "127.0.0.1"}))

        write([{"header": "X-Session-Id"}, {"learnCookie": "JSESSIONID"}])
        proc = spawn(["-m", "stickylb", str(path)], tmp_path, name="stickylb")
        try:
            url = proc.wait_for(LISTEN_RE.pattern).group(1)
            async with cookieless() as client:
                by_header = {
                    await name_of(client, url + "/", headers={"X-Session-Id": "carol"})
                    for _ in range(6)
                }
                assert len(by_header) == 1
                home, session = await login(client, url)
                headers = {"Cookie": f"JSESSIONID={session}"}
                homes = {await name_of(client, url + "/", headers=headers) for _ in range(6)}
                assert homes == {home}
                write([{"learnCookie": "JSESSIONID"}, {"ip": True}])
                proc.signal(signal.SIGHUP)
                proc.wait_for("reloaded \\(by SIGHUP\\)")
                homes = {await name_of(client, url + "/", headers=headers) for _ in range(6)}
                assert homes == {home}
                status = await lb_status(url)
                assert status["affinity"]["sources"] == ["learnCookie", "ip"]
                assert status["affinity"]["learnedSessions"] == 1
        finally:
            assert proc.stop() == 0


def test_check_prints_each_source_as_written(tmp_path):
    path = tmp_path / "c.json"
    sources = [{"header": "X-Session-Id"}, {"learnCookie": "JSESSIONID", "maxEntries": 10}]
    path.write_text(
        json.dumps(
            {
                "port": 1,
                "backends": [{"id": 0, "url": "http://127.0.0.1:1"}],
                "affinity": {"sources": sources, "onFailure": "fail"},
            }
        )
    )
    result = run_cli(["--check", str(path)], tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout[: result.stdout.rindex("}") + 1])["affinity"]
    assert printed == {
        "sources": [
            {"header": "X-Session-Id"},
            {"learnCookie": "JSESSIONID", "ttl": "1800s", "maxEntries": 10},
        ],
        "onFailure": "fail",
    }
