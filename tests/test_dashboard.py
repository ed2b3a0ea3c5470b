"""The dashboard (``/_lb/``) and the demo page in a real browser: Debian's ``chromium`` driven by
Playwright, against ``python -m stickylb`` processes. ``.ci/run`` installs chromium; without it
these tests are skipped locally (``REQUIRE_BROWSER=1`` makes that a failure)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .support import FAST_HEALTH, backends, backends_config, spawn, spawn_balancer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("REQUIRE_BROWSER") != "1":
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402

from .redis_server import REDIS_SERVER, RedisServer  # noqa: E402

TOKEN = "dashboard-token"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None, "REQUIRE_BROWSER=1 but chromium is not installed"
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Browser, url: str, **options: Any) -> Page:
    context = await browser.new_context(**options)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    return page


@pytest.mark.browser
async def test_dashboard_follows_failures_and_drains_from_the_page(browser, tmp_path):
    async with backends("a", "b", "c") as (a, b, c):
        config = {
            "backends": backends_config(a, b, c),
            "health": {**FAST_HEALTH, "interval": "300ms"},
            "admin": {"token": TOKEN},
        }
        proc = spawn_balancer(config, tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(9):
                    async with client.get(proc.url + "/") as resp:
                        assert resp.status == 200
            page = await open_page(browser, proc.url + "/_lb")  # redirected to /_lb/
            assert page.url.endswith("/_lb/")
            rows = page.locator("#backends tr")
            await expect(rows).to_have_count(3)
            for name in ("a", "b", "c"):
                await expect(page.locator(f'tr[data-backend="{name}"] .state')).to_have_text("UP")
            await expect(page.locator("#connection")).to_have_text("live")

            # A backend that fails its checks turns DOWN on the open page, no reload.
            b.knobs.health_status = 503
            await expect(page.locator('tr[data-backend="b"] .state')).to_have_text(
                "DOWN", timeout=5000
            )
            await expect(page.locator("#log li").first).to_contain_text("backend b DOWN")

            # Drain from the page: refused without the token, done with it.
            await page.click('tr[data-backend="c"] button[data-state="drain"]')
            await expect(page.locator("#message")).to_contain_text("token")
            await page.fill("#token", TOKEN)
            await page.dispatch_event("#token", "change")
            await page.click('tr[data-backend="c"] button[data-state="drain"]')
            await expect(page.locator('tr[data-backend="c"] .state')).to_have_text(
                "DRAIN", timeout=5000
            )
            await expect(page.locator("#log")).to_contain_text("backend c DRAIN")
            async with (
                aiohttp.ClientSession() as client,
                client.get(proc.url + "/_lb/backends/c") as resp,
            ):
                assert (await resp.json())["adminState"] == "drain"

            # Readable on a phone, and in dark mode.
            viewport = await page.evaluate("document.querySelector('meta[name=viewport]').content")
            assert "width=device-width" in viewport
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            dark = await open_page(
                browser,
                proc.url + "/_lb/",
                color_scheme="dark",
                viewport={"width": 390, "height": 844},
            )
            await expect(dark.locator("#backends tr")).to_have_count(3)
            background = await dark.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(13, 17, 23)"
            await dark.screenshot(path=str(tmp_path / "dashboard-phone-dark.png"), full_page=True)
            assert page.errors == [] and dark.errors == []  # type: ignore[attr-defined]
        finally:
            assert await asyncio.to_thread(proc.stop) == 0
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


async def test_events_stream_for_scripts(tmp_path):
    async with backends("a") as (a,):
        proc = spawn_balancer(
            {"backends": backends_config(a), "health": {**FAST_HEALTH, "interval": "200ms"}},
            tmp_path,
        )
        try:
            async with (
                aiohttp.ClientSession() as client,
                client.get(proc.url + "/_lb/events") as resp,
            ):
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                seen: list[dict[str, Any]] = []
                a.knobs.health_status = 503
                async with asyncio.timeout(10):
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            seen.append(json.loads(line[6:]))
                        if any(e["type"] == "state" for e in seen) and any(
                            e["type"] == "stats" for e in seen
                        ):
                            break
        finally:
            assert await asyncio.to_thread(proc.stop) == 0
    assert seen[0]["type"] == "hello"
    state = next(e for e in seen if e["type"] == "state")
    assert state["backend"] == "a" and state["event"] == "down" and state["reason"]
    stats = next(e for e in seen if e["type"] == "stats")
    assert {
        "id",
        "healthy",
        "adminState",
        "http",
        "websockets",
        "rps",
        "errorRate",
        "p50",
        "p95",
    } <= set(stats["backends"][0])


@pytest.mark.browser
async def test_the_demo_page_follows_a_failover(browser, tmp_path):
    proc = spawn(["-m", "stickylb", "demo", "--port", "0"], tmp_path, name="demo")
    try:
        url = proc.wait_for(r"open in a browser\s+(http://\S+)/").group(1)
        page = await open_page(browser, url + "/")
        await expect(page.locator("#http-name")).to_contain_text("backend-", timeout=10000)
        await expect(page.locator("#ws-name")).to_contain_text("backend-", timeout=10000)
        first = (await page.locator("#http-name").text_content() or "").split(" ")[0]
        await page.click("#fail")
        # The demo's checks notice, the page's next polls land on another backend.
        await expect(page.locator("#http-name")).not_to_contain_text(first, timeout=15000)
        await expect(page.locator("#log")).to_contain_text("HTTP now served by", timeout=5000)
        await expect(page.locator("#backends")).to_contain_text("DOWN", timeout=10000)
        await page.screenshot(path=str(tmp_path / "demo.png"))
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        proc.signal()
        assert await asyncio.to_thread(proc.proc.wait, 20) == 0


@pytest.mark.browser
async def test_the_dashboard_shows_the_cluster_instances(browser, tmp_path):
    if REDIS_SERVER is None:
        if os.environ.get("REQUIRE_REDIS") == "1":
            raise AssertionError("REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    store = RedisServer(tmp_path)
    store.start()
    try:
        async with backends("a", "b") as (a, b):
            config = {
                "backends": backends_config(a, b),
                "health": {**FAST_HEALTH, "interval": "300ms"},
                "cluster": {"redis": store.url, "name": "dashboard"},
            }
            one = spawn_balancer(config, tmp_path)
            two = spawn_balancer(config, tmp_path)
            try:
                page = await open_page(browser, one.url + "/_lb/")
                await expect(page.locator("#instances tr")).to_have_count(2, timeout=5000)
                await expect(page.locator("#store")).to_contain_text("store connected")
                await expect(page.locator("#instances")).to_contain_text("(this one)")
                sees_down = page.locator("#instances td:nth-child(5)")
                await expect(sees_down).to_have_text(["none", "none"])
                b.knobs.health_status = 503  # both instances see it down
                await expect(sees_down).to_have_text(["b", "b"], timeout=5000)
                await page.screenshot(path=str(tmp_path / "dashboard-cluster.png"), full_page=True)
                assert page.errors == []  # type: ignore[attr-defined]
            finally:
                assert await asyncio.to_thread(one.stop) == 0
                assert await asyncio.to_thread(two.stop) == 0
    finally:
        store.stop()
