"""`taskman bench --rtt --quick`: stock RQ's worker and each phase's, and POSTs,
through a 5 ms delay line to a Redis on a host of its own; nothing left behind."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskman import netns
from taskman.processes import alive, descendants

REASON = netns.unavailable()


@pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")
def test_bench_rtt_quick_measures_every_worker_at_each_delay(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    seen: set[int] = set()
    with log.open("wb") as out:
        bench = subprocess.Popen(
            [
                *(sys.executable, "-m", "taskman", "bench", "--rtt", "--quick"),
                *("--out", str(tmp_path / "results")),
            ],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        while bench.poll() is None:  # every process it starts, for the check below
            seen |= descendants(bench.pid)
            time.sleep(0.1)
    output = log.read_text()
    assert bench.returncode == 0, output
    assert "| 0, no delay line |" in output and "| 5 |" in output, output
    (results,) = (tmp_path / "results").glob("bench-rtt-*.json")
    direct, delayed = json.loads(results.read_text())["rows"]
    # The delay line adds what it says to each round trip, and no more than a
    # busy machine's scheduling does.
    assert direct["ping_ms"] < 2 and 5 <= delayed["ping_ms"] < 8, (direct, delayed)
    for row in (direct, delayed):
        assert all(row[kind] > 0 for kind in ("stock", "phase2", "phase3")), row
        assert row["post_p50_ms_phase2"] > 0 and row["post_p50_ms_phase3"] > 0
    # Each POST makes at least one round trip to Redis.
    assert delayed["post_p50_ms_phase3"] >= 5, delayed
    time.sleep(0.5)
    assert [pid for pid in seen if alive(pid)] == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert f"{netns.PREFIX}{bench.pid}-" not in namespaces.stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert f"metric {bench.pid}" not in routes
