"""Phase 1 killed with SIGKILL leaves no process behind: not its CPU pool's
children, not multiprocessing's resource tracker. A real uvicorn process."""

import os
import signal
import time

import httpx
import pytest

from taskman.processes import alive, descendants, start_api, wait_healthy

CPU_TASK = {"type": "primes", "payload": {"limit": 20_000_000}}


def _kill_and_watch(kill_after: float) -> set[int]:
    """Start phase 1, submit CPU tasks, SIGKILL it ``kill_after`` s after its
    first pool child appears; the descendants still alive 5 s later."""
    env = {**os.environ, "TASKMAN_CPU_WORKERS": "2"}
    api, url = start_api("phase1_inprocess", env)
    try:
        wait_healthy(url, api)
        # multiprocessing's resource tracker is there from the start; the pool's
        # children are spawned by the first CPU task.
        before = descendants(api.pid)
        for _ in range(2):
            httpx.post(f"{url}/tasks", json=CPU_TASK, timeout=5)
        deadline = time.monotonic() + 10
        while not descendants(api.pid) - before:
            assert time.monotonic() < deadline, "the pool never started"
            time.sleep(0.005)
        time.sleep(kill_after)
        children = descendants(api.pid)
    finally:
        api.kill()
        api.wait()
    # Let them notice: dying with the parent is not instant when it happens
    # before a child's start-up has finished.
    deadline = time.monotonic() + 5
    while {pid for pid in children if alive(pid)} and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {pid for pid in children if alive(pid)}
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return survivors


@pytest.mark.parametrize(
    "kill_after",
    [0.0, 0.05, 3.0],
    ids=["as-the-pool-spawns", "while-it-starts", "mid-task"],
)
def test_phase1_killed_by_sigkill_leaves_no_pool_child_or_resource_tracker(
    kill_after: float,
) -> None:
    assert _kill_and_watch(kill_after) == set()
