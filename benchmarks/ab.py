"""Compare stickylb with itself, side by side in one run: another git revision, or another
config, on the same backends and load (the cost of a change, as a ratio).

    python -m benchmarks.ab                                  # HEAD vs HEAD (the noise floor)
    python -m benchmarks.ab --base 4513358                   # HEAD vs an older revision
    python -m benchmarks.ab --config '{"requestIdHeader": null}'   # HEAD vs HEAD with a setting
    python -m benchmarks.ab --base REV --head-config '{...}'       # HEAD with a setting vs REV

Each variant runs as ``python -m stickylb`` (uvloop) from its own checkout (``git worktree``
for ``--base``), pinned to the proxy core; the small-GET and POST loads of ``benchmarks.run``
alternate between the variants ``--repeats`` times, and medians are compared. Loopback only,
bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from . import load, peers


def start_variant(
    name: str, checkout: Path, workdir: Path, ports: list[int], extra: dict[str, Any]
) -> peers.Running:
    port = peers.free_port()
    config = {
        "port": port,
        "host": "127.0.0.1",
        "backends": [{"id": f"b{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports)],
        "health": {"interval": "2s", "path": "/health"},
        **extra,
    }
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "stickylb", "--loop", "uvloop", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return peers.start(
        [*command, str(path)], port, name, peers.PROXY_CORE, cwd=str(checkout), env=env
    )


Variant = tuple[str, Path, dict[str, Any]]  # name, checkout, config merged in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git revision to compare HEAD with")
    parser.add_argument(
        "--config", default="{}", help="JSON merged into the second variant's config"
    )
    parser.add_argument("--head-config", default="{}", help="JSON merged into HEAD's config")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    extra = json.loads(args.config)
    workdir = Path(tempfile.mkdtemp(prefix="stickylb-ab-"))
    head_extra = json.loads(args.head_config)
    variants: list[Variant] = [("head", peers.ROOT, head_extra)]
    worktree = None
    if args.base:
        worktree = add_worktree(workdir / "base", args.base)
        variants.append((f"base-{args.base[:12]}", worktree, extra))
    else:
        variants.append(("head+config" if extra else "head-again", peers.ROOT, extra))
    try:
        results = measure(variants, workdir, args.duration, args.repeats)
    finally:
        if worktree is not None:
            remove_worktree(worktree)
    print_table(variants, results)
    return 0


def add_worktree(path: Path, revision: str) -> Path:
    subprocess.run(
        ["git", "-C", str(peers.ROOT), "worktree", "add", "--detach", str(path), revision],
        check=True,
        capture_output=True,
    )
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(
        ["git", "-C", str(peers.ROOT), "worktree", "remove", "--force", str(path)],
        capture_output=True,
    )


def measure(
    variants: list[Variant],
    workdir: Path,
    duration: float,
    repeats: int,
    *,
    while_loaded: dict[str, Callable[[peers.Running], AbstractContextManager[object]]]
    | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Alternate the loads over ``variants`` ``repeats`` times; per variant, per metric, one
    value per repeat. ``while_loaded[name]`` runs alongside that variant's loads (a scraper)."""
    http, ws, ports = peers.start_backends(
        workdir, use_nginx=peers.shutil.which("nginx") is not None
    )
    running = [
        start_variant(name, checkout, workdir, ports, cfg) for name, checkout, cfg in variants
    ]
    results: dict[str, dict[str, list[float]]] = {
        name: {"get": [], "post": [], "cpu": []} for name, *_ in variants
    }
    alongside = while_loaded or {}
    try:
        for _ in range(repeats):
            for (name, *_), peer in zip(variants, running, strict=True):
                url = f"http://127.0.0.1:{peer.port}/tiny"
                with alongside.get(name, _nothing)(peer):
                    cpu = load.cpu_seconds(peer.http_pid)
                    get = load.http_load(url, duration, 64).requests_per_s
                    cpu = load.cpu_seconds(peer.http_pid) - cpu
                    post = load.http_load(url, duration, 64, body=load.JSON_BODY).requests_per_s
                results[name]["get"].append(get)
                # The proxy's own CPU per request: steadier than requests/s on a busy machine.
                results[name]["cpu"].append(cpu / (get * duration) * 1e6)
                results[name]["post"].append(post)
    finally:
        for peer in (*running, http, ws):
            peer.stop()
    return results


def _nothing(peer: peers.Running) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


def print_table(variants: list[Variant], results: dict[str, dict[str, list[float]]]) -> None:
    first = variants[0][0]
    print("| variant | GET requests/s | POST requests/s | proxy CPU us per GET |")
    print("|---|---|---|---|")
    for name, *_ in variants:
        cells = []
        for metric in ("get", "post", "cpu"):
            value = statistics.median(results[name][metric])
            # Paired: each repeat's ratio to the first variant measured right before it, so a
            # machine that drifts during the run does not count as a difference.
            ratios = sorted(
                mine / theirs
                for mine, theirs in zip(results[name][metric], results[first][metric], strict=True)
            )
            spread = f"{ratios[0]:.3f}-{ratios[-1]:.3f}"
            cells.append(f"{value:,.0f} (x{statistics.median(ratios):.3f}, {spread})")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    sys.exit(main())
