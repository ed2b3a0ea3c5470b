"""Real backends and helpers for the tests: everything listens on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from stickylb.app import Balancer
from stickylb.config import Config, build_config
from stickylb.server import Server

ROOT = Path(__file__).resolve().parent.parent
GZIP_BODY = gzip.compress(b"hello compressed world " * 100, mtime=0)


class Knobs:
    """What a test may change or read on a running backend."""

    def __init__(self) -> None:
        self.health_status = 200
        self.health_delay = 0.0
        self.fail_next = 0  # answer 503 to this many health checks, then recover
        self.ws_close_code: int | None = None


NAME = web.AppKey("name", str)
SEEN = web.AppKey("seen", list)
KNOBS = web.AppKey("knobs", Knobs)


def backend_app(name: str) -> web.Application:
    """A backend that names itself and offers everything the proxy tests need."""
    # Bodies must reach the handlers exactly as the proxy sent them.
    app = web.Application(handler_args={"auto_decompress": False})
    seen: list[dict[str, Any]] = []
    app[SEEN] = seen
    app[NAME] = name
    knobs = app[KNOBS] = Knobs()

    async def record(request: web.Request) -> None:
        seen.append(
            {"method": request.method, "path": request.path_qs, "headers": dict(request.headers)}
        )

    async def hello(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text=name)

    async def echo(request: web.Request) -> web.Response:
        await record(request)
        body = await request.read()
        return web.json_response(
            {
                "name": name,
                "method": request.method,
                "path": request.path_qs,
                "headers": {k: v for k, v in request.headers.items()},
                "header_lists": {k: request.headers.getall(k) for k in request.headers},
                "body_sha": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
            }
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "0.5")))
        return web.Response(text=name)

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "name": name,
                "size": size,
                "sha": digest.hexdigest(),
                "te": request.headers.get("Transfer-Encoding"),
                "cl": request.headers.get("Content-Length"),
            }
        )

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("length") == "1":
            response.content_length = size
        await response.prepare(request)
        block = b"x" * (1 << 16)
        sent = 0
        while sent < size and request.method != "HEAD":
            part = block[: min(len(block), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(request.query.get("n", "3"))):
            await response.write(f"data: {name}-{i}\n\n".encode())
            await asyncio.sleep(float(request.query.get("gap", "0.3")))
        await response.write_eof()
        return response

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text=name)
        response.set_cookie("session", f"s-{name}")
        response.set_cookie("theme", "dark")
        return response

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = {"ETag": '"v1"'} if code == 304 else {}
        return web.Response(
            status=code, headers=headers, body=None if code in (204, 304) else name.encode()
        )

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def health(request: web.Request) -> web.Response:
        await record(request)
        if knobs.health_delay:
            await asyncio.sleep(knobs.health_delay)
        if knobs.fail_next > 0:
            knobs.fail_next -= 1
            return web.Response(status=503, text="failing")
        return web.Response(status=knobs.health_status, text="ok")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"), autoping=True)
        await sock.prepare(request)
        await sock.send_str(f"hello from {name}")
        while True:
            msg = await sock.receive()
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                knobs.ws_close_code = msg.data if msg.type == aiohttp.WSMsgType.CLOSE else -1
                break
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await sock.close(code=int(code), message=reason.encode())
                    break
                if msg.data.startswith("nap:"):  # stop reading for a while, then count
                    await asyncio.sleep(float(msg.data.split(":", 1)[1]))
                    got = 0
                    while (msg := await sock.receive()).type == aiohttp.WSMsgType.BINARY:
                        got += 1
                    await sock.send_str(f"got:{got}")  # on the first message that is not binary
                    continue
                if msg.data.startswith("flood:"):  # that many 64 KiB binary messages
                    block = bytes(range(256)) * 256
                    for _ in range(int(msg.data.split(":", 1)[1])):
                        await sock.send_bytes(block)
                    continue
                await sock.send_str(f"{name}:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    @web.middleware
    async def record_all(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in ("/", "/echo", "/health", "/ready") and not request.path.startswith(
            "/echo/"
        ):
            await record(request)
        return await handler(request)

    app.middlewares.append(record_all)
    app.router.add_get("/", hello)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/slow", slow)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_get("/download", download, allow_head=True)
    app.router.add_get("/sse", sse)
    app.router.add_get("/gzip", gz)
    app.router.add_get("/cookies", cookies)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/redirect", redirect)
    app.router.add_route("*", "/health", health)
    app.router.add_route("*", "/ready", health)
    app.router.add_get("/ws", ws)
    return app


class Running:
    """A server we started in-process: its app, URL and runner."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: str) -> None:
        self.app = app
        self.runner = runner
        self.url = url

    @property
    def name(self) -> str:
        return self.app[NAME]

    @property
    def knobs(self) -> Knobs:
        return self.app[KNOBS]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_app(app: web.Application, port: int = 0, **runner_kwargs: Any) -> Running:
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return Running(app, runner, f"http://127.0.0.1:{runner.addresses[0][1]}")


async def start_backend(name: str, port: int = 0) -> Running:
    return await start_app(backend_app(name), port, handle_signals=False, shutdown_timeout=1.0)


