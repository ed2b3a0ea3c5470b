"""The one-command demo, the backend launcher and failover through the example backends."""

from __future__ import annotations

import json
import re
import signal
import socket

import aiohttp
import pytest

from .support import ROOT, client_session, free_port, lb_status, spawn, until, wait_for_state


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_demo_serves_pinned_traffic_to_three_backends_and_stops_cleanly(tmp_path, sig):
    proc = spawn(["-m", "stickylb", "demo", "--port", "0"], tmp_path, name="demo")
    try:
        url = proc.wait_for(r"open in a browser\s+(http://\S+)/").group(1)
        names = set()
        for _ in range(6):
            async with client_session() as client:
                seen = set()
                for _ in range(4):
                    async with client.get(url + "/whoami") as resp:
                        info = await resp.json()
                        seen.add(info["name"])
                assert len(seen) == 1 and info["visits"] == 4
                assert info["port"] > 0
                names |= seen
        assert names == {"backend-1", "backend-2", "backend-3"}
        status = await lb_status(url)
        assert status["total"] == 3 and status["healthy"] == 3
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/", headers={"Accept": "text/html"}) as resp:
                assert "<title>stickylb demo</title>" in await resp.text()
    finally:
        proc.signal(sig)
        assert proc.proc.wait(20) == 0
    assert "Traceback" not in proc.output


async def test_launcher_starts_n_backends_and_stops_them_all(tmp_path):
    first = free_port()
    while True:  # three consecutive free ports
        if all(_port_free(first + i) for i in range(3)):
            break
        first = free_port()
    proc = spawn(
        ["-m", "examples.launch", "-n", "3", "--port", str(first)], tmp_path, name="launch"
    )
    try:
        for i in range(3):
            proc.wait_for(rf"backend-{i + 1} listening on http://127.0.0.1:{first + i}")
        async with aiohttp.ClientSession() as client:
            for i in range(3):
                async with client.get(f"http://127.0.0.1:{first + i}/whoami") as resp:
                    assert (await resp.json())["name"] == f"backend-{i + 1}"
        children = _children(proc.proc.pid)
        assert len(children) == 3
    finally:
        proc.signal(signal.SIGINT)
        assert proc.proc.wait(20) == 0
    assert "stopped 3 backends" in proc.output
    for pid in children:
        assert not _alive(pid)
    for i in range(3):
        assert _port_free(first + i)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


async def test_failover_and_recovery_through_the_example_admin_endpoints(tmp_path):
    proc = spawn(["-m", "stickylb", "demo", "--port", "0"], tmp_path, name="demo")
    try:
        url = proc.wait_for(r"open in a browser\s+(http://\S+)/").group(1)
        await until(lambda: "stickylb listening" in proc.output)
        status = await lb_status(url)
        direct = {b["id"]: b["url"] for b in status["backends"]}
        async with client_session() as client:
            async with client.get(url + "/whoami") as resp:
                first = (await resp.json())["name"]
            ws = await client.ws_connect(url + "/ws")
            assert (await ws.receive_json())["name"] == first
            async with client.post(url + "/admin/fail") as resp:  # reaches the pinned backend
                assert (await resp.json())["name"] == first
            closing = await ws.receive(timeout=5)  # a failing instance drops its WebSockets
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
            await wait_for_state(url, first, healthy=False)
            async with client.get(url + "/whoami") as resp:
                info = await resp.json()
                assert info["name"] != first and info["visits"] == 1
                assert "X-Backend-ID=" in resp.headers.get("Set-Cookie", "")
            async with client.get(url + "/whoami") as resp:
                assert (await resp.json())["name"] == info["name"]
            async with client.ws_connect(url + "/ws") as ws:  # the reconnect follows the cookie
                assert (await ws.receive_json())["name"] == info["name"]
        async with aiohttp.ClientSession() as direct_client:
            async with direct_client.post(direct[first] + "/admin/recover") as resp:
                assert resp.status == 200
        await wait_for_state(url, first, healthy=True)
        names = set()
        for _ in range(9):
            async with client_session() as client, client.get(url + "/whoami") as resp:
                names.add((await resp.json())["name"])
        assert first in names
    finally:
        assert proc.stop() == 0


async def test_config_example_runs_unchanged_with_the_demo_backends(tmp_path):
    config = json.loads((ROOT / "config.example.json").read_text())
    ports = [int(re.search(r":(\d+)$", b["url"]).group(1)) for b in config["backends"]]
    if not all(_port_free(port) for port in [config["port"], *ports]):
        pytest.skip("the ports config.example.json names are busy on this machine")
    proc = spawn(["-m", "stickylb", "demo", "config.example.json"], tmp_path, name="example")
    try:
        proc.wait_for("stickylb listening on")
        url = f"http://127.0.0.1:{config['port']}"
        for backend in config["backends"]:
            await wait_for_state(url, backend["id"], healthy=True)
        status = await lb_status(url)
        checks = {b["id"]: b["healthCheck"] for b in status["backends"]}
        assert checks["backend-2"]["method"] == "HEAD"
        assert checks["backend-3"]["hasCustomFunction"] is True
    finally:
        assert proc.stop() == 0


async def test_embedding_example_mounts_the_balancer_with_a_python_check():
    from examples.embed import make_app
    from stickylb.demo.backend import make_app as make_backend

    from .support import start_app

    servers = [await start_app(make_backend(name), handle_signals=False) for name in ("one", "two")]
    lb = await start_app(
        make_app(ports=tuple(s.port for s in servers), port=0),
        handler_cancellation=True,
        handle_signals=False,
    )
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/local/ping") as resp:
                assert await resp.text() == "pong from the embedding app\n"
            names = set()
            for _ in range(4):
                async with client.get(lb.url + "/whoami") as resp:
                    names.add((await resp.json())["name"])
            assert names == {"one", "two"}
            await wait_for_state(lb.url, "backend-1", healthy=True)
            status = await lb_status(lb.url)
        assert all(b["healthCheck"]["hasCustomFunction"] for b in status["backends"])
        assert all(b["lastFailureReason"] is None for b in status["backends"])
    finally:
        for server in (lb, *servers):
            await server.stop()
