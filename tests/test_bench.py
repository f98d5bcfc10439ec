"""`taskman bench --quick` from start to end: real processes, real load, and
nothing left running afterwards."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskman.bench.peers.registry import PEERS
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
    # CPU per request of the API process, beside req/s, on every line.
    assert figures["baseline_post"]["cpu_us"] > 0
    assert figures["phase3"]["post"]["cpu_us"] > 0
    assert figures["phase3"]["get"]["cpu_us"] > 0
    assert figures["phase3"]["get"]["rps"] > 0
    assert figures["phase3"]["get_unfinished"]["rps"] > 0  # what the cache can't keep
    assert "| GET /tasks/{id} of an unfinished task" in output
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


@pytest.mark.timeout(400)
def test_bench_peers_runs_every_installed_peer_and_names_the_rest(
    tmp_path: Path,
) -> None:
    # Tiny: 1 s of load, 100 jobs a drain. Stock RQ and the phases need only
    # taskman's own extras; Celery, arq, saq and taskiq run if they import, and
    # are otherwise skipped with a line saying so.
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskman",
            "bench",
            "--figures",
            "peers",
            "--seconds",
            "1",
            "--jobs",
            "100",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=390,
        check=False,
    )
    assert bench.returncode == 0, bench.stdout + bench.stderr
    (results,) = tmp_path.glob("bench-*.json")
    peers = json.loads(results.read_text())["peers"]
    assert peers["bare"]["cpu_us"] > 0
    assert {"phase2", "phase3", "rq"} <= set(peers["measured"])
    for key, peer in PEERS.items():
        if key in peers["measured"]:
            assert f"| {peer.label} |" in bench.stdout, bench.stdout
        else:
            assert f"- {peer.label}: skipped, " in bench.stdout, bench.stdout
    for figures in peers["measured"].values():
        assert figures["api_alone"]["cpu_us"] > 0
        assert figures["with_worker"]["finished_per_s"] > 0
        assert figures["worker_alone"]["jobs_per_s"] > 0
    # Counted by Redis itself: RQ's loop takes ~20 round trips a job, phase 3's ~8.
    measured = peers["measured"]
    assert 15 < measured["rq"]["worker_alone"]["round_trips_per_job"] < 30
    assert (
        measured["phase3"]["worker_alone"]["round_trips_per_job"]
        < measured["phase2"]["worker_alone"]["round_trips_per_job"] / 2
    )
    full = peers["full_stack"]
    assert full["accepted_per_s"] > 0
    assert full["finished_per_s"] > 0
    assert "| full stack: `taskman serve --phase 3 --workers 1`" in bench.stdout
