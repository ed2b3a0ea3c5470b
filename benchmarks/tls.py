"""HTTPS in front: stickylb terminating TLS next to HAProxy terminating TLS, side by side.

    python -m benchmarks.tls                 # 5 s per measurement, 3 interleaved repeats

Two numbers per peer: requests/s of small GETs on kept-alive TLS connections, and new TLS
connections per second (one GET each, ``Connection: close``: a full handshake every time,
the cost a client without session resumption brings). The certificate is a fresh one from
trustme (ECDSA P-256), the same file for both. Needs wrk and HAProxy; loopback only, bounded
in time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import trustme

from . import load, peers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (shutil.which("wrk") and shutil.which("haproxy")):
        print("benchmarks.tls needs wrk and haproxy", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="stickylb-tls-"))
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_path, key_path, both = workdir / "cert.pem", workdir / "key.pem", workdir / "both.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    cert.private_key_and_cert_chain_pem.write_to_path(str(both))

    http, ws, ports = peers.start_backends(workdir, use_nginx=shutil.which("nginx") is not None)
    sticky_port, haproxy_port = peers.free_port(), peers.free_port()
    config = {
        "port": sticky_port,
        "host": "127.0.0.1",
        "tls": {"cert": str(cert_path), "key": str(key_path)},
        "backends": [{"id": f"b{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports)],
        "health": {"interval": "2s", "path": "/health"},
    }
    (workdir / "stickylb.json").write_text(json.dumps(config))
    servers = "\n".join(f"  server b{i} 127.0.0.1:{p} check inter 2s" for i, p in enumerate(ports))
    (workdir / "haproxy.cfg").write_text(f"""{peers.HAPROXY_HEAD}frontend web
  bind 127.0.0.1:{haproxy_port} ssl crt {both} alpn http/1.1
  default_backend app
backend app
  balance roundrobin
  option forwardfor
{servers}
""")
    command = [sys.executable, "-m", "stickylb", "--loop", "uvloop", "--log-level", "warning"]
    running = {
        "stickylb-uvloop": peers.start(
            [*command, str(workdir / "stickylb.json")],
            sticky_port,
            "stickylb-tls",
            peers.PROXY_CORE,
            cwd=str(peers.ROOT),
        ),
        "haproxy": peers.start(
            ["haproxy", "-f", str(workdir / "haproxy.cfg")],
            haproxy_port,
            "haproxy-tls",
            peers.PROXY_CORE,
        ),
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"kept": [], "handshakes": []} for name in running
    }
    try:
        for _ in range(args.repeats):
            for name, peer in running.items():
                url = f"https://127.0.0.1:{peer.port}/tiny"
                kept = load.http_load(url, args.duration, 64)
                fresh = load.http_load(url, args.duration, 16, {"Connection": "close"})
                results[name]["kept"].append(kept.requests_per_s)
                results[name]["handshakes"].append(fresh.requests_per_s)
    finally:
        for peer in (*running.values(), http, ws):
            peer.stop()
    haproxy = {metric: statistics.median(values) for metric, values in results["haproxy"].items()}
    print("| TLS | kept-alive requests/s | new TLS connections/s |")
    print("|---|---|---|")
    for name, metrics in results.items():
        cells = []
        for metric in ("kept", "handshakes"):
            value = statistics.median(metrics[metric])
            cells.append(f"{value:,.0f} (x{value / haproxy[metric]:.2f})")
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
