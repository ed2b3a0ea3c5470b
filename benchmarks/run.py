"""Run the benchmarks and print a table of medians with ratios; write the results as JSON.

    python -m benchmarks.run                 # full: every peer installed, 3 interleaved repeats
    python -m benchmarks.run --smoke         # a few seconds: direct backend, stickylb, relay
    python -m benchmarks.run --soak 600      # add a 10-minute mixed-load memory soak

Peers: the direct backend (the limit), stickylb on asyncio and on uvloop, ``asyncio-relay``
(``benchmarks/relay.py``: a bare TCP relay, the floor of any proxy on asyncio's loop), HAProxy
and nginx when their system packages are installed (configs written and processes started
here). Backends are nginx serving fixed bodies when installed, an aiohttp app otherwise;
WebSocket echo always uses the aiohttp app. The proxy runs on core 0, load and backends on
core 1 (when there are two). Everything listens on 127.0.0.1 and every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

from . import load, peers

RESULTS = Path(__file__).resolve().parent / "results"
# metric: (ratio to HAProxy that must be reached, higher or lower is better), per event loop
TARGETS = {
    "stickylb-uvloop": {
        "tiny_rps": (0.40, "higher"),
        "tiny_p99_ms": (3.0, "lower"),
        "big_mib_s": (1.0, "higher"),
        "ws_cpu_us_per_msg": (1.0, "lower"),
    },
    "stickylb-asyncio": {
        "tiny_rps": (0.30, "higher"),
        "tiny_p99_ms": (3.0, "lower"),
        "big_mib_s": (1.0, "higher"),
    },
}
# A POST with a 512-byte JSON body costs at most this much more than a bodiless GET.
POST_TO_GET_TARGET = 0.90
IDLE_WS_TARGET_KIB = 10
LABELS = {
    "tiny_rps": "tiny: requests/s",
    "tiny_p50_ms": "tiny: p50 ms",
    "tiny_p99_ms": "tiny: p99 ms",
    "tiny_cookie_rps": "tiny+cookie: requests/s",
    "tiny_cookie_p99_ms": "tiny+cookie: p99 ms",
    "post_rps": "POST 512 B JSON: requests/s",
    "post_p99_ms": "POST 512 B JSON: p99 ms",
    "big_mib_s": "1 MiB bodies: MiB/s",
    "ws_msgs_s": "ws echo: messages/s",
    "ws_cpu_us_per_msg": "ws echo: proxy CPU us/msg",
    "idle_ws_kib": "idle ws: KiB/connection",
}


def sticky_cookie(peer: str, url: str) -> dict[str, str]:
    """The cookie a pinned client would send: stickylb's token or HAProxy's server name."""
    if peer.startswith("stickylb"):

        async def fetch() -> str:
            async with aiohttp.ClientSession() as session, session.get(url + "/tiny") as resp:
                return resp.headers["Set-Cookie"].split(";")[0]

        return {"Cookie": asyncio.run(fetch())}
    if peer == "haproxy":
        return {"Cookie": "SERVERID=b0"}
    return {}


def measure(
    peer: str,
    running: peers.Running,
    args: argparse.Namespace,
    out: dict[str, dict[str, list[float]]],
) -> None:
    url = f"http://127.0.0.1:{running.port}"
    tiny = load.http_load(url + "/tiny", args.duration, 64)
    out[peer]["tiny_rps"].append(tiny.requests_per_s)
    out[peer]["tiny_p50_ms"].append(tiny.p50_ms)
    out[peer]["tiny_p99_ms"].append(tiny.p99_ms)
    out[peer]["errors"].append(tiny.errors)
    cookie = sticky_cookie(peer, url)
    if cookie:
        pinned = load.http_load(url + "/tiny", args.duration, 64, cookie)
        out[peer]["tiny_cookie_rps"].append(pinned.requests_per_s)
        out[peer]["tiny_cookie_p99_ms"].append(pinned.p99_ms)
    post = load.http_load(url + "/tiny", args.duration, 64, body=load.JSON_BODY)
    out[peer]["post_rps"].append(post.requests_per_s)
    out[peer]["post_p99_ms"].append(post.p99_ms)
    out[peer]["errors"].append(post.errors)
    big = load.http_load(url + "/big", args.duration, 16)
    out[peer]["big_mib_s"].append(big.mib_per_s)
    ws_url = f"http://127.0.0.1:{running.ws_port}/ws"
    rate, cpu = asyncio.run(load.ws_echo(ws_url, running.ws_pid, args.duration))
    out[peer]["ws_msgs_s"].append(rate)
    out[peer]["ws_cpu_us_per_msg"].append(cpu)


SOAK_STRETCH = 15.0  # seconds of one kind of load before the other


def soak(running: peers.Running, seconds: float) -> dict[str, Any]:
    """Mixed load for ``seconds``; RSS sampled every 10 s; growth after a 20 % warm-up."""
    import threading

    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not stop.wait(10 if seconds >= 60 else 1):
            samples.append((time.monotonic() - started, load.rss_kib(running.http_pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    url = f"http://127.0.0.1:{running.port}"
    deadline = time.monotonic() + seconds
    # Small and 1 MiB answers take turns in short stretches, so the warm-up sees both kinds.
    for turn in range(10_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        path = "/big" if turn % 2 else "/tiny"
        load.http_load(url + path, max(1.0, min(SOAK_STRETCH, remaining)), 32)
    stop.set()
    sampler.join()
    warm = [rss for at, rss in samples if at >= 0.2 * seconds]
    return {
        "seconds": seconds,
        "samples_kib": samples,
        "growth_after_warmup_kib": (max(warm) - warm[0]) if warm else None,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, dict[str, list[float]]], names: list[str]) -> str:
    reference = "haproxy" if "haproxy" in results else None
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric, label in LABELS.items():
        cells = []
        for name in names:
            values = results[name].get(metric, [])
            if not values:
                cells.append("-")
                continue
            cell = f"{median(values):,.1f}"
            if len(values) > 1:
                cell += (
                    f" ({min(values):,.0f}-{max(values):,.0f})"
                    if median(values) > 100
                    else f" ({min(values):.2f}-{max(values):.2f})"
                )
            ref = results.get(reference or "", {}).get(metric) if reference else None
            if ref and name != reference and median(ref):
                cell += f" x{median(values) / median(ref):.2f}"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = []
    for name in (n for n in results if n.startswith("stickylb")):
        idle = results[name].get("idle_ws_kib")
        if idle:
            ok = median(idle) <= IDLE_WS_TARGET_KIB
            lines.append(
                f"{name} idle_ws_kib: {median(idle):.1f} KiB per connection (target <= "
                f"{IDLE_WS_TARGET_KIB}) {'met' if ok else 'NOT met'}"
            )
        post, get = results[name].get("post_rps"), results[name].get("tiny_rps")
        if post and get:
            ratio = median(post) / median(get)
            ok = ratio >= POST_TO_GET_TARGET
            lines.append(
                f"{name} post_rps: x{ratio:.2f} of its own bodiless GET (target >= "
                f"{POST_TO_GET_TARGET}) {'met' if ok else 'NOT met'}"
            )
    if "haproxy" not in results:
        return [*lines, "(HAProxy not installed: no target ratios)"]
    for name, targets in TARGETS.items():
        if name not in results:
            continue
        for metric, (target, better) in targets.items():
            ours, theirs = results[name].get(metric), results["haproxy"].get(metric)
            if not ours or not theirs:
                continue
            ratio = median(ours) / median(theirs)
            ok = ratio >= target if better == "higher" else ratio <= target
            sign = ">=" if better == "higher" else "<="
            lines.append(
                f"{name} {metric}: x{ratio:.2f} of HAProxy (target {sign} {target}) "
                f"{'met' if ok else 'NOT met'}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, no external peers")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-ws", type=int, default=5000, help="idle WebSockets to open")
    parser.add_argument("--soak", type=float, default=0.0, help="soak seconds (0: none)")
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.repeats, args.idle_ws = 1.0, 1, 200

    workdir = Path(tempfile.mkdtemp(prefix="stickylb-bench-"))
    use_nginx = bool(shutil.which("nginx")) and not args.smoke
    http_backend, ws_backend, ports = peers.start_backends(workdir, use_nginx)
    started: dict[str, peers.Running] = {
        "direct": peers.Running(
            "direct",
            ports[0],
            [],
            http_pid=http_backend.http_pid,
            ws_port=ws_backend.port,
            ws_pid=ws_backend.http_pid,
        ),
    }
    try:
        started["stickylb-asyncio"] = peers.start_stickylb(
            workdir, ports, ws_backend.port, "asyncio"
        )
        started["asyncio-relay"] = peers.start_relay(ports, ws_backend.port)
        if not args.smoke:
            try:
                import uvloop  # noqa: F401

                started["stickylb-uvloop"] = peers.start_stickylb(
                    workdir, ports, ws_backend.port, "uvloop"
                )
            except ImportError:
                print("uvloop not installed: skipping stickylb-uvloop", file=sys.stderr)
            if shutil.which("haproxy"):
                started["haproxy"] = peers.start_haproxy(workdir, ports, ws_backend.port)
            if shutil.which("nginx"):
                started["nginx"] = peers.start_nginx_proxy(workdir, ports, ws_backend.port)

        results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for repeat in range(args.repeats):
            for name, running in started.items():  # interleaved: every peer once per round
                print(f"round {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
                measure(name, running, args, results)
        for name, running in started.items():
            if name not in ("direct", "asyncio-relay") and args.idle_ws > 0:
                kib = asyncio.run(
                    load.idle_websockets(
                        f"http://127.0.0.1:{running.ws_port}/ws", running.ws_pid, args.idle_ws
                    )
                )
                results[name]["idle_ws_kib"].append(kib)
        soak_result = None
        if args.soak:
            name = "stickylb-uvloop" if "stickylb-uvloop" in started else "stickylb-asyncio"
            soak_result = {"peer": name, **soak(started[name], args.soak)}
    finally:
        for running in started.values():
            running.stop()
        http_backend.stop()
        ws_backend.stop()

    names = list(started)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cores": peers.CORES,
            "python": sys.version.split()[0],
            "backend": "nginx" if use_nginx else "aiohttp",
            "load": "wrk" if shutil.which("wrk") else "python",
        },
        "settings": {
            "duration_s": args.duration,
            "repeats": args.repeats,
            "idle_ws": args.idle_ws,
            "smoke": args.smoke,
        },
        "results": {name: {k: v for k, v in results[name].items()} for name in names},
        "medians": {name: {k: median(v) for k, v in results[name].items()} for name in names},
        "soak": soak_result,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(table(results, names))
    for line in verdicts(results):
        print(line)
    if soak_result:
        print(
            f"soak {soak_result['seconds']:g}s on {soak_result['peer']}: RSS growth after "
            f"warm-up {soak_result['growth_after_warmup_kib']} KiB"
        )
    print(f"results written to {args.json}")
    errors = sum(sum(results[name]["errors"]) for name in names)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
