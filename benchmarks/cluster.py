"""The cost of cluster mode: one stickylb with ``cluster`` on (a real ``redis-server`` on a
free loopback port) next to the same stickylb with it off, side by side in one run.

    python -m benchmarks.cluster [--duration 5] [--repeats 3]

It is ``benchmarks.ab`` with ``--config '{"cluster": ...}'``: HEAD against HEAD with cluster
mode, the same backends and load, medians of alternating runs, paired ratios. The store is
never on a request's path, so the ratio should stay within the machine's noise (under 5%).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time

import redis

from . import ab, peers


def main(argv: list[str] | None = None) -> int:
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    port = peers.free_port()
    folder = tempfile.mkdtemp(prefix="stickylb-redis-")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        cluster = {"cluster": {"redis": f"redis://127.0.0.1:{port}/0", "name": "bench"}}
        return ab.main([*(argv or sys.argv[1:]), "--config", json.dumps(cluster)])
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
