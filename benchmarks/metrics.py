"""What metrics cost, side by side in one run (issue 15's "under 3%").

First, exactly: instructions per request under valgrind's callgrind (when valgrind is
installed), for HEAD as it is and HEAD without its per-request counters, and instructions per
scrape of ``/_lb/metrics``; each is the difference between two runs of the same process with
different counts, so start-up cancels out. Instruction counts do not move with the machine's
load, which on a shared VM moves requests/s by 5 % between runs, more than what is measured.

Then, the wall clock, with ``benchmarks.ab``'s loads:

- ``head``: stickylb as it is (the per-request counters behind ``/_lb/metrics`` on).
- ``no-counters``: the same code with every per-request counter statement of
  ``stickylb/pipeline.py`` replaced by ``pass`` (in a temporary copy of the package), so the
  difference is exactly what the hot path pays for metrics.
- ``head-again``: head once more: how far two identical variants land apart in this run.
- ``scraped``: head again, with ``/_lb/metrics`` scraped ten times a second during its loads
  (Prometheus scrapes every 15 s or so: this is 150 times that).

    python -m benchmarks.metrics [--duration 5] [--repeats 3] [--no-wall-clock]

Loads, pinning and the table are ``benchmarks.ab``'s: medians of alternating runs and paired
ratios to ``head``. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import ab, peers

# The statements of ``pipeline.py`` that count a request: the answer's status class, its
# duration histogram and bytes, the affinity result and what placed the client.
COUNTERS = re.compile(
    r"^(\s*)(?:p\.stats\.(?:affinity|placed)\[|backend\.stats\.answers\[|durations\.counts\["
    r"|durations\.total \+=|stats\.response_bytes \+=|durations = stats\.durations"
    r"|took = now - self\._started).*$",
    flags=re.M,
)
EXPECTED = 8  # fewer or more: pipeline.py changed, and this list must follow it
SCRAPES_PER_SECOND = 10


def strip_counters(checkout: Path) -> int:
    """Replace the per-request counter statements in ``checkout`` with ``pass``."""
    path = checkout / "stickylb" / "pipeline.py"
    text, count = COUNTERS.subn(r"\1pass", path.read_text())
    path.write_text(text)
    compile(text, str(path), "exec")
    return count


@contextmanager
def scraping(peer: peers.Running) -> Iterator[None]:
    """Scrape the variant's ``/_lb/metrics`` ten times a second while its loads run."""
    done = threading.Event()
    url = f"http://127.0.0.1:{peer.port}/_lb/metrics"

    def scrape() -> None:
        while not done.wait(1 / SCRAPES_PER_SECOND):
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def instructions(checkout: Path, work: Path, backend_port: int, requests: int, scrapes: int) -> int:
    """Instructions one ``python -m stickylb`` from ``checkout`` runs (under callgrind) to serve
    ``requests`` small GETs on one kept connection, then ``scrapes`` scrapes, and stop."""
    port = peers.free_port()
    config = {
        "port": port,
        "host": "127.0.0.1",
        "health": {"enabled": False},  # nothing but the requests counted
        "backends": [{"id": f"b{i}", "url": f"http://127.0.0.1:{backend_port}"} for i in range(4)],
    }
    path = work / f"callgrind-{port}.json"
    path.write_text(json.dumps(config))
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={work / f'callgrind-{port}.out'}",
        sys.executable,
        "-m",
        "stickylb",
        "--loop",
        "asyncio",
        "--log-level",
        "warning",
        str(path),
    ]
    # A fixed hash seed: dict and set layouts, and so instruction counts, repeat run to run.
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        peers.wait_port(port, limit=120)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for target in [b"/tiny"] * requests + [b"/_lb/metrics"] * scrapes:
                sock.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % target)
                _read_answer(sock)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    match = re.search(rb"Collected : (\d+)", err)
    if match is None:
        raise RuntimeError(f"callgrind gave no count: {err[-500:]!r}")
    return int(match.group(1))


def _read_answer(sock: socket.socket) -> None:
    """One answer with a Content-Length (what the proxy and the metrics endpoint send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)


def count_instructions(stripped: Path, work: Path) -> None:
    backend_port = peers.free_port()
    backend = peers.start(
        [sys.executable, "-m", "benchmarks.backend", str(backend_port)],
        backend_port,
        "aiohttp-backend",
        peers.LOAD_CORE,
        cwd=str(peers.ROOT),
    )
    try:
        few, many, scrapes = 500, 2500, 20
        rows = []
        for name, checkout in (("head", peers.ROOT), ("no-counters", stripped)):
            base = instructions(checkout, work, backend_port, few, 0)
            more = instructions(checkout, work, backend_port, many, 0)
            rows.append((name, (more - base) / (many - few)))
            if name == "head":
                scraped = instructions(checkout, work, backend_port, few, scrapes)
                per_scrape = (scraped - base) / scrapes
    finally:
        backend.stop()
    (_, head), (_, bare) = rows
    print("| instructions (callgrind) | per small GET | per scrape of /_lb/metrics |")
    print("|---|---|---|")
    print(f"| head | {head:,.0f} | {per_scrape:,.0f} (as much as {per_scrape / head:,.0f} GETs) |")
    print(f"| no-counters | {bare:,.0f} (the counters: {(head - bare) / head:.1%} of a GET) | - |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-wall-clock", action="store_true", help="instruction counts only")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="stickylb-metrics-"))
    # The package as it is in this checkout (committed or not), counters stripped.
    stripped = workdir / "no-counters"
    shutil.copytree(
        peers.ROOT / "stickylb", stripped / "stickylb", ignore=shutil.ignore_patterns("__pycache__")
    )
    try:
        count = strip_counters(stripped)
        if count != EXPECTED:
            print(f"found {count} counter statements, expected {EXPECTED}", file=sys.stderr)
            return 2
        if shutil.which("valgrind"):
            count_instructions(stripped, workdir)
        else:
            print("valgrind is not installed: no instruction counts\n")
        if args.no_wall_clock:
            return 0
        variants: list[ab.Variant] = [
            ("head", peers.ROOT, {}),
            ("no-counters", stripped, {}),
            ("head-again", peers.ROOT, {}),  # the noise floor of this run, position included
            ("scraped", peers.ROOT, {}),
        ]
        results = ab.measure(
            variants, workdir, args.duration, args.repeats, while_loaded={"scraped": scraping}
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ab.print_table(variants, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
