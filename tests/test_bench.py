"""`taskman bench --quick` from start to end: real processes, real load, and
nothing left running afterwards."""

import json
import subprocess
import sys
import time
from pathlib import Path

from taskman.processes import alive, descendants


def test_bench_quick_measures_every_phase_and_leaves_no_process(tmp_path: Path) -> None:
    # To a file, not a pipe: a pipe nobody reads until the end would block the
    # bench once its output outgrew the pipe's buffer.
    log = tmp_path / "bench.log"
    seen: set[int] = set()
    with log.open("wb") as out:
        bench = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskman",
                "bench",
                "--quick",
                "--out",
                str(tmp_path / "results"),
                "--charts",
                str(tmp_path / "img"),
            ],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        while bench.poll() is None:  # every process it starts, for the check below
            seen |= descendants(bench.pid)
            time.sleep(0.1)
    output = log.read_text()
    assert bench.returncode == 0, output
    for row in ("| bare FastAPI |", "| phase1 |", "| phase2 |", "| phase3 |"):
        assert row in output, output
    (results,) = (tmp_path / "results").glob("bench-*.json")
    figures = json.loads(results.read_text())
    assert figures["phase1"]["post"]["rps"] > 0
    assert figures["phase3"]["get"]["rps"] > 0
    # What durability means: phase 1 loses what it held, the queue phases nothing.
    assert figures["phase1"]["durability"]["lost"] > 0
    assert figures["phase2"]["durability"]["lost"] == 0
    assert figures["phase3"]["durability"]["lost"] == 0
    assert figures["workers"]["phase3_1"] > 0
    assert {p.name for p in (tmp_path / "img").glob("*.png")} == {
        "throughput.png",
        "workers.png",
        "loop.png",
    }
    assert seen, "the bench should have started servers and workers"
    time.sleep(0.5)
    assert [pid for pid in seen if alive(pid)] == []
