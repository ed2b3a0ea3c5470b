"""The command line as a user runs it: real ``python -m stickylb`` processes."""

from __future__ import annotations

import json
import signal
import socket

import aiohttp
import pytest

from .support import backends, run_cli, spawn, spawn_balancer

NODE_README_CONFIG = {
    "port": 3001,
    "strategy": "round-robin",
    "backends": [
        {
            "id": 0,
            "url": "http://localhost:5000",
            "weight": 2,
            "healthPath": "/health",
            "healthMethod": "GET",
            "owner": "your-email@example.com",
        },
        {
            "id": 1,
            "url": "http://localhost:5001",
            "weight": 1,
            "healthPath": "/ready",
            "healthMethod": "HEAD",
            "healthTimeout": 5000,
            "owner": "your-email@example.com",
        },
    ],
    "health": {"interval": 10000, "timeout": 2000, "algorithm": "http-status"},
    "email": {
        "service": "gmail",
        "auth": {"user": "your-email@gmail.com", "pass": "your-app-password"},
    },
}


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def check_fails(tmp_path, data, *expected):
    result = run_cli([str(write(tmp_path, data))], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("stickylb: config error: ") for line in lines), lines
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    return lines


GOOD = {"port": 3001, "backends": [{"id": 0, "url": "http://127.0.0.1:5000"}]}


def test_invalid_json_names_line_and_column(tmp_path):
    check_fails(tmp_path, '{\n  "port": 3001,\n  "backends": [,]\n}', "line 3, column 16")


def test_missing_file(tmp_path):
    result = run_cli([str(tmp_path / "nope.json")], tmp_path)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_missing_or_empty_backends_and_missing_port(tmp_path):
    check_fails(tmp_path, {"port": 1}, "backends: required")
    check_fails(tmp_path, {"port": 1, "backends": []}, "backends: must list at least one backend")
    check_fails(tmp_path, {"backends": GOOD["backends"]}, "port: required")


def test_duplicate_ids(tmp_path):
    data = {"port": 1, "backends": [{"id": 0, "url": "http://a"}, {"id": 0, "url": "http://b"}]}
    check_fails(tmp_path, data, "backends.1.id: duplicate id 0")


def test_unknown_strategy_lists_valid_ones(tmp_path):
    check_fails(
        tmp_path,
        {**GOOD, "strategy": "fastest"},
        "strategy: unknown strategy 'fastest'; valid: round-robin, least-connections, random",
    )


def test_bad_urls_and_weights_one_line_each(tmp_path):
    data = {
        "port": 1,
        "backends": [
            {"id": 0, "url": "ftp://x"},
            {"id": 1, "url": "http://"},
            {"id": 2, "url": "http://ok", "weight": -1},
        ],
    }
    lines = check_fails(tmp_path, data, "backends.0.url:", "backends.1.url:", "backends.2.weight:")
    assert len(lines) == 3
    check_fails(
        tmp_path,
        {"port": 1, "backends": [{"id": 0, "url": "http://a", "weight": 0}]},
        "weights add up to 0",
    )


def test_unknown_keys_with_did_you_mean(tmp_path):
    data = {
        **GOOD,
        "stratgy": "random",
        "health": {"intreval": 5},
        "backends": [{"id": 0, "url": "http://a", "helthPath": "/h"}],
    }
    check_fails(
        tmp_path,
        data,
        "stratgy: unknown key (did you mean 'strategy'?)",
        "health.intreval: unknown key (did you mean 'interval'?)",
        "backends.0.helthPath: unknown key (did you mean 'healthPath'?)",
    )