class RunningBalancer:
    """A balancer we started in-process on stickylb's own server."""

    def __init__(self, server: Server, url: str) -> None:
        self.server = server
        self.url = url

    @property
    def balancer(self) -> Balancer:
        return self.server.balancer

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)


async def start_balancer(
    config_data: dict[str, Any] | Config, **server_kwargs: Any
) -> RunningBalancer:
    if isinstance(config_data, Config):
        config = config_data
    else:
        config = build_config({"host": "127.0.0.1", **config_data})
    server = Server(config, **server_kwargs)
    addresses = await server.start()
    return RunningBalancer(server, addresses[0])


def free_port() -> int:
    """A port nothing listens on right now (for backends that must be dead, or started later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_backend(server: Running, **extra: Any) -> dict[str, Any]:
    """An in-process balancer config in front of one backend, checks slowed to once a minute."""
    return {
        "port": 0,
        "backends": [{"id": server.name, "url": server.url}],
        "health": {"interval": "60s"},
        **extra,
    }


def backends_config(*backends: Running, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": b.name, "url": b.url, **extra} for b in backends]


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    """A browser-like client: keeps cookies, even from IP hosts."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)


# --- real processes -------------------------------------------------------------------------

LISTEN_RE = re.compile(r"listening on (http://[^\s,]+)")


class Process:
    """``python -m stickylb`` (or another command) as a real child process."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.url = ""

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.output)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output}")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def spawn(
    args: list[str],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    name: str = "proc",
    max_files: int | None = None,
) -> Process:
    log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(ROOT),
            env=full_env,
            preexec_fn=limit_files if max_files is not None else None,
        )
    return Process(proc, log_path)


def spawn_balancer(
    config: dict[str, Any],
    tmp_path: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    max_files: int | None = None,
) -> Process:
    path = tmp_path / f"config-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"host": "127.0.0.1", "port": 0, **config}))
    proc = spawn(
        ["-m", "stickylb", str(path), *extra_args],
        tmp_path,
        env=env,
        name="stickylb",
        max_files=max_files,
    )
    proc.url = proc.wait_for(LISTEN_RE.pattern).group(1)
    return proc


def run_cli(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stickylb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


@asynccontextmanager
async def backends(*names: str) -> AsyncIterator[list[Running]]:
    running = [await start_backend(name) for name in names]
    try:
        yield running
    finally:
        for server in running:
            with suppress(Exception):
                await server.stop()


@asynccontextmanager
async def balancer(
    config: dict[str, Any] | Config, **server_kwargs: Any
) -> AsyncIterator[RunningBalancer]:
    lb = await start_balancer(config, **server_kwargs)
    try:
        yield lb
    finally:
        await lb.stop()


async def lb_status(lb_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(lb_url + "/_lb/health") as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


async def metric(lb_url: str, sample: str) -> float:
    """One sample of ``/_lb/metrics``, named with its labels as the text format writes it
    (``stickylb_cluster_connected``, ``stickylb_affinity_placed_total{source="header"}``)."""
    async with aiohttp.ClientSession() as client, client.get(lb_url + "/_lb/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in the metrics")


async def wait_for_state(lb_url: str, backend_id: Any, healthy: bool, limit: float = 10) -> None:
    """Poll /_lb/health until the backend reaches the state (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        status = await lb_status(lb_url)
        for backend in status["backends"]:
            if backend["id"] == backend_id and backend["healthy"] is healthy:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"backend {backend_id} never became healthy={healthy}: {status}")
        await asyncio.sleep(0.05)


FAST_HEALTH = {"interval": 100, "path": "/health", "rise": 1, "fall": 1, "jitter": 0}


def health_probes(server: Running) -> list[dict[str, Any]]:
    return [r for r in server.app[SEEN] if r["path"].split("?")[0] in ("/health", "/ready")]


async def until(predicate: Any, limit: float = 10.0, step: float = 0.05) -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def backend_status(status: dict[str, Any], backend_id: Any) -> dict[str, Any]:
    return next(b for b in status["backends"] if b["id"] == backend_id)


def cyclic_garbage() -> Counter[str]:
    """Type names of the objects that only a garbage-collector pass would free (reference
    cycles), found without freeing them. Callers disable automatic collection first."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return Counter(type(found).__name__ for found in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


class Load:
    """Clients sending GETs until the block ends (bounded: ``limit`` requests each), counting
    who served them and every failure. ``sticky`` clients keep their cookie."""

    def __init__(
        self, url: str, *, clients: int = 6, limit: int = 2000, sticky: bool = False
    ) -> None:
        self.url = url
        self.clients = clients
        self.limit = limit
        self.sticky = sticky
        self.failures: list[Any] = []
        self.served: Counter[str] = Counter()
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done.set()
        await asyncio.gather(*self._tasks)

    async def _client(self) -> None:
        session = client_session() if self.sticky else aiohttp.ClientSession()
        async with session as client:
            for _ in range(self.limit):
                if self._done.is_set():
                    return
                try:
                    async with client.get(self.url) as resp:
                        if resp.status != 200:
                            self.failures.append(resp.status)
                        self.served[await resp.text()] += 1
                except aiohttp.ClientError as exc:
                    self.failures.append(repr(exc))
