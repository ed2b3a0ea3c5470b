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
import sys
import tempfile

from . import ab, peers


def main(argv: list[str] | None = None) -> int:
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    port = peers.free_port()
    folder = tempfile.mkdtemp(prefix="stickylb-redis-")
    # Beside the load generator, off the proxy's core; nothing saved to disk.
    command = [server, "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no"]
    redis = peers.start(command, port, "redis", peers.LOAD_CORE, cwd=folder)
    try:
        cluster = {"cluster": {"redis": f"redis://127.0.0.1:{port}/0", "name": "bench"}}
        return ab.main([*(argv or sys.argv[1:]), "--config", json.dumps(cluster)])
    finally:
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