def test_check_prints_resolved_settings_with_secrets_masked(tmp_path):
    data = {
        **NODE_README_CONFIG,
        "cookie": {"secret": "cookie-secret-value"},
        "backends": [
            {
                **NODE_README_CONFIG["backends"][0],
                "healthHeaders": {"X-Token": "header-secret-value"},
            }
        ],
    }
    result = run_cli(["--check", str(write(tmp_path, data))], tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["strategy"] == "round-robin"
    assert resolved["backends"][0]["resolvedHealthCheck"]["path"] == "/health"
    assert resolved["health"]["interval"] == "10s"
    for secret in ("your-app-password", "cookie-secret-value", "header-secret-value"):
        assert secret not in result.stdout + result.stderr


def test_check_with_snake_case_and_duration_strings(tmp_path):
    data = {
        "port": 1,
        "backends": [{"id": "x", "url": "http://a", "health_path": "/h", "health_timeout": "1.5s"}],
        "health": {"interval": "2m"},
        "backend_header": False,
    }
    result = run_cli(["--check", str(write(tmp_path, data))], tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["backends"][0]["resolvedHealthCheck"]["timeout"] == 1500
    assert resolved["health"]["interval"] == "120s"
    assert resolved["backendHeader"] is False


def test_environment_overrides_the_file(tmp_path):
    env = {
        "STICKYLB_PORT": "4321",
        "STICKYLB_EMAIL__AUTH__PASS": "from-env-secret",
        "STICKYLB_STRATEGY": "random",
    }
    result = run_cli(["--check", str(write(tmp_path, NODE_README_CONFIG))], tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["port"] == 4321 and resolved["strategy"] == "random"
    assert "from-env-secret" not in result.stdout


def test_bad_check_import_fails_check(tmp_path):
    data = {**GOOD, "health": {"check": "no_such_module_xyz:check"}}
    result = run_cli(["--check", str(write(tmp_path, data))], tmp_path)
    assert result.returncode == 2
    assert "health.check: cannot import 'no_such_module_xyz'" in result.stderr
    (tmp_path / "mychecks.py").write_text("not_callable = 3\n")
    data = {**GOOD, "health": {"check": "mychecks:not_callable"}}
    result = run_cli(["--check", str(write(tmp_path, data))], tmp_path)
    assert result.returncode == 2 and "is not callable" in result.stderr


def test_version():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "stickylb", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.startswith("stickylb ")


def test_port_in_use_exits_with_one_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        data = {"port": port, "host": "127.0.0.1", "backends": GOOD["backends"]}
        result = run_cli([str(write(tmp_path, data))], tmp_path)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


async def test_node_readme_config_starts_and_serves(tmp_path):
    async with backends("node-a", "node-b") as servers:
        config = json.loads(json.dumps(NODE_README_CONFIG))
        for backend, server in zip(config["backends"], servers, strict=True):
            backend["url"] = server.url.replace("127.0.0.1", "localhost")
        config["port"] = 0
        proc = spawn_balancer(config, tmp_path)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(proc.url + "/") as resp:
                    assert resp.status == 200
                    assert await resp.text() in ("node-a", "node-b")
                async with client.get(proc.url + "/_lb/health") as resp:
                    status = await resp.json()
            assert status["total"] == 2
            assert status["backends"][1]["healthCheck"] == {
                "path": "/ready",
                "method": "HEAD",
                "algorithm": "http-status",
                "timeout": 5000,
                "hasCustomHeaders": False,
                "hasCustomFunction": False,
            }
        finally:
            assert proc.stop() == 0
        assert "your-app-password" not in proc.output
        assert "Traceback" not in proc.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signals_stop_cleanly(tmp_path, sig):
    async with backends("a") as servers:
        proc = spawn_balancer({"backends": [{"id": "a", "url": servers[0].url}]}, tmp_path)
        async with aiohttp.ClientSession() as client, client.get(proc.url + "/") as resp:
            assert await resp.text() == "a"
        proc.signal(sig)
        assert proc.proc.wait(20) == 0
        assert "stickylb stopped" in proc.output


def test_usage_error_without_config(tmp_path):
    proc = spawn(["-m", "stickylb"], tmp_path)
    assert proc.proc.wait(20) == 2
    assert "usage:" in proc.output


def test_malloc_is_tuned_for_streaming_unless_the_operator_tuned_it(monkeypatch):
    import platform

    from stickylb.memory import tune_malloc

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert tune_malloc() is False  # the operator's setting wins
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
