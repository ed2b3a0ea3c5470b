"""What a new user trips over first (issue 15, part 6): each one fixed, each one tested."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

from .support import (
    FAST_HEALTH,
    ROOT,
    backends,
    backends_config,
    balancer,
    free_port,
    lb_status,
    run_cli,
    spawn,
    spawn_balancer,
    until,
)


def write(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


BASE = {"port": 1, "backends": [{"id": 0, "url": "http://127.0.0.1:1"}]}


def test_unknown_environment_variables_are_errors_with_a_suggestion(tmp_path):
    path = write(tmp_path, BASE)
    result = run_cli([str(path)], tmp_path, env={"STICKYLB_PORTT": "8080"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "stickylb: config error: STICKYLB_PORTT (environment): unknown setting"
        " (did you mean STICKYLB_PORT?)"
    )
    result = run_cli(["--check", str(path)], tmp_path, env={"STICKYLB_HEALTH__INTERVAL": "soon"})
    assert result.returncode == 2
    assert "health.interval (from STICKYLB_HEALTH__INTERVAL):" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_prints_the_mail_settings_that_will_be_used(tmp_path):
    gmail = {**BASE, "email": {"service": "gmail", "auth": {"user": "me@example.com"}}}
    out = run_cli(["--check", str(write(tmp_path, gmail))], tmp_path)
    email = json.loads(out.stdout)["email"]
    assert (email["host"], email["port"], email["security"]) == ("smtp.gmail.com", 465, "tls")
    assert email["from"] == "me@example.com"
    for extra in ({"port": 465}, {"secure": True}):
        data = {**BASE, "email": {"host": "mail.example.com", **extra}}
        email = json.loads(run_cli(["--check", str(write(tmp_path, data))], tmp_path).stdout)[
            "email"
        ]
        assert (email["port"], email["security"]) == (465, "tls"), extra
    data = {**BASE, "email": {"host": "mail.example.com"}}
    email = json.loads(run_cli(["--check", str(write(tmp_path, data))], tmp_path).stdout)["email"]
    assert (email["port"], email["security"]) == (25, "none")


async def test_health_shows_when_the_last_failure_was():
    async with backends("a") as (a,):
        config = {"port": 0, "backends": backends_config(a), "health": FAST_HEALTH}
        async with balancer(config) as lb:
            status = await lb_status(lb.url)
            assert status["backends"][0]["lastFailureAt"] is None
            a.knobs.fail_next = 1
            await until(lambda: lb.balancer.pool.find("a").last_failure is not None)
            await until(lambda: lb.balancer.pool.find("a").healthy)
            status = await lb_status(lb.url)
            entry = status["backends"][0]
            assert entry["state"] == "up" and entry["lastFailureReason"] == "status 503"
            assert entry["lastFailureAt"].endswith("Z")


async def test_a_host_that_does_not_resolve_is_named(tmp_path):
    async with backends("a") as (a,):
        config = {
            "backends": [
                {"id": "ghost", "url": "http://no-such-host.invalid:8080"},
                *backends_config(a),
            ],
            "health": {**FAST_HEALTH, "interval": "60s"},
            "retries": 0,
        }
        proc = spawn_balancer(config, tmp_path)
        try:
            await until(lambda: "DNS lookup failed for no-such-host.invalid" in proc.output)
            status = await lb_status(proc.url)
            ghost = next(b for b in status["backends"] if b["id"] == "ghost")
            assert ghost["lastFailureReason"] == "DNS lookup failed for no-such-host.invalid"
        finally:
            assert proc.stop() == 0
    assert "connect failed" not in proc.output
    assert "1 backend)" not in proc.output and "2 backends)" in proc.output


async def test_one_backend_is_not_backends(tmp_path):
    async with backends("a") as (a,):
        proc = spawn_balancer({"backends": backends_config(a)}, tmp_path)
        try:
            proc.wait_for(r"\(strategy round-robin, 1 backend\)")
        finally:
            assert proc.stop() == 0


def test_the_launcher_runs_from_any_folder(tmp_path):
    first = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "launch.py"), "-n", "1", "--port", str(first)],
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{first}/whoami", timeout=2) as r:
                    assert json.loads(r.read())["name"] == "backend-1"
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the launched backend never answered")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


async def test_the_demo_banner_tells_how_to_recover_each_backend(tmp_path):
    proc = spawn(["-m", "stickylb", "demo", "--port", "0"], tmp_path, name="demo")
    try:
        proc.wait_for(r"open in a browser")
        for i in (1, 2, 3):
            proc.wait_for(
                rf"recover backend-{i}\s+curl -X POST http://127\.0\.0\.1:\d+/admin/recover"
            )
    finally:
        proc.signal()
        assert proc.proc.wait(20) == 0
    page = (ROOT / "stickylb" / "demo" / "page.html").read_text()
    assert '<meta name="viewport" content="width=device-width' in page
