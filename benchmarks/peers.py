"""Starting the things being measured: backends, stickylb, HAProxy, nginx. Loopback only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
PROXY_CORE = "0"
LOAD_CORE = "1" if CORES > 1 else "0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(command: list[str], core: str) -> list[str]:
    if CORES > 1 and shutil.which("taskset"):
        return ["taskset", "-c", core, *command]
    return command


def wait_port(port: int, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Running:
    """A started peer: its HTTP port and, for proxies, its WebSocket port; the pids that do the
    proxying (for CPU and memory readings) and every process to stop."""

    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    http_pid: int = 0
    ws_port: int = 0
    ws_pid: int = 0

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start(command: list[str], port: int, name: str, core: str, **kwargs: object) -> Running:
    log = Path(tempfile.gettempdir()) / f"stickylb-bench-{name}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            pinned(command, core),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{name} did not start; its output is in {log}") from None
    return Running(name, port, [proc], http_pid=proc.pid)


def start_backends(workdir: Path, use_nginx: bool) -> tuple[Running, Running, list[int]]:
    """Two HTTP backend ports (nginx when available) and one WebSocket echo backend."""
    ports = [free_port(), free_port()]
    if use_nginx:
        # nginx's worker runs as an unprivileged user: let it read the body it serves
        workdir.chmod(0o755)
        (workdir / "big.bin").write_bytes(b"x" * (1024 * 1024))
        (workdir / "big.bin").chmod(0o644)
        servers = "\n".join(
            f"""server {{ listen 127.0.0.1:{port}; access_log off;
                location = /tiny {{ default_type text/plain; return 200 "ok"; }}
                location = /health {{ default_type text/plain; return 200 "ok"; }}
                location = /big {{ alias {workdir}/big.bin; }} }}"""
            for port in ports
        )
        conf = workdir / "nginx-backend.conf"
        conf.write_text(_nginx_main(workdir, "backend", servers))
        http = start(
            ["nginx", "-c", str(conf), "-g", "daemon off;"], ports[0], "nginx-backend", LOAD_CORE
        )
        wait_port(ports[1])
    else:
        http = start(
            [sys.executable, "-m", "benchmarks.backend", *map(str, ports)],
            ports[0],
            "aiohttp-backend",
            LOAD_CORE,
            cwd=str(ROOT),
        )
        wait_port(ports[1])
    ws_port = free_port()
    ws = start(
        [sys.executable, "-m", "benchmarks.backend", str(ws_port)],
        ws_port,
        "ws-backend",
        LOAD_CORE,
        cwd=str(ROOT),
    )
    return http, ws, ports


def _nginx_main(workdir: Path, tag: str, http_body: str) -> str:
    return f"""worker_processes 1;
pid {workdir}/nginx-{tag}.pid;
error_log {workdir}/nginx-{tag}-error.log;
events {{ worker_connections 16384; }}
http {{
  client_body_temp_path {workdir}/nginx-{tag}-body;
  proxy_temp_path {workdir}/nginx-{tag}-proxy;
  fastcgi_temp_path {workdir}/nginx-{tag}-fastcgi;
  uwsgi_temp_path {workdir}/nginx-{tag}-uwsgi;
  scgi_temp_path {workdir}/nginx-{tag}-scgi;
  keepalive_requests 1000000;
  {http_body}
}}
"""


def start_stickylb(
    workdir: Path, ports: list[int], ws_port: int, loop: str, workers: int = 1
) -> Running:
    port = free_port()
    config = {
        "port": port,
        "host": "127.0.0.1",
        "backends": [{"id": f"b{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports)],
        "health": {"interval": "2s", "path": "/health"},
    }
    ws_config = {
        **config,
        "port": free_port(),
        "backends": [{"id": "ws", "url": f"http://127.0.0.1:{ws_port}"}],
    }
    path = workdir / f"stickylb-{loop}.json"
    path.write_text(json.dumps(config))
    ws_path = workdir / f"stickylb-{loop}-ws.json"
    ws_path.write_text(json.dumps(ws_config))
    extra = ["--workers", str(workers)] if workers > 1 else []
    command = [sys.executable, "-m", "stickylb", "--loop", loop, "--log-level", "warning", *extra]
    http = start([*command, str(path)], port, f"stickylb-{loop}", PROXY_CORE, cwd=str(ROOT))
    ws = start(
        [*command, str(ws_path)],
        ws_config["port"],
        f"stickylb-{loop}-ws",
        PROXY_CORE,
        cwd=str(ROOT),
    )
    http.procs += ws.procs
    http.ws_port, http.ws_pid = ws.port, ws.http_pid
    return http


def start_relay(ports: list[int], ws_port: int) -> Running:
    """``benchmarks.relay`` (the floor of any proxy on asyncio's loop) to the first backend."""
    port, wsp = free_port(), free_port()
    command = [sys.executable, "-m", "benchmarks.relay"]
    http = start([*command, str(port), str(ports[0])], port, "relay", PROXY_CORE, cwd=str(ROOT))
    ws = start([*command, str(wsp), str(ws_port)], wsp, "relay-ws", PROXY_CORE, cwd=str(ROOT))
    http.procs += ws.procs
    http.ws_port, http.ws_pid = ws.port, ws.http_pid
    return http


# One thread, generous limits, keep-alive both ways: what every HAProxy peer here shares.
HAPROXY_HEAD = """global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  option http-keep-alive
"""


def start_haproxy(workdir: Path, ports: list[int], ws_port: int) -> Running:
    port, wsp = free_port(), free_port()
    servers = "\n".join(
        f"  server b{i} 127.0.0.1:{p} cookie b{i} check inter 2s" for i, p in enumerate(ports)
    )
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""{HAPROXY_HEAD}frontend web
  bind 127.0.0.1:{port}
  default_backend app
frontend ws
  bind 127.0.0.1:{wsp}
  default_backend wsapp
backend app
  balance roundrobin
  cookie SERVERID insert indirect nocache
  option forwardfor
{servers}
backend wsapp
  cookie SERVERID insert indirect nocache
  server ws 127.0.0.1:{ws_port} cookie ws
""")
    running = start(["haproxy", "-f", str(conf)], port, "haproxy", PROXY_CORE)
    wait_port(wsp)
    running.ws_port, running.ws_pid = wsp, running.http_pid
    return running


def start_nginx_proxy(workdir: Path, ports: list[int], ws_port: int) -> Running:
    port, wsp = free_port(), free_port()
    upstream = "\n".join(f"server 127.0.0.1:{p};" for p in ports)
    body = f"""
  upstream app {{ {upstream} keepalive 64; }}
  upstream wsapp {{ server 127.0.0.1:{ws_port}; }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{ listen 127.0.0.1:{port}; access_log off;
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header X-Forwarded-For $remote_addr;
      proxy_buffering off; }} }}
  server {{ listen 127.0.0.1:{wsp}; access_log off;
    location / {{ proxy_pass http://wsapp; proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h; }} }}
"""
    conf = workdir / "nginx-proxy.conf"
    conf.write_text(_nginx_main(workdir, "proxy", body))
    running = start(["nginx", "-c", str(conf), "-g", "daemon off;"], port, "nginx", PROXY_CORE)
    wait_port(wsp)
    running.http_pid = running.ws_pid = _nginx_worker(running.http_pid)
    running.ws_port = wsp
    return running


def _nginx_worker(master: int) -> int:
    """nginx proxies in its worker process, not the master."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except FileNotFoundError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.05)
    return master
