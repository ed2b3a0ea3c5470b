"""How ``--workers N`` scales: stickylb with 1 and with 2 workers side by side, unpinned.

    python3 -m benchmarks.workers [--duration 6] [--rounds 3]

Both balancers run at once in front of the benchmark's backends (nginx when installed) and
take turns under ``wrk -t2 -c64`` on small responses; nothing is pinned, so the workers, the
load generator and the backends share every core, as they would on a small server. Needs wrk.
Prints the median requests/s of each with the range, and the p99 of every run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import peers

WORKER_COUNTS = (1, 2)


def wrk_unpinned(url: str, seconds: float) -> tuple[float, str]:
    command = ["wrk", "-t2", "-c64", f"-d{max(1, round(seconds))}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return (float(rate.group(1)) if rate else 0.0), (p99.group(1) if p99 else "?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.workers")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per worker count")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("benchmarks.workers needs wrk", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stickylb-workers-"))
    work.chmod(0o755)  # nginx workers read their config from here
    http, ws, ports = peers.start_backends(work, shutil.which("nginx") is not None)
    running: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for count in WORKER_COUNTS:
            port = peers.free_port()
            config = {
                "port": port,
                "host": "127.0.0.1",
                "backends": [
                    {"id": f"b{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports)
                ],
                "health": {"interval": "2s", "path": "/health"},
            }
            path = work / f"workers-{count}.json"
            path.write_text(json.dumps(config))
            command = [sys.executable, "-m", "stickylb", "--log-level", "warning"]
            command += ["--workers", str(count), str(path)]
            running[count] = (subprocess.Popen(command, cwd=str(peers.ROOT)), port)
            peers.wait_port(port)
        results: dict[int, list[tuple[float, str]]] = {count: [] for count in WORKER_COUNTS}
        for round_ in range(args.rounds):
            for count, (_, port) in running.items():  # interleaved, as benchmarks.run does
                rate, p99 = wrk_unpinned(f"http://127.0.0.1:{port}/tiny", args.duration)
                results[count].append((rate, p99))
                print(f"round {round_ + 1}: {count} worker(s): {rate:,.0f} req/s, p99 {p99}")
        for count, runs in results.items():
            rates = [rate for rate, _ in runs]
            print(
                f"{count} worker(s): median {statistics.median(rates):,.0f} req/s "
                f"({min(rates):,.0f}-{max(rates):,.0f}), p99 {', '.join(p for _, p in runs)}"
            )
    finally:
        for process, _ in running.values():
            process.terminate()
            process.wait(30)
        http.stop()
        ws.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
