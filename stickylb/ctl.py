"""``stickylb ctl``: the runtime API for people (and shell scripts).

It finds the balancer and its admin token the way the balancer itself does: from the config
file (``--config``, else ``$STICKYLB_CONFIG``, else ``./config.json``) with ``STICKYLB_*``
environment overrides; ``--url`` and ``--token`` (or ``$STICKYLB_ADMIN__TOKEN``) win over both.
Output is a readable table or line, ``--json`` gives the API's own JSON. Any error is one line
on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config

EXIT_FAILED = 1
DEFAULT_CONFIG = "config.json"


class CtlError(Exception):
    """What went wrong, in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stickylb ctl", description="Change a running stickylb through its admin API."
    )
    parser.add_argument("--config", help="config file (default: $STICKYLB_CONFIG or config.json)")
    parser.add_argument("--url", help="the admin API, e.g. http://127.0.0.1:3001/_lb")
    parser.add_argument("--token", help="admin token (default: from the config / environment)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    parser.add_argument(
        "--timeout", default="30s", help="for --wait and remove: how long (default 30s)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("backends", help="list the backends")
    drain = commands.add_parser("drain", help="no new clients; pinned ones stay")
    drain.add_argument("id")
    drain.add_argument("--wait", action="store_true", help="until nothing is active on it")
    for name, text in (("maint", "no traffic at all"), ("ready", "back to normal")):
        commands.add_parser(name, help=text).add_argument("id")
    weight = commands.add_parser("weight", help="set a backend's weight")
    weight.add_argument("id")
    weight.add_argument("weight", type=float)
    add = commands.add_parser("add", help="add (or replace) a backend")
    add.add_argument("id")
    add.add_argument("backend_url", metavar="URL")
    add.add_argument("--weight", type=float)
    add.add_argument("--owner")
    add.add_argument("--max-connections", type=int)
    remove = commands.add_parser("remove", help="drain a backend, then remove it")
    remove.add_argument("id")
    remove.add_argument("--wait", action="store_true", help="until it is gone")
    commands.add_parser("reload", help="re-read the config file")
    return parser


def main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    try:
        output = run(args)
    except CtlError as exc:
        print(f"stickylb ctl: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    if output:
        print(output)


def run(args: argparse.Namespace) -> str:
    api = Api(*_where(args))
    quoted = urllib.parse.quote(str(getattr(args, "id", "")), safe="")
    backend = f"/backends/{quoted}"
    command = args.command
    if command == "backends":
        answer = api.call("GET", "/backends")
        return _dump(answer) if args.json else _table(answer["backends"])
    if command in ("drain", "maint", "ready"):
        answer = api.call("POST", f"{backend}/state", {"state": command})
        if command == "drain" and args.wait:
            answer = api.call("GET", f"{backend}?wait=drained&timeout={_q(args.timeout)}")
            if not answer.get("drained"):
                raise CtlError(
                    f"backend {args.id} still has {answer.get('activeConnections')} active"
                    f" connection(s) after {args.timeout}"
                )
        if args.json:
            return _dump(answer)
        done = " and drained" if command == "drain" and args.wait else ""
        return f"backend {args.id}: {answer.get('adminState', command)}{done}"
    if command == "weight":
        answer = api.call("POST", f"{backend}/weight", {"weight": _plain(args.weight)})
        return _dump(answer) if args.json else f"backend {args.id}: weight {answer['weight']}"
    if command == "add":
        body: dict[str, Any] = {"url": args.backend_url}
        if args.weight is not None:
            body["weight"] = _plain(args.weight)
        if args.owner is not None:
            body["owner"] = args.owner
        if args.max_connections is not None:
            body["maxConnections"] = args.max_connections
        answer = api.call("PUT", backend, body)
        if args.json:
            return _dump(answer)
        return f"backend {args.id}: {answer.get('url')} (takes traffic once a check passes)"
    if command == "remove":
        answer = api.call("DELETE", f"{backend}?timeout={_q(args.timeout)}")
        if args.wait:  # already removed (404) is as good as drained
            api.call("GET", f"{backend}?wait=drained&timeout={_q(args.timeout)}", gone_ok=True)
        return _dump(answer) if args.json else f"backend {args.id}: draining, then removed"
    if command == "reload":
        answer = api.call("POST", "/reload")
        if args.json:
            return _dump(answer)
        parts = [
            f"{key} {', '.join(map(str, answer[key]))}"
            for key in ("added", "removed", "updated")
            if answer.get(key)
        ]
        line = "reloaded" + (": " + "; ".join(parts) if parts else " (no backend changes)")
        if answer.get("restartNeeded"):
            line += f"; restart needed for {', '.join(answer['restartNeeded'])}"
        return line
    raise CtlError(f"unknown command {command!r}")


def _where(args: argparse.Namespace) -> tuple[str, str | None]:
    """The admin API's URL and the token, from the options, the config and the environment."""
    url, token = args.url, args.token or os.environ.get("STICKYLB_ADMIN__TOKEN")
    path = args.config or os.environ.get("STICKYLB_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    if path is not None and (url is None or token is None):
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise CtlError(f"{path}: {exc.problems[0]}") from None
        if url is None:
            host = config.host
            host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            if ":" in host:
                host = f"[{host}]"
            url = f"http://{host}:{config.port}{config.admin.prefix}"
        if token is None and config.admin.token is not None:
            token = config.admin.token.get_secret_value()
    if url is None:
        raise CtlError(f"no config file ({DEFAULT_CONFIG} or --config) and no --url")
    return url.rstrip("/"), token


class Api:
    def __init__(self, base: str, token: str | None) -> None:
        self._base = base
        self._token = token

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, gone_ok: bool = False
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=3700) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if gone_ok and exc.code == 404:
                return None
            raise CtlError(_problem(exc)) from None
        except urllib.error.URLError as exc:
            raise CtlError(f"cannot reach {self._base}: {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise CtlError(f"{self._base}: {exc}") from None


def _problem(exc: urllib.error.HTTPError) -> str:
    try:
        answer = json.loads(exc.read())
        text = "; ".join(answer.get("problems") or [answer["error"]])
    except (ValueError, KeyError, TypeError, AttributeError):
        text = exc.reason
    if exc.code == 404 and text == "Not found.":
        text = "not found (is the admin API reachable from here, with admin.token set?)"
    elif exc.code == 401:
        text = "the admin token is missing or wrong (--token, or admin.token in the config)"
    return f"{exc.code}: {text}"


def _table(backends: list[dict[str, Any]]) -> str:
    columns = ("ID", "HEALTH", "ADMIN", "WEIGHT", "ACTIVE", "REQUESTS", "SOURCE", "URL")
    rows = [columns] + [
        (
            str(b["id"]),
            b["state"],
            b["adminState"] + (" (removing)" if b.get("removing") else ""),
            str(b["weight"]),
            str(b["activeConnections"]),
            str(b["requests"]),
            b["source"],
            b["url"],
        )
        for b in backends
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _dump(answer: Any) -> str:
    return json.dumps(answer, indent=2)


def _plain(number: float) -> int | float:
    return int(number) if number.is_integer() else number


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")
