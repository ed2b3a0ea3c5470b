"""E-mail alerts against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp

from .smtp import MailServer
from .support import (
    FAST_HEALTH,
    backend_status,
    backends,
    free_port,
    lb_status,
    spawn_balancer,
    until,
    wait_for_state,
)


def alert_config(servers, mail: MailServer | None, **email):
    settings = {
        "host": "127.0.0.1",
        "port": mail.port if mail else free_port(),
        "from": "lb@example.test",
        "timeout": 3000,
        "retries": 0,
        **email,
    }
    if mail and mail.ca_file:
        settings["caFile"] = mail.ca_file
    return {
        "health": FAST_HEALTH,
        "email": settings,
        "backends": [
            {"id": s.name, "url": s.url, "owner": f"owner-{s.name}@example.test"} for s in servers
        ],
    }


async def flip(lb_url, server, healthy: bool):
    server.knobs.health_status = 200 if healthy else 503
    await wait_for_state(lb_url, server.name, healthy=healthy)


async def test_down_and_recovered_mails_reach_the_owner(tmp_path):
    with MailServer(tmp_path) as mail:
        async with backends("api-1", "api-2") as servers:
            config = alert_config(servers, mail, to=["ops@example.test"], cooldown=0)
            proc = spawn_balancer(config, tmp_path)
            try:
                await flip(proc.url, servers[0], healthy=False)
                down = (await asyncio.to_thread(mail.inbox.wait_for, 1))[0]
                await flip(proc.url, servers[0], healthy=True)
                up = (await asyncio.to_thread(mail.inbox.wait_for, 2))[1]
            finally:
                assert proc.stop() == 0
    assert down["Subject"] == "[stickylb] Backend api-1 is down"
    assert re.fullmatch(
        r"\[stickylb\] Backend api-1 recovered \(was down \d+\.\d s\)", up["Subject"]
    )
    assert down["From"] == "lb@example.test"
    assert mail.inbox.envelopes[0][1] == ["owner-api-1@example.test", "ops@example.test"]
    body = down.get_content()
    for fragment in (
        "Backend: api-1",
        f"URL: {servers[0].url}",
        "Reason: status 503",
        "Time: ",
        "Load balancer: ",
    ):
        assert fragment in body, body
    assert "UP (recovered)" in up.get_content()


async def test_starttls_with_password_from_the_environment(tmp_path):
    secret = "env-only-smtp-password-93b1"
    with MailServer(tmp_path, security="starttls", user="alerts", password=secret) as mail:
        async with backends("a") as servers:
            config = alert_config(
                servers, mail, security="starttls", auth={"user": "alerts"}, cooldown=0
            )
            proc = spawn_balancer(
                config, tmp_path, "--log-level", "debug", env={"STICKYLB_EMAIL__AUTH__PASS": secret}
            )
            try:
                await flip(proc.url, servers[0], healthy=False)
                await asyncio.to_thread(mail.inbox.wait_for, 1)
                status = await lb_status(proc.url)
            finally:
                assert proc.stop() == 0
    assert secret not in json.dumps(status)
    assert secret not in proc.output
    assert re.search(r"alert mail '.*' to .* sent", proc.output)


async def test_implicit_tls(tmp_path):
    with MailServer(tmp_path, security="tls") as mail:
        async with backends("a") as servers:
            proc = spawn_balancer(alert_config(servers, mail, security="tls", cooldown=0), tmp_path)
            try:
                await flip(proc.url, servers[0], healthy=False)
                messages = await asyncio.to_thread(mail.inbox.wait_for, 1)
            finally:
                assert proc.stop() == 0
    assert messages[0]["Subject"] == "[stickylb] Backend a is down"


async def check_traffic_unaffected(proc_url: str, servers) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(30):
            async with client.get(proc_url + "/", timeout=aiohttp.ClientTimeout(total=2)) as r:
                assert r.status == 200
                assert await r.text() == servers[1].name


async def test_wrong_password_leaves_traffic_alone_and_logs_one_line(tmp_path):
    secret = "wrong-password-5521"
    with MailServer(tmp_path, security="starttls", user="alerts", password="right") as mail:
        async with backends("a", "b") as servers:
            config = alert_config(
                servers,
                mail,
                security="starttls",
                auth={"user": "alerts", "pass": secret},
                cooldown=0,
            )
            proc = spawn_balancer(config, tmp_path)
            try:
                await flip(proc.url, servers[0], healthy=False)
                await check_traffic_unaffected(proc.url, servers)
                await until(lambda: "failed (attempt 1/1)" in proc.output)
            finally:
                assert proc.stop() == 0
    failures = [line for line in proc.output.splitlines() if "alert mail" in line]
    assert len(failures) == 1, failures
    assert "SMTPAuthenticationError" in failures[0]
    assert secret not in proc.output
    assert mail.inbox.messages == []


async def test_unreachable_mail_server_is_retried_then_given_up(tmp_path):
    async with backends("a", "b") as servers:
        config = alert_config(servers, None, retries=1, cooldown=0)
        proc = spawn_balancer(config, tmp_path)
        try:
            await flip(proc.url, servers[0], healthy=False)
            await check_traffic_unaffected(proc.url, servers)
            await until(lambda: "failed (attempt 2/2)" in proc.output, limit=15)
            status = await lb_status(proc.url)
            assert backend_status(status, "b")["healthy"] is True
        finally:
            assert proc.stop() == 0
    assert "Traceback" not in proc.output


async def test_flapping_is_merged_into_one_summary_mail(tmp_path):
    with MailServer(tmp_path) as mail:
        async with backends("flappy") as servers:
            proc = spawn_balancer(alert_config(servers, mail, cooldown=2500), tmp_path)
            try:
                for healthy in (False, True, False, True, False):
                    await flip(proc.url, servers[0], healthy=healthy)
                messages = await asyncio.to_thread(mail.inbox.wait_for, 2)
                await asyncio.sleep(3.0)  # no further mail for the same burst
            finally:
                assert proc.stop() == 0
    assert len(mail.inbox.messages) == 2, [m["Subject"] for m in mail.inbox.messages]
    assert messages[0]["Subject"] == "[stickylb] Backend flappy is down"
    summary = messages[1]
    assert summary["Subject"] == "[stickylb] Backend flappy is flapping: 4 changes, now down"
    assert summary.get_content().count("- ") == 4


async def test_one_recovery_inside_the_cooldown_is_a_recovery_not_flapping(tmp_path):
    with MailServer(tmp_path) as mail:
        async with backends("solo") as servers:
            proc = spawn_balancer(alert_config(servers, mail, cooldown=1500), tmp_path)
            try:
                await flip(proc.url, servers[0], healthy=False)
                await flip(proc.url, servers[0], healthy=True)
                messages = await asyncio.to_thread(mail.inbox.wait_for, 2)
            finally:
                assert proc.stop() == 0
    assert messages[0]["Subject"] == "[stickylb] Backend solo is down"
    assert re.fullmatch(
        r"\[stickylb\] Backend solo recovered \(was down \d+\.\d s\)", messages[1]["Subject"]
    )
    assert "abandoned" not in proc.output
