"""Helpers for tests that run real processes: free ports, waiting, process trees."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common.process import alive, descendants, stop
from common.settings import Settings

__all__ = [
    "alive",
    "descendants",
    "drain",
    "drain_queue",
    "stop",
    "taskman",
    "wait_http",
]

BIN = Path(sys.executable).parent


def wait_http(
    url: str, timeout: float = 20, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def taskman(
    *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "taskman"), *args],
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def drain(redis_url: str, queue_name: str, **env: str) -> str:
    """Run a queue dry with one real burst worker (rq's advice for tests); its
    output."""
    done = subprocess.run(
        [sys.executable, "-m", "taskman", "worker", "--phase", "2", "--burst"],
        env={
            **os.environ,
            "TASKMAN_REDIS_URL": redis_url,
            "TASKMAN_QUEUE_NAME": queue_name,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def drain_queue(settings: Settings) -> None:
    """drain() the queue of these settings."""
    drain(str(settings.redis_url), settings.queue_name)
