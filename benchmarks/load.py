"""Load generators and readings. Every loop is bounded in count and time; 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .peers import LOAD_CORE, pinned

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class HttpResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mib_per_s: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_BYTES = {"B": 1 / 1048576, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}


def _json_body(size: int) -> bytes:
    """A JSON document of exactly ``size`` bytes, shaped like an API call's."""
    items = [{"sku": f"s-{i:03d}", "qty": 1} for i in range(10)]
    document = {"user": "u-1234", "items": items, "note": ""}
    filler = size - len(json.dumps(document))
    document["note"] = "n" * filler
    return json.dumps(document).encode()


JSON_BODY = _json_body(512)


def wrk(
    url: str, seconds: float, connections: int, headers: dict[str, str], body: bytes | None
) -> HttpResult:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if body is not None:  # wrk posts through a script; it lives as long as the run
        script = Path(tempfile.mkdtemp(prefix="stickylb-wrk-")) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body.decode())}\n"
        )
        command += ["-s", str(script)]
    out = subprocess.run(
        pinned([*command, url], LOAD_CORE), capture_output=True, text=True, timeout=seconds + 60
    ).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return HttpResult(
        requests_per_s=float(rps.group(1)) if rps else 0.0,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        mib_per_s=float(transfer.group(1)) * _BYTES[transfer.group(2)] if transfer else 0.0,
        errors=errors + (int(non2xx.group(1)) if non2xx else 0),
    )


async def python_load(
    url: str, seconds: float, connections: int, headers: dict[str, str], body: bytes | None
) -> HttpResult:
    """A bounded fallback when wrk is not installed (it measures less precisely)."""
    latencies: list[float] = []
    received = 0
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal received, errors
        for _ in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            started = time.perf_counter()
            try:
                method = "POST" if body is not None else "GET"
                async with session.request(method, url, headers=headers, data=body) as resp:
                    received += len(await resp.read())
                    errors += resp.status >= 400
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.monotonic() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return HttpResult(
        len(latencies) / elapsed, pct(0.5), pct(0.99), received / elapsed / 1048576, errors
    )


def http_load(
    url: str,
    seconds: float,
    connections: int,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> HttpResult:
    """GET ``url`` (or POST ``body``) from ``connections`` at once for ``seconds``."""
    if shutil.which("wrk"):
        return wrk(url, seconds, connections, headers or {}, body)
    return asyncio.run(python_load(url, seconds, connections, headers or {}, body))


async def ws_echo(
    url: str, pid: int, seconds: float, clients: int = 32, size: int = 64
) -> tuple[float, float]:
    """Messages/s and the proxy's CPU microseconds per message, ping-pong over ``clients``."""
    payload = b"m" * size
    deadline = time.monotonic() + seconds
    count = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal count
        async with session.ws_connect(url, autoping=False, max_msg_size=0) as ws:
            for _ in range(10_000_000):
                if time.monotonic() >= deadline:
                    return
                await ws.send_bytes(payload)
                await ws.receive_bytes()
                count += 1

    async with aiohttp.ClientSession() as session:
        cpu_before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        cpu, elapsed = cpu_seconds(pid) - cpu_before, time.monotonic() - started
    return count / elapsed, cpu / max(count, 1) * 1e6


async def idle_websockets(url: str, pid: int, count: int) -> float:
    """KiB of proxy memory per idle proxied WebSocket, opening ``count`` of them."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm = [await session.ws_connect(url) for _ in range(50)]
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        sockets = []
        for start in range(0, count, 250):
            batch = [session.ws_connect(url) for _ in range(min(250, count - start))]
            sockets += await asyncio.gather(*batch)
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        for ws in sockets + warm:
            await ws.close()
    return (after - before) / count
