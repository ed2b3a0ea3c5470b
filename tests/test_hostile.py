"""Hostile and malformed input, through raw sockets: refused, never forwarded, never a crash."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct

import aiohttp
import pytest

from .support import SEEN, backends, balancer, one_backend, run_cli, spawn_balancer
from .test_ws_tunnel import raw_upgrade

SMUGGLING = {
    "cl-and-te": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Content-Length: 5\r\n\r\nabcde",
    "duplicate-cl-same": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "cl-list": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd",
    "cl-negative": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "cl-junk": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: 4a\r\n\r\nabcd",
    "cl-plus": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd",
    "chunk-size-junk": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk-ext-control": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;\x01\r\nabc\r\n0\r\n\r\n",
    "te-unknown": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"0\r\n\r\n",
    "te-chunked-not-last": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-duplicate": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /echo?m=S HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-on-http10": b"POST /echo?m=S HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "obs-fold": b"GET /echo?m=S HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  b\r\n\r\n",
    "bare-lf": b"GET /echo?m=S HTTP/1.1\nHost: x\n\n",
    "nul-in-header": b"GET /echo?m=S HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "two-hosts": b"GET /echo?m=S HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "invalid-utf8-path": b"GET /echo/\xff\xfe?m=S HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n",
}


async def exchange(url: str, raw: bytes, limit: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), limit)
    finally:
        writer.close()


def statuses(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


def answers(raw: bytes) -> list[tuple[int, bytes]]:
    """Pipelined answers with Content-Length, one after another: (status, body)."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        out.append((int(head.split(b" ")[1]), raw[:length]))
        raw = raw[length:]
    return out


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_ambiguous_framing_is_refused_and_never_forwarded(name, caplog):
    async with backends("a") as servers:
        config = one_backend(servers[0], health={"enabled": False})
        async with balancer(config) as lb:
            follow = b"GET /echo?m=FOLLOW HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            answer = await exchange(lb.url, SMUGGLING[name] + follow)
            # 501 for a transfer coding other than chunked (as nginx), 400 for the rest
            assert statuses(answer) == [501 if name == "te-unknown" else 400], answer[:300]
            assert b"Traceback" not in answer
            async with aiohttp.ClientSession() as client, client.get(lb.url + "/") as resp:
                assert resp.status == 200  # the proxy is fine
    forwarded = [r["path"] for r in servers[0].app[SEEN] if "m=" in r["path"]]
    assert forwarded == []
    assert not [r for r in caplog.records if r.levelno >= 40]


async def test_absolute_form_target_goes_to_our_backend_with_its_path_only():
    async with backends("a") as servers:
        config = one_backend(servers[0], health={"enabled": False})
        async with balancer(config) as lb:
            raw = (
                b"GET http://evil.test:9/echo?m=abs HTTP/1.1\r\nHost: evil.test\r\n"
                b"Connection: close\r\n\r\n"
            )
            answer = await exchange(lb.url, raw)
    assert statuses(answer) == [200]
    seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert seen["path"] == "/echo?m=abs"
    assert seen["headers"]["Host"] == servers[0].url.removeprefix("http://")


async def test_junk_on_a_websocket_gets_a_clean_close(caplog):
    async with backends("a") as servers:
        config = one_backend(servers[0], health={"enabled": False})
        async with balancer(config) as lb:
            reader, writer, head = await raw_upgrade(lb.url)
            assert head.startswith(b"HTTP/1.1 101")
            # an unmasked frame with a reserved opcode and a bogus length: a protocol error
            writer.write(bytes([0x8F, 0x7F]) + struct.pack("!Q", 2**62) + os.urandom(64))
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert b"Traceback" not in rest
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(lb.url + "/ws") as ws:
                    assert await ws.receive_str() == "hello from a"
    assert not [r for r in caplog.records if r.levelno >= 40]


async def test_admin_endpoints_need_an_allowed_address_or_the_token():
    async with backends("a") as servers:
        config = one_backend(
            servers[0], admin={"allow": ["10.0.0.0/8"], "token": "s3cret-admin-token"}
        )
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/_lb/health") as resp:
                assert resp.status == 404
            bad = {"Authorization": "Bearer wrong"}
            async with client.get(lb.url + "/_lb/health", headers=bad) as resp:
                assert resp.status == 404
            good = {"Authorization": "Bearer s3cret-admin-token"}
            async with client.get(lb.url + "/_lb/health", headers=good) as resp:
                assert resp.status == 200
                assert "s3cret-admin-token" not in await resp.text()
    assert all("/_lb" not in r["path"] for r in servers[0].app[SEEN])


