"""Start N example backends on consecutive local ports; Ctrl+C (or SIGTERM) stops them all.

python3 examples/launch.py -n 3 --port 5001    # backend-1..3 on 5001..5003 (from anywhere)
python3 -m examples.launch -n 3                 # the same, from the repository's root
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=3)
    parser.add_argument("--port", type=int, default=5001, help="port of the first backend")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stickylb.demo.backend",  # the installed package: works from any folder
                "--name",
                f"backend-{i + 1}",
                "--host",
                args.host,
                "--port",
                str(args.port + i),
            ]
        )
        for i in range(args.count)
    ]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    print(
                        f"backend pid {child.pid} exited ({child.returncode}); stopping all",
                        file=sys.stderr,
                    )
                    stopping = True
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 10
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        print(f"stopped {len(children)} backends", flush=True)


if __name__ == "__main__":
    main()
