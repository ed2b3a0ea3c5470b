"""The command line: ``stickylb CONFIG``, ``stickylb --check CONFIG``, ``stickylb demo``,
``stickylb ctl ...`` (``ctl.py``).

Exit status: 0 on a clean stop, 2 for an invalid config (one line per problem on stderr, no
traceback), 1 when the balancer cannot start (port in use, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from collections.abc import Sequence

from . import __version__
from .app import Balancer
from .config import Config, ConfigError, describe, load_config
from .console import EXIT_CONFIG, EXIT_STARTUP, LOG_LEVELS, setup_logging
from .group import Member
from .loops import LOOP_CHOICES, loop_factory, loop_name
from .memory import tune_malloc
from .server import StartupError, serve
from .workers import run_workers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stickylb",
        description="Sticky-session HTTP and WebSocket load balancer. "
        "Run 'stickylb demo' for a three-backend demo, 'stickylb ctl --help' to change a "
        "running one.",
    )
    parser.add_argument("config", help="path to the JSON config file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config, print the resolved settings and exit",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N balancer processes sharing the port (default 1)",
    )
    _common_options(parser)
    return parser


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"stickylb {__version__}")
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (default: info)"
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (accessLog in the config says how and where; "
        "default: combined format on standard output)",
    )
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        default="auto",
        help="event loop: uvloop when installed (auto), or force one",
    )


def _with_options(config: Config, args: argparse.Namespace) -> Config:
    if args.access_log and not config.access_log.enabled:
        enabled = config.access_log.model_copy(update={"enabled": True})
        return config.model_copy(update={"access_log": enabled})
    return config


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in ("demo", "--demo"):
        from .demo import main as demo_main

        demo_main(args_list[1:])
        return
    if args_list and args_list[0] == "ctl":
        from .ctl import main as ctl_main

        ctl_main(args_list[1:])
        return
    args = _parser().parse_args(args_list)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"stickylb: config error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.check:
        print(json.dumps(describe(config), indent=2))
        print(f"stickylb: {args.config}: OK", file=sys.stderr)
        return
    if args.workers < 1:
        print("stickylb: --workers must be at least 1", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    setup_logging(args.log_level, args.workers)
    try:
        factory = loop_factory(args.loop)
    except RuntimeError as exc:
        print(f"stickylb: {exc}", file=sys.stderr)
        sys.exit(EXIT_STARTUP)
    logging.getLogger("stickylb").debug("event loop: %s", loop_name(factory))

    def load() -> Config:
        """The config file as it is now, with the command line's own settings."""
        return _with_options(load_config(args.config), args)

    config = _with_options(config, args)
    tune_malloc()

    def run(
        sockets: list[socket.socket] | None = None,
        index: int = 0,
        channel: socket.socket | None = None,
    ) -> None:
        current = config
        if channel is not None:  # a worker (maybe replacing one): the file as it is now
            try:
                current = load()
            except ConfigError as exc:
                logging.getLogger("stickylb").error(
                    "worker %d: the config file is invalid now (%s); using the one read at startup",
                    index,
                    "; ".join(exc.problems),
                )
        with asyncio.Runner(loop_factory=factory) as runner:
            # Workers share through the cluster store when there is one (each is an instance,
            # and the lease picks who alerts), else through the supervisor (worker 0 alerts).
            clustered = current.cluster is not None
            balancer = Balancer(current, send_alerts=clustered or index == 0, loader=load)
            main = serve(current, balancer, sockets=sockets)
            if channel is not None and not clustered:
                main = Member(balancer, channel).run(main)
            elif channel is not None:
                channel.close()  # the supervisor stops writing to a channel nobody reads
            runner.run(main)

    try:
        if args.workers > 1:

            def worker(index: int, sockets: list[socket.socket], channel: socket.socket) -> int:
                run(sockets, index, channel)
                return 0

            sys.exit(run_workers(args.workers, config, worker))
        run()
    except StartupError as exc:
        print(f"stickylb: {exc}", file=sys.stderr)
        sys.exit(EXIT_STARTUP)
    except OSError as exc:  # binding the shared socket for --workers
        print(
            f"stickylb: cannot listen on {config.host}:{config.port}: {exc.strerror}",
            file=sys.stderr,
        )
        sys.exit(EXIT_STARTUP)
    except KeyboardInterrupt:
        pass
