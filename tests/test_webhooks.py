"""Webhook alerts against real aiohttp receivers on 127.0.0.1 (one that works, one that is
down, one that is slow)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from .support import FAST_HEALTH, backends, free_port, spawn_balancer, start_app, until

SECRET_HEADER = "hook-secret-value-42"
SECRET_PATH = "/services/T000/B000/slack-path-secret"


class Receiver:
    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.posts: list[dict[str, Any]] = []
        self.delay = delay
        self.status = status

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.json()
            self.posts.append(
                {"path": request.path, "headers": dict(request.headers), "body": body}
            )
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text="ok")

        app = web.Application()
        app.router.add_post("/{tail:.*}", hook)
        return app


async def flip(server: Any, healthy: bool) -> None:
    server.knobs.health_status = 200 if healthy else 503


async def traffic_is_fine(url: str) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.get(url + "/") as resp:
                assert resp.status == 200


async def test_json_and_slack_webhooks_get_each_state_change(tmp_path):
    receiver = Receiver()
    running = await start_app(receiver.app())
    try:
        async with backends("a", "b") as (a, b):
            config = {
                "health": FAST_HEALTH,
                "backends": [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
                "admin": {"token": "t0ken"},
                "webhooks": [
                    {
                        "url": running.url + "/json",
                        "headers": {"X-Hook-Token": SECRET_HEADER},
                        "cooldown": 0,
                    },
                    {
                        "url": running.url + SECRET_PATH,
                        "format": "slack",
                        "events": ["down"],
                        "cooldown": 0,
                    },
                ],
            }
            proc = spawn_balancer(config, tmp_path)
            try:
                await flip(a, False)
                await until(lambda: len(receiver.posts) >= 2)
                await flip(a, True)
                await until(lambda: any(p["body"].get("event") == "up" for p in receiver.posts))
                async with aiohttp.ClientSession() as client:
                    async with client.post(
                        proc.url + "/_lb/backends/b/state",
                        json={"state": "drain"},
                        headers={"Authorization": "Bearer t0ken"},
                    ) as resp:
                        assert resp.status == 200
                await until(lambda: any(p["body"].get("event") == "drain" for p in receiver.posts))
                await traffic_is_fine(proc.url)
            finally:
                assert proc.stop() == 0
    finally:
        await running.stop()
    json_posts = [p for p in receiver.posts if p["path"] == "/json"]
    slack_posts = [p for p in receiver.posts if p["path"] == SECRET_PATH]
    events = [p["body"]["event"] for p in json_posts]
    assert events[:3] == ["down", "up", "drain"]
    down = json_posts[0]["body"]
    assert down["backend"] == "a" and down["healthy"] is False and down["reason"]
    assert down["at"].endswith("Z") and down["summary"] == "Backend a is down"
    assert json_posts[0]["headers"]["X-Hook-Token"] == SECRET_HEADER
    assert [p["body"]["text"].splitlines()[0] for p in slack_posts] == [
        "[stickylb] Backend a is down"
    ]
    assert SECRET_HEADER not in proc.output and "slack-path-secret" not in proc.output


async def test_a_dead_or_slow_receiver_leaves_traffic_alone(tmp_path):
    slow = Receiver(delay=3.0)
    slow_running = await start_app(slow.app())
    dead_port = free_port()
    try:
        async with backends("a", "b") as (a, b):
            config = {
                "health": FAST_HEALTH,
                "backends": [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
                "webhooks": [
                    {"url": f"http://127.0.0.1:{dead_port}/hook", "retries": 0, "cooldown": 0},
                    {
                        "url": slow_running.url + "/slow",
                        "timeout": "1s",
                        "retries": 0,
                        "cooldown": 0,
                    },
                ],
            }
            proc = spawn_balancer(config, tmp_path)
            try:
                await flip(a, False)
                await until(lambda: "failed (attempt 1/1)" in proc.output)
                await traffic_is_fine(proc.url)
                await until(lambda: proc.output.count("failed (attempt 1/1)") >= 2, limit=10)
                await traffic_is_fine(proc.url)
            finally:
                assert proc.stop() == 0
    finally:
        await slow_running.stop()
    failures = [line for line in proc.output.splitlines() if "failed (attempt" in line]
    assert len(failures) == 2, failures
    assert any("ClientConnectorError" in line for line in failures)
    assert any("TimeoutError" in line for line in failures)
    assert "Traceback" not in proc.output


async def test_webhook_config_errors_name_the_field(tmp_path):
    from .support import run_cli

    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "port": 1,
                "backends": [{"id": 0, "url": "http://127.0.0.1:1"}],
                "webhooks": [{"url": "ftp://x", "events": ["exploded"], "format": "xml"}],
            }
        )
    )
    result = run_cli([str(path)], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any("webhooks.0.url:" in line for line in lines)
    assert any("webhooks.0.events:" in line for line in lines)
    assert any("webhooks.0.format:" in line for line in lines)
