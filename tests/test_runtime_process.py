"""Runtime control of real ``python -m stickylb`` processes: reload (API and SIGHUP) under load
with WebSockets open, an invalid reload, the stateFile across a restart, ``stickylb ctl`` and
``--workers 2`` (issue 14)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .support import (
    LISTEN_RE,
    ROOT,
    Load,
    Process,
    backends,
    client_session,
    free_port,
    spawn,
    until,
)

TOKEN = "process-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_config(path: Path, servers: Any, **extra: Any) -> None:
    data = {
        "host": "127.0.0.1",
        "port": extra.pop("port", 0),
        "backends": [{"id": s.name, "url": s.url} for s in servers],
        "health": {"interval": "200ms", "path": "/health", "rise": 1, "fall": 1, "jitter": 0},
        "admin": {"token": TOKEN},
        **extra,
    }
    path.write_text(json.dumps(data))


def start(path: Path, tmp_path: Path, *args: str) -> Process:
    proc = spawn(["-m", "stickylb", str(path), *args], tmp_path, name="stickylb")
    proc.url = proc.wait_for(LISTEN_RE.pattern).group(1)
    return proc


async def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, f"{url}/_lb{path}", json=body, headers=AUTH) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def ids(url: str) -> list[Any]:
    status, listing = await call(url, "GET", "/backends")
    assert status == 200
    return [b["id"] for b in listing["backends"] if not b.get("removing")]


async def test_reload_under_load_keeps_every_request_and_websocket(tmp_path):
    async with backends("a", "b", "c") as (a, b, c):
        path = tmp_path / "config.json"
        write_config(path, [a, b])
        proc = start(path, tmp_path)
        try:
            sockets = []
            async with client_session() as browser:
                for _ in range(4):
                    ws = await browser.ws_connect(proc.url + "/ws")
                    hello = await ws.receive_str()
                    sockets.append((ws, hello.removeprefix("hello from ")))
                    browser.cookie_jar.clear()
                assert {name for _, name in sockets} == {"a", "b"}
                async with Load(proc.url + "/slow?delay=0.01") as load:
                    await asyncio.sleep(0.5)
                    write_config(path, [a, c], strategy="least-connections")
                    status, answer = await call(proc.url, "POST", "/reload")
                    assert status == 200, answer
                    assert answer["added"] == ["c"] and answer["removed"] == ["b"]
                    assert answer["restartNeeded"] == []
                    await until(lambda: load.served["c"] > 0, limit=10)
                    load.served.clear()
                    await asyncio.sleep(0.5)
                assert load.failures == []
                assert set(load.served) == {"a", "c"}
                for ws, name in sockets:
                    await ws.send_str("still there?")
                    assert await ws.receive_str() == f"{name}:still there?"
                    await ws.close()
                status, health = await call(proc.url, "GET", "/health")
                assert health["strategy"] == "least-connections"
        finally:
            assert proc.stop() == 0
        assert "reloaded (by 127.0.0.1): 1 added, 1 removed" in proc.output


async def test_invalid_reload_changes_nothing_and_sighup_reloads(tmp_path):
    async with backends("a", "b") as (a, b):
        path = tmp_path / "config.json"
        write_config(path, [a])
        proc = start(path, tmp_path)
        try:
            path.write_text('{"port": 0, "backends": [{"id": "a", "url": "nope"}], "colour": 1}')
            status, answer = await call(proc.url, "POST", "/reload")
            assert status == 400
            lines = answer["error"].splitlines()
            assert any(line.startswith("backends.0.url:") for line in lines)
            assert any(line.startswith("colour:") for line in lines)
            proc.wait_for("reload .* rejected, the old config stays")
            async with aiohttp.ClientSession() as client, client.get(proc.url + "/") as resp:
                assert resp.status == 200 and await resp.text() == "a"
            proc.signal(signal.SIGHUP)  # still invalid: logged, still serving
            proc.wait_for("reload \\(by SIGHUP\\) rejected")
            write_config(path, [a, b])
            proc.signal(signal.SIGHUP)
            proc.wait_for("reloaded \\(by SIGHUP\\): 1 added")
            assert await ids(proc.url) == ["a", "b"]
            assert proc.proc.poll() is None
        finally:
            assert proc.stop() == 0


async def test_the_state_file_restores_states_after_a_restart(tmp_path):
    async with backends("a", "b", "x") as (a, b, x):
        path = tmp_path / "config.json"
        state = tmp_path / "state.json"
        write_config(path, [a, b], stateFile=str(state))
        proc = start(path, tmp_path)
        try:
            assert (await call(proc.url, "POST", "/backends/a/state", {"state": "maint"}))[0] == 200
            assert (await call(proc.url, "POST", "/backends/b/weight", {"weight": 5}))[0] == 200
            assert (await call(proc.url, "PUT", "/backends/x", {"url": x.url}))[0] == 201
        finally:
            assert proc.stop() == 0
        saved = json.loads(state.read_text())
        assert saved["backends"]["a"]["adminState"] == "maint"
        proc = start(path, tmp_path)
        try:
            status, listing = await call(proc.url, "GET", "/backends")
            assert status == 200
            by_id = {b["id"]: b for b in listing["backends"]}
            assert by_id["a"]["adminState"] == "maint"
            assert by_id["b"]["weight"] == 5 and by_id["b"]["configWeight"] == 1
            assert by_id["x"]["source"] == "api" and by_id["x"]["url"] == x.url
            proc.wait_for("restored the state of 3 backend")
        finally:
            assert proc.stop() == 0


def ctl(path: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if token is not None:
        env["STICKYLB_ADMIN__TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "stickylb", "ctl", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


async def test_ctl_end_to_end(tmp_path):
    async with backends("a", "b", "c") as (a, b, c):
        path = tmp_path / "config.json"
        # ctl finds the balancer through the config's port: give it a fixed one.
        write_config(path, [a, b], port=free_port())
        data = json.loads(path.read_text())
        del data["admin"]["token"]  # the token comes from the environment, as for the balancer
        path.write_text(json.dumps(data))
        proc = spawn(
            ["-m", "stickylb", str(path)],
            tmp_path,
            env={"STICKYLB_ADMIN__TOKEN": TOKEN},
            name="stickylb",
        )
        proc.url = proc.wait_for(LISTEN_RE.pattern).group(1)
        try:
            out = await asyncio.to_thread(ctl, path, "backends")
            assert out.returncode == 0, out.stderr
            header, *rows = out.stdout.splitlines()
            assert header.split()[:3] == ["ID", "HEALTH", "ADMIN"]
            assert [row.split()[0] for row in rows] == ["a", "b"]
            out = await asyncio.to_thread(ctl, path, "drain", "a", "--wait")
            assert out.returncode == 0 and out.stdout.strip() == "backend a: drain and drained"
            out = await asyncio.to_thread(ctl, path, "weight", "b", "3")
            assert out.stdout.strip() == "backend b: weight 3"
            out = await asyncio.to_thread(ctl, path, "add", "c", c.url, "--weight", "2")
            assert out.returncode == 0, out.stderr
            out = await asyncio.to_thread(ctl, path, "--json", "backends")
            listing = json.loads(out.stdout)["backends"]
            assert [(x["id"], x["adminState"]) for x in listing] == [
                ("a", "drain"),
                ("b", "ready"),
                ("c", "ready"),
            ]
            out = await asyncio.to_thread(ctl, path, "ready", "a")
            assert out.stdout.strip() == "backend a: ready"
            out = await asyncio.to_thread(ctl, path, "--timeout", "5s", "remove", "c", "--wait")
            assert out.returncode == 0, out.stderr
            assert await ids(proc.url) == ["a", "b"]
            out = await asyncio.to_thread(ctl, path, "reload")
            assert out.returncode == 0 and out.stdout.startswith("reloaded")
            out = await asyncio.to_thread(ctl, path, "maint", "nope")
            assert out.returncode == 1
            assert out.stderr.strip() == "stickylb ctl: 404: no backend with id 'nope'"
            out = await asyncio.to_thread(ctl, path, "drain", "a", token="guess-xyz")
            assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
            assert "token" in out.stderr and "guess-xyz" not in out.stderr
        finally:
            assert proc.stop() == 0
        out = await asyncio.to_thread(ctl, path, "backends")
        assert out.returncode == 1 and "cannot reach" in out.stderr


async def test_two_workers_share_one_change_and_their_counts(tmp_path):
    async with backends("a", "b") as (a, b):
        path = tmp_path / "config.json"
        write_config(path, [a, b])
        proc = start(path, tmp_path, "--workers", "2")
        try:
            await asyncio.sleep(0.5)
            status, _ = await call(proc.url, "POST", "/backends/a/state", {"state": "drain"})
            assert status == 200
            await asyncio.sleep(1.0)
            for _ in range(20):  # new connections: both workers answer
                status, one = await call(proc.url, "GET", "/backends/a")
                assert one["adminState"] == "drain"
            # One slow request on b: every worker's reads count it.
            async with aiohttp.ClientSession() as client:
                slow = asyncio.create_task(client.get(proc.url + "/slow?delay=2"))
                await asyncio.sleep(1.0)
                for _ in range(20):
                    status, one = await call(proc.url, "GET", "/backends/b")
                    assert one["activeConnections"] == 1
                (await slow).close()
            pids = {int(pid) for pid in __import__("re").findall(r"\[(\d+)\]", proc.output)}
            assert len(pids) >= 2
        finally:
            assert proc.stop() == 0


async def test_admin_state_changes_are_mailed_to_the_owner(tmp_path):
    from .smtp import MailServer

    with MailServer(tmp_path) as mail:
        async with backends("a", "b") as (a, b):
            path = tmp_path / "config.json"
            write_config(path, [a, b])
            data = json.loads(path.read_text())
            data["backends"][0]["owner"] = "owner-a@example.test"
            data["email"] = {"host": "127.0.0.1", "port": mail.port, "cooldown": 0, "retries": 0}
            path.write_text(json.dumps(data))
            proc = start(path, tmp_path)
            try:
                assert (await call(proc.url, "POST", "/backends/a/state", {"state": "drain"}))[
                    0
                ] == 200
                drained = (await asyncio.to_thread(mail.inbox.wait_for, 1))[0]
                assert (await call(proc.url, "POST", "/backends/a/state", {"state": "ready"}))[
                    0
                ] == 200
                ready = (await asyncio.to_thread(mail.inbox.wait_for, 2))[1]
            finally:
                assert proc.stop() == 0
    assert drained["Subject"] == "[stickylb] Backend a is draining"
    assert drained["To"] == "owner-a@example.test"
    assert "set to drain by 127.0.0.1" in drained.get_content()
    assert ready["Subject"] == "[stickylb] Backend a is ready again"
    assert TOKEN not in proc.output


async def test_shutdown_with_drain_timeout_closes_websockets_with_1012(tmp_path):
    async with backends("a") as (a,):
        path = tmp_path / "config.json"
        write_config(path, [a], websocket={"drainTimeout": "1s"})
        proc = start(path, tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                sockets = [await client.ws_connect(proc.url + "/ws") for _ in range(4)]
                for ws in sockets:
                    await ws.receive_str()
                proc.signal(signal.SIGTERM)
                loop = asyncio.get_running_loop()
                started = loop.time()
                closed_at = []
                for ws in sockets:
                    message = await asyncio.wait_for(ws.receive(), 5)
                    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1012
                    closed_at.append(loop.time() - started)
                assert max(closed_at) < 1.5
                assert max(closed_at) - min(closed_at) > 0.3  # spread out, not all at once
            assert await asyncio.to_thread(proc.proc.wait, 10) == 0
        finally:
            proc.stop()


async def test_json_access_log_to_a_file_and_trusted_request_ids(tmp_path):
    async with backends("a") as (a,):
        path = tmp_path / "config.json"
        log_path = tmp_path / "access.log"
        write_config(
            path,
            [a],
            accessLog={"enabled": True, "format": "json", "path": str(log_path)},
            trustedProxies=["127.0.0.1/32"],
        )
        proc = start(path, tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(
                    proc.url + "/", headers={"X-Request-Id": "from-proxy-1"}
                ) as r:
                    assert r.headers["X-Request-Id"] == "from-proxy-1"
                async with client.get(proc.url + "/status/503") as r:
                    generated = r.headers["X-Request-Id"]
            await until(lambda: log_path.exists() and len(log_path.read_text().splitlines()) >= 2)
        finally:
            assert proc.stop() == 0
    first, second = (json.loads(line) for line in log_path.read_text().splitlines()[:2])
    assert first["requestId"] == "from-proxy-1" and first["status"] == 200
    assert first["backend"] == "a" and first["affinity"] == "new" and first["retries"] == 0
    assert first["method"] == "GET" and first["target"] == "/" and first["client"] == "127.0.0.1"
    assert first["totalMs"] >= first["upstreamMs"] >= 0 and first["bytesIn"] > 0
    assert second["requestId"] == generated and second["upstreamStatus"] == 503
