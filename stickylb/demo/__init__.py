"""``stickylb demo``: example backends and the balancer in one process, for a first look.

Without a config it starts three example backends on free local ports and a balancer on
127.0.0.1:3001 in front of them. With a config file (``stickylb demo config.example.json``) it
starts an example backend on every loopback port the config names, then runs the balancer on
exactly that config. Ctrl+C (or SIGTERM) stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from aiohttp import web
from yarl import URL

from ..config import Config, ConfigError, build_config, load_config
from ..console import EXIT_CONFIG, EXIT_STARTUP, setup_logging
from ..loops import loop_factory
from ..server import StartupError, serve
from .backend import make_app

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stickylb demo", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="run this config against example backends")
    parser.add_argument("--port", type=int, default=3001, help="balancer port (no config)")
    parser.add_argument("--backends", type=int, default=3, help="how many backends (no config)")
    parser.add_argument("--strategy", default="round-robin", help="strategy (no config)")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    return parser


async def _start_backend(name: str, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_app(name), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot start example backend {name} on port {port}: {exc.strerror}"
        ) from None
    bound = runner.addresses[0][1]
    return runner, int(bound)


def _default_config(args: argparse.Namespace, ports: list[int]) -> Config:
    return build_config(
        {
            "port": args.port,
            "host": "127.0.0.1",
            "strategy": args.strategy,
            "health": {"interval": "2s", "path": "/health", "rise": 2, "fall": 2},
            "backends": [
                {"id": f"backend-{i + 1}", "url": f"http://127.0.0.1:{port}"}
                for i, port in enumerate(ports)
            ],
        }
    )


def _instructions(config: Config, addresses: list[str]) -> str:
    url = addresses[0].replace("0.0.0.0", "127.0.0.1")
    recover = [f"  recover {b.id:<12}curl -X POST {b.url}/admin/recover" for b in config.backends]
    return "\n".join(
        [
            "",
            f"stickylb demo: {len(config.backends)} example backends behind {url}",
            f"  open in a browser   {url}/",
            f"  pinned requests     curl -c /tmp/lb.jar -b /tmp/lb.jar {url}/   (repeat it)",
            f"  a new client        curl {url}/",
            f"  balancer status     curl {url}/_lb/health",
            f"  fail your backend   curl -b /tmp/lb.jar -X POST {url}/admin/fail",
            "  (the x-backend-id header, or /_lb/health, says which backend you are on)",
            *recover,
            "  stop                Ctrl+C",
            "",
        ]
    )


async def run_demo(args: argparse.Namespace) -> None:
    runners: list[web.AppRunner] = []
    try:
        if args.config:
            config = load_config(args.config)
            for backend in config.backends:
                url = URL(backend.url)
                if url.host in LOCAL_HOSTS and url.port:
                    host = "127.0.0.1" if url.host == "localhost" else url.host
                    runner, _ = await _start_backend(str(backend.id), host, url.port)
                    runners.append(runner)
        else:
            ports = []
            for i in range(args.backends):
                runner, port = await _start_backend(f"backend-{i + 1}", "127.0.0.1", 0)
                runners.append(runner)
                ports.append(port)
            config = _default_config(args, ports)

        def ready(addresses: list[str]) -> None:
            print(_instructions(config, addresses), flush=True)

        await serve(config, on_ready=ready)
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    setup_logging(args.log_level)
    try:
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            runner.run(run_demo(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"stickylb: config error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except StartupError as exc:
        print(f"stickylb: {exc}", file=sys.stderr)
        sys.exit(EXIT_STARTUP)
    except KeyboardInterrupt:
        pass