async def test_admin_prefix_is_configurable_so_backend_paths_are_not_shadowed():
    async with backends("a") as servers:
        config = one_backend(servers[0], admin={"prefix": "/_stickylb"})
        async with balancer(config) as lb, aiohttp.ClientSession() as client:
            async with client.get(lb.url + "/_stickylb/health") as resp:
                assert resp.status == 200
            async with client.get(lb.url + "/_lb/health") as resp:
                assert resp.headers["x-backend-id"] == "a"  # proxied: the backend's own path
    assert "/_lb/health" in [r["path"] for r in servers[0].app[SEEN]]


async def test_no_secret_appears_anywhere_the_process_prints(tmp_path):
    secrets = {
        "smtp": "smtp-pass-7c1e0",
        "header": "health-header-9d2a",
        "cookie": "cookie-secret-4b8f",
        "admin": "admin-token-1f6d",
    }
    async with backends("a", "b") as servers:
        config = {
            "backends": [
                {
                    "id": "a",
                    "url": servers[0].url,
                    "owner": "a@example.test",
                    "healthHeaders": {"X-Token": secrets["header"]},
                },
                {"id": "b", "url": "http://127.0.0.1:9", "owner": "b@example.test"},
            ],
            "health": {"interval": 200, "timeout": 300, "fall": 1},
            "cookie": {"secret": secrets["cookie"]},
            "admin": {"token": secrets["admin"], "allow": []},
            "email": {
                "host": "127.0.0.1",
                "port": 9,
                "auth": {"user": "lb"},
                "retries": 0,
                "cooldown": 0,
            },
        }
        env = {"STICKYLB_EMAIL__AUTH__PASS": secrets["smtp"]}
        proc = spawn_balancer(config, tmp_path, "--log-level", "debug", "--access-log", env=env)
        try:
            outputs = []
            async with aiohttp.ClientSession() as client:
                for path in ("/", "/_lb/health", "/_lb/nothing", "/status/500"):
                    async with client.get(proc.url + path) as resp:
                        outputs.append(await resp.text())
                auth = {"Authorization": f"Bearer {secrets['admin']}"}
                async with client.get(proc.url + "/_lb/health", headers=auth) as resp:
                    outputs.append(await resp.text())
                    assert resp.status == 200
                for _ in range(40):
                    if "alert mail" in proc.output:
                        break
                    await asyncio.sleep(0.1)
        finally:
            proc.stop()
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"port": 1, **config}))
        check = run_cli(["--check", str(path)], tmp_path, env=env)
        bad = dict(config, strategy="nope")
        path.write_text(json.dumps({"port": 1, **bad}))
        failed = run_cli([str(path)], tmp_path, env=env)
    everything = "\n".join([proc.output, *outputs, check.stdout, check.stderr, failed.stderr])
    assert "alert mail" in proc.output and "DOWN" in proc.output
    for secret in secrets.values():
        assert secret not in everything


# --- one regression test per hostile case of issue 13 (client side) ---------------------------


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""


async def test_an_unterminated_head_gets_431_at_the_cap_and_nothing_more_is_read():
    async with backends("a") as servers:
        config = one_backend(servers[0], limits={"maxHeadSize": "16KiB"})
        async with balancer(config) as lb:
            host, port = lb.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(200):  # up to 3.2 MB if the proxy kept reading
                    writer.write(b"X-Pad: " + b"p" * 8000 + b"\r\n")
                    await writer.drain()
            except ConnectionError:
                pass  # refused and closed: it stopped reading, as it should
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert statuses(answer) == [431]
            assert b"ppp" not in answer


async def test_many_unterminated_heads_stay_bounded_and_do_not_stall_others(tmp_path):
    async with backends("a") as servers:
        proc = spawn_balancer(one_backend(servers[0], limits={"maxHeadSize": "16KiB"}), tmp_path)
        try:
            host, port = proc.url.removeprefix("http://").split(":")
            before = proc.rss_kib()
            held = []
            for _ in range(300):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 15_000)
                held.append((reader, writer))
            await asyncio.sleep(0.5)
            grown = proc.rss_kib() - before
            started = asyncio.get_running_loop().time()
            async with aiohttp.ClientSession() as client, client.get(proc.url + "/") as resp:
                assert resp.status == 200
            assert asyncio.get_running_loop().time() - started < 2
            for _, writer in held:  # one more line each: over the cap, refused
                writer.write(b"p" * 2000)
            answers = [await asyncio.wait_for(reader.read(), 5) for reader, _ in held]
            for _, writer in held:
                writer.close()
            assert {tuple(statuses(answer)) for answer in answers} == {(431,)}
            # 300 heads of 15 KB each: at most their size and change, not a copy per read.
            assert grown < 300 * 16 * 3, grown
        finally:
            assert proc.stop() == 0


async def test_refusals_echo_nothing_of_what_the_client_sent():
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        marker = b"SECRET-COOKIE-VALUE-"
        huge = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: s=" + marker * 1000 + b"\r\n\r\n"
        answer = await exchange(lb.url, huge)
        assert statuses(answer) == [431] and marker not in answer
        control = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\x01en-9f3\r\n\r\n"
        answer = await exchange(lb.url, control)
        assert statuses(answer) == [400] and b"tok" not in answer and b"9f3" not in answer
        assert body_of(answer) == b'{"error": "Bad request."}'


