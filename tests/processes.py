"""Helpers for tests that run real processes, over taskman/processes.py."""

import os
import subprocess
import sys
from pathlib import Path

import httpx

from common.settings import Settings
from taskman.processes import (
    Process,
    alive,
    descendants,
    start,
    stop,
    taskman_command,
    wait_healthy,
)

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


def _any_answer(response: httpx.Response) -> bool:
    return True


def wait_http(url: str, timeout: float = 20, process: Process | None = None) -> None:
    """Until ``url`` answers at all (a 503 too), or ``process`` exits."""
    wait_healthy(url, process, timeout, path="", ready=_any_answer)


def taskman(
    *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Process:
    """The installed ``taskman`` command, our environment plus ``env``."""
    return start(
        [str(BIN / "taskman"), *args],
        env={**os.environ, **(env or {})},
        log=log or subprocess.DEVNULL,
    )


def drain(redis_url: str, queue_name: str, *, phase: int = 2, **env: str) -> str:
    """Run a queue dry with one real burst worker of ``phase`` (rq's advice for
    tests); its output."""
    done = subprocess.run(
        taskman_command("worker", "--phase", str(phase), "--burst"),
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


def drain_queue(settings: Settings, *, phase: int = 2) -> None:
    """drain() the queue of these settings."""
    drain(str(settings.redis_url), settings.queue_name, phase=phase)
