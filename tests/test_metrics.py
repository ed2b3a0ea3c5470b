"""``/_lb/metrics``: Prometheus text from real traffic, parsed with prometheus-client's own
parser; the whole process group with ``--workers 2``."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .support import (
    FAST_HEALTH,
    backends,
    backends_config,
    balancer,
    client_session,
    free_port,
    spawn_balancer,
    until,
)

TOKEN = "metrics-token"


async def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, Any], float]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(url + "/_lb/metrics", headers=headers or {}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values: dict[tuple[str, Any], float], name: str, **labels: str) -> float:
    return values[(name, tuple(sorted(labels.items())))]


async def test_metrics_follow_real_traffic():
    async with backends("a", "b") as (a, b):
        config = {
            "port": 0,
            "backends": [
                *backends_config(a, b),
                {"id": "dead", "url": f"http://127.0.0.1:{free_port()}"},
            ],
            "health": {**FAST_HEALTH, "interval": "60s"},
            "admin": {"token": TOKEN},
            "retries": 2,
        }
        async with balancer(config) as lb:
            await until(lambda: not lb.balancer.pool.find("dead").healthy)
            async with client_session() as browser:
                for _ in range(3):
                    async with browser.get(lb.url + "/") as resp:
                        pinned = await resp.text()
                async with browser.get(lb.url + "/status/404") as resp:
                    assert resp.status == 404
                ws = await browser.ws_connect(lb.url + "/ws")
                await ws.receive_str()
                for i in range(3):
                    await ws.send_str(f"m{i}")
                    await ws.receive_str()
                during = await scrape(lb.url)
                await ws.close()
            async with aiohttp.ClientSession() as stranger:
                headers = {"Cookie": "X-Backend-ID=forged"}
                async with stranger.get(lb.url + "/", headers=headers) as resp:
                    assert resp.status == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )
            assert (await reader.read(100)).startswith(b"HTTP/1.1 400 ")
            writer.close()
            await asyncio.sleep(0.1)
            after = await scrape(lb.url)
    assert (
        value(during, "stickylb_backend_active_connections", backend=pinned, kind="websocket") == 1
    )
    assert (
        value(after, "stickylb_backend_active_connections", backend=pinned, kind="websocket") == 0
    )
    assert value(after, "stickylb_backend_requests_total", backend=pinned, code="2xx") >= 3
    assert value(after, "stickylb_backend_requests_total", backend=pinned, code="4xx") == 1
    assert value(after, "stickylb_backend_requests_total", backend=pinned, code="1xx") == 1
    assert value(after, "stickylb_backend_request_duration_seconds_count", backend=pinned) >= 4
    assert value(after, "stickylb_backend_response_bytes_total", backend=pinned) > 0
    assert (
        value(
            after,
            "stickylb_websocket_messages_total",
            backend=pinned,
            direction="client_to_backend",
        )
        >= 3
    )
    assert (
        value(
            after,
            "stickylb_websocket_messages_total",
            backend=pinned,
            direction="backend_to_client",
        )
        >= 4
    )
    assert value(after, "stickylb_affinity_total", result="new") >= 1
    assert value(after, "stickylb_affinity_total", result="hit") >= 4
    assert value(after, "stickylb_affinity_total", result="invalid") == 1
    assert value(after, "stickylb_responses_total", code="400") == 1
    assert value(after, "stickylb_backend_up", backend="dead") == 0
    assert value(after, "stickylb_backend_up", backend="a") == 1
    assert value(after, "stickylb_health_checks_total", backend="dead", result="fail") >= 1
    assert value(after, "stickylb_backend_state_changes_total", backend="dead", to="down") == 1
    assert value(after, "stickylb_backend_admin_state", backend="a", state="ready") == 1
    assert value(after, "stickylb_backend_weight", backend="a") == 1
    assert value(after, "stickylb_queue_length") == 0
    assert ("process_cpu_seconds_total", ()) in after
    assert any(name == "python_info" for name, _ in after)


async def test_metrics_follow_the_admin_rules():
    async with backends("a") as (a,):
        config = {
            "port": 0,
            "backends": backends_config(a),
            "admin": {"allow": ["10.9.9.9/32"], "token": TOKEN},
        }
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/_lb/metrics") as resp:
                assert resp.status == 404
            values = await scrape(lb.url, {"Authorization": f"Bearer {TOKEN}"})
            assert value(values, "stickylb_backend_up", backend="a") == 1


async def test_retries_and_passive_failures_are_counted():
    async with backends("a") as (a,):
        dead = f"http://127.0.0.1:{free_port()}"
        config = {
            "port": 0,
            "backends": [{"id": "dead", "url": dead}, *backends_config(a)],
            "health": {"enabled": False},
            "retries": 1,
        }
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.get(lb.url + "/") as resp:
                    assert resp.status == 200
            values = await scrape(lb.url)
    assert value(values, "stickylb_backend_retries_total", backend="dead") >= 1
    assert value(values, "stickylb_backend_passive_failures_total", backend="dead") >= 1


async def test_two_workers_scrape_as_one(tmp_path):
    async with backends("a") as (a,):
        proc = spawn_balancer({"backends": backends_config(a)}, tmp_path, "--workers", "2")
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(40):  # new connections: both workers serve some
                    async with client.get(proc.url + "/", headers={"Connection": "close"}) as resp:
                        assert resp.status == 200
            await asyncio.sleep(1.5)  # each worker's samples reach the other
            totals = set()
            for _ in range(6):
                async with aiohttp.ClientSession() as client:
                    values = await scrape(proc.url)
                totals.add(
                    value(values, "stickylb_backend_requests_total", backend="a", code="2xx")
                )
            assert totals == {40}, totals
        finally:
            assert proc.stop() == 0


def test_metric_names_are_in_the_readme():
    from stickylb.metrics import FAMILIES

    from .support import ROOT

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in FAMILIES if f"`{name}" not in readme]
    assert not missing, missing
