"""CI keeps the benchmark harness working: a few seconds, no external peers, no timing
assertions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from .support import ROOT


def test_benchmark_smoke_mode_runs_and_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--json", str(out)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"direct", "stickylb-asyncio", "asyncio-relay"}
    relay = report["medians"]["asyncio-relay"]
    assert relay["tiny_rps"] > 0 and relay["ws_msgs_s"] > 0 and relay["big_mib_s"] > 0
    ours = report["medians"]["stickylb-asyncio"]
    for metric in (
        "tiny_rps",
        "tiny_p99_ms",
        "tiny_cookie_rps",
        "post_rps",
        "big_mib_s",
        "ws_msgs_s",
        "ws_cpu_us_per_msg",
        "idle_ws_kib",
    ):
        assert ours[metric] > 0, metric
    assert "| tiny: requests/s |" in result.stdout


def test_the_metrics_benchmark_still_finds_every_per_request_counter(tmp_path):
    # benchmarks.metrics strips these statements to measure what metrics cost; a change to
    # pipeline.py that moves them must move this list too, or the benchmark measures nothing.
    from benchmarks.metrics import EXPECTED, strip_counters

    (tmp_path / "stickylb").mkdir()
    shutil.copy(ROOT / "stickylb" / "pipeline.py", tmp_path / "stickylb" / "pipeline.py")
    assert strip_counters(tmp_path) == EXPECTED
    stripped = (tmp_path / "stickylb" / "pipeline.py").read_text()
    assert "stats.response_bytes +=" not in stripped and "durations.total +=" not in stripped