async def test_a_websocket_handshake_with_a_body_is_refused_at_once():
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        raw = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        answer = await exchange(lb.url, raw, limit=2)
        assert statuses(answer) == [400]
    assert all(r["path"] != "/ws" for r in servers[0].app[SEEN])


async def test_a_declined_h2c_upgrade_is_plain_http_body_and_pipelined_requests_included():
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        h2c = (
            b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"HTTP2-Settings: AAMAAABkAAQ\r\n"
        )
        raw = (
            b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n" + h2c + b"\r\n"
            b"POST /echo?n=2 HTTP/1.1\r\nHost: x\r\n" + h2c + b"Content-Length: 5\r\n\r\nhello"
            b"GET /echo?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = await exchange(lb.url, raw)
    replies = answers(answer)
    assert [status for status, _ in replies] == [200, 200, 200]
    bodies = [json.loads(body) for _, body in replies]
    assert [b["path"] for b in bodies] == ["/echo?n=1", "/echo?n=2", "/echo?n=3"]
    assert bodies[1]["body_len"] == 5
    for seen in bodies:
        assert "Upgrade" not in seen["headers"] and "HTTP2-Settings" not in seen["headers"]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /p\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /p HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"FROBNICATE /p HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 501),
        (b"GET " + b"/" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ],
)
async def test_what_cannot_be_served_gets_the_status_nginx_gives(raw, status):
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        answer = await exchange(lb.url, raw)
        assert statuses(answer) == [status], answer[:200]
        assert answer.count(b"HTTP/1.") == 1  # and the connection is closed
    assert servers[0].app[SEEN] == [] or all(r["path"] != "/p" for r in servers[0].app[SEEN])


async def test_a_half_closed_client_still_gets_its_answer():
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        host, port = lb.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        writer.write_eof()  # shutdown(SHUT_WR): "that is all I will send"
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert statuses(answer) == [200] and body_of(answer) == b"a"


@pytest.mark.parametrize(
    "path", ["//_lb/health", "/./_lb/health", "/x/../_lb/health", "/_lb%2Fhealth", "/%5Flb/health"]
)
async def test_any_spelling_of_the_admin_prefix_is_answered_by_the_balancer(path):
    async with backends("a") as servers, balancer(one_backend(servers[0])) as lb:
        answer = await exchange(
            lb.url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert statuses(answer) == [200], answer[:200]
        assert b"x-backend-id" not in answer.lower()
        assert json.loads(body_of(answer))["total"] == 1
    assert not [r for r in servers[0].app[SEEN] if "lb" in r["path"].lower()]


async def test_control_frames_over_125_bytes_or_fragmented_close_both_sides_with_1002():
    async with backends("a") as servers:
        for bad in (
            bytes([0x89, 0xFE, 0, 126]) + os.urandom(4) + b"p" * 126,  # a 126-byte ping
            bytes([0x89, 0xFF]) + struct.pack("!Q", 2**62) + os.urandom(4),  # "2^62 bytes"
            bytes([0x09, 0x84]) + os.urandom(4) + b"ping",  # a ping without FIN
        ):
            servers[0].knobs.ws_close_code = None
            async with balancer(one_backend(servers[0])) as lb:
                reader, writer, _ = await raw_upgrade(lb.url)
                hello = await asyncio.wait_for(reader.readexactly(2), 5)
                await reader.readexactly(hello[1] & 0x7F)  # "hello from a"
                writer.write(bad + b"p" * 10_000)
                rest = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert rest[:4] == b"\x88\x10\x03\xea", rest[:20]  # close, 1002
                for _ in range(50):
                    if servers[0].knobs.ws_close_code is not None:
                        break
                    await asyncio.sleep(0.05)
                assert servers[0].knobs.ws_close_code == 1002


async def test_a_head_trickled_in_pieces_is_read_once_and_a_long_line_refused_early():
    async with backends("a") as servers:
        config = one_backend(servers[0], limits={"maxHeaderSize": 2048})
        async with balancer(config) as lb:
            host, port = lb.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            head = b"GET /echo?t=1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1500 + b"\r\n\r\n"
            for start in range(0, len(head), 7):  # many small writes, each read on its own
                writer.write(head[start : start + 7])
                await writer.drain()
                await asyncio.sleep(0.0005)
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert answer.startswith(b"HTTP/1.1 200 ")
            writer.close()
            # A line that will never end is refused once it passes the limit, whatever the
            # head limit (64 KiB) still allows.
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            try:
                for _ in range(100):
                    writer.write(b"e" * 100)
                    await writer.drain()
                    await asyncio.sleep(0.001)
            except ConnectionError:
                pass
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert statuses(answer) == [431] and b"eee" not in answer
