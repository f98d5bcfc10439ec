"""``taskman demo --fast``: the tour runs every phase for real, says what it showed,
and leaves no process behind, also when it is interrupted."""

import signal
import subprocess
import sys
import threading
import time

from tests.processes import alive, descendants


class Demo:
    """``python -m taskman demo --fast ARGS``, its output read as it comes, and
    every process seen below it remembered."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "taskman", "demo", "--fast", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float, until: str | None = None) -> int | None:
        """Until it exits (its exit code) or prints ``until`` (None)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            self.seen |= descendants(self.process.pid)
            if until is not None and until in self.output:
                return None
            assert time.monotonic() < deadline, self.output
            time.sleep(0.05)
        self._reader.join(timeout=5)
        return self.process.returncode

    def leftovers(self) -> list[int]:
        time.sleep(0.3)
        return [pid for pid in self.seen if alive(pid)]


def test_the_fast_demo_tours_every_phase_and_stops_what_it_started() -> None:
    demo = Demo()
    try:
        code = demo.wait(timeout=90)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
    out = demo.output
    assert code == 0, out
    # Phase 1: a restart loses every task; phase 2: nothing is lost.
    assert "Lost: 6 of 6 tasks answered 404 after the restart." in out
    assert "queued task(s) are lost" in out  # the server's own warning, quoted
    assert "Kept: 4 of 4 tasks survived the API restart." in out
    assert "succeeded on attempt 2" in out and "Recovered: task " in out
    # Phase 3: the rate limit, the cache, the dashboard.
    assert "429 Too Many Requests" in out and "Retry-After: 1" in out
    assert "X-Cache: HIT" in out
    assert "304 Not Modified" in out
    assert "/dashboard/" in out and "401 Unauthorized" in out
    assert out.count("Stopped every process this phase started") == 3
    assert "Still running after clean-up" not in out
    assert len(demo.seen) >= 10, "servers, workers and Redis should have run"
    assert demo.leftovers() == []


def test_ctrl_c_stops_every_process_the_demo_started() -> None:
    demo = Demo("--phase", "2")
    try:
        # Redis, the API and both workers are up once the second step begins.
        assert demo.wait(timeout=60, until="2.2  ") is None, demo.output
        assert len(demo.seen) >= 4
        demo.process.send_signal(signal.SIGINT)
        code = demo.wait(timeout=60)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
    assert code == 130, demo.output
    assert "Interrupted" in demo.output
    assert demo.leftovers() == []
