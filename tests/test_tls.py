"""HTTPS in front (issue 17, part 1): real ``python -m stickylb`` processes with certificates from
trustme, real ``ssl`` clients: HTTP, WebSockets and the admin endpoints over TLS, the redirect
port, certificates reloaded on SIGHUP without dropping connections, an encrypted key whose
password comes from the environment."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from cryptography.hazmat.primitives import serialization

from .support import backends, backends_config, free_port, run_cli, spawn

PASSWORD = "key-pass-phrase-7"


def issue(
    ca: trustme.CA, folder: Path, name: str, *, password: str | None = None
) -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    if password is None:
        cert.private_key_pem.write_to_path(str(key_path))
    else:
        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password.encode()),
            )
        )
    return {"cert": str(cert_path), "key": str(key_path)}


def replace_files(files: dict[str, str], new: dict[str, str]) -> None:
    """Overwrite the certificate and key in place, as a renewal (certbot, ...) does."""
    for kind in ("cert", "key"):
        Path(files[kind]).write_bytes(Path(new[kind]).read_bytes())


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def get(url: str, ca: trustme.CA) -> str:
    """One GET over a new TLS connection that trusts ``ca`` only."""
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.get(url + "/") as resp:
            return await resp.text()


def start(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"host": "127.0.0.1", "port": 0, **config}))
    proc = spawn(["-m", "stickylb", str(path)], tmp_path, env=env, name="stickylb")
    proc.url = proc.wait_for(r"listening on (https://[^\s,]+)").group(1)
    proc.config_path = path
    return proc


async def test_http_websockets_and_admin_over_tls_and_the_redirect_port(tmp_path):
    ca = trustme.CA()
    redirect_port = free_port()
    async with backends("a") as (a,):
        proc = start(
            tmp_path,
            {
                "backends": backends_config(a),
                "tls": {**issue(ca, tmp_path, "one"), "redirectHttpPort": redirect_port},
            },
        )
        try:
            connector = aiohttp.TCPConnector(ssl=client_context(ca))
            async with aiohttp.ClientSession(connector=connector) as client:
                async with client.get(proc.url + "/echo") as resp:
                    echoed = await resp.json()
                    assert resp.status == 200 and echoed["name"] == "a"
                    assert echoed["headers"]["X-Forwarded-Proto"] == "https"
                ws = await client.ws_connect(proc.url.replace("https", "wss") + "/ws")
                assert await ws.receive_str() == "hello from a"
                await ws.send_str("over tls")
                assert await ws.receive_str() == "a:over tls"
                await ws.close()
                async with client.get(proc.url + "/_lb/health") as resp:
                    assert resp.status == 200  # the admin check sees the real (loopback) client
            async with aiohttp.ClientSession() as plain:
                url = f"http://127.0.0.1:{redirect_port}/some/path?x=1"
                async with plain.get(url, allow_redirects=False) as resp:
                    assert resp.status == 308
                    assert resp.headers["Location"] == f"{proc.url}/some/path?x=1"
            # A client that speaks plain HTTP to the TLS port costs nothing but a closed socket.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", int(proc.url.rsplit(":", 1)[1])
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.read(), 15)
            writer.close()
        finally:
            assert await asyncio.to_thread(proc.stop) == 0
    assert "Traceback" not in proc.output


async def test_sighup_reloads_the_certificate_without_dropping_connections(tmp_path):
    first_ca, second_ca = trustme.CA(), trustme.CA()
    async with backends("a") as (a,):
        files = issue(first_ca, tmp_path, "first")
        proc = start(tmp_path, {"backends": backends_config(a), "tls": files})
        try:
            old = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_context(first_ca), limit=1)
            )
            async with old:
                async with old.get(proc.url + "/") as resp:
                    assert await resp.text() == "a"
                replace_files(files, issue(second_ca, tmp_path, "second"))
                proc.signal(signal.SIGHUP)
                proc.wait_for("reloaded \\(by SIGHUP\\)")
                async with old.get(proc.url + "/") as resp:  # the kept connection still works
                    assert await resp.text() == "a"
            assert await get(proc.url, second_ca) == "a"  # a new connection: the new one
        finally:
            assert await asyncio.to_thread(proc.stop) == 0


async def test_an_encrypted_key_takes_its_password_from_the_environment(tmp_path):
    ca = trustme.CA()
    async with backends("a") as (a,):
        files = issue(ca, tmp_path, "locked", password=PASSWORD)
        env = {"STICKYLB_TLS__KEY_PASSWORD": PASSWORD}
        proc = start(tmp_path, {"backends": backends_config(a), "tls": files}, env=env)
        try:
            assert await get(proc.url, ca) == "a"
        finally:
            assert await asyncio.to_thread(proc.stop) == 0
        check = run_cli(["--check", str(proc.config_path)], tmp_path, env=env)
        assert check.returncode == 0 and PASSWORD not in check.stdout + check.stderr
        assert PASSWORD not in proc.output
        wrong = run_cli([str(proc.config_path)], tmp_path, env={"STICKYLB_TLS__KEY_PASSWORD": "no"})
        assert wrong.returncode == 2
        assert "tls:" in wrong.stderr and "Traceback" not in wrong.stderr
        missing = json.loads(proc.config_path.read_text())
        missing["tls"]["cert"] = str(tmp_path / "nope.pem")
        proc.config_path.write_text(json.dumps(missing))
        result = run_cli([str(proc.config_path)], tmp_path, env=env)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"stickylb: config error: tls.cert: no such file: {tmp_path / 'nope.pem'}"
        )
