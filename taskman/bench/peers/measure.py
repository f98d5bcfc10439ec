"""``taskman bench --peers``: the same echo workload through each peer, measured
the same way, against the bench's own Redis (a database of its own per peer).

For each: POST /tasks with the API alone (workers off, access log off, the
bare baseline's uvicorn settings); then with its worker on, tasks accepted and
finished per second under load; then its worker alone draining a pre-filled
queue, with the Redis round trips each job took. Last, phase 3 as
``taskman serve`` runs it (its own logging, access log on, 1 worker).
"""

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, cast

import httpx
import redis

from taskman.bench.figures import ECHO, UNLIMITED
from taskman.bench.load import load
from taskman.bench.peers.registry import (
    PEERS,
    Backlog,
    Peer,
    rq_backlog,
    rq_finished,
)
from taskman.processes import (
    Process,
    api_command,
    free_port,
    start,
    stop,
    stop_tree,
    taskman_command,
    wait_healthy,
)

# The drain's steady part: from 90 % of the jobs left to 10 % left, so neither
# the worker's start nor its last, idle polls are in the rate.
STEADY = (0.9, 0.1)


def measure_peers(
    redis_url: str,
    seconds: float,
    jobs: int,
    peers_python: str,
    step: Callable[[str], None],
) -> dict[str, Any]:
    """Every peer that imports, then the full-stack line; the skipped, and why."""
    results: dict[str, Any] = {"measured": {}, "skipped": {}}
    step("peers: bare FastAPI (baseline)")
    with _api(sys.executable, "taskman.baseline", dict(os.environ)) as (url, pid):
        results["bare"] = asdict(load(f"{url}/tasks", seconds, body=ECHO, pid=pid))
    for db, (key, peer) in enumerate(PEERS.items(), start=1):
        if reason := peer.missing(peers_python):
            results["skipped"][key] = f"{peer.label}: skipped, {reason}"
            continue
        step(f"peers: {peer.label}")
        url = _database(redis_url, db)
        results["measured"][key] = {
            "label": peer.label,
            **_measure(peer, url, seconds, jobs, peer.python(peers_python)),
        }
    step("peers: taskman serve --phase 3 --workers 1")
    results["full_stack"] = full_stack(_database(redis_url, len(PEERS) + 1), seconds)
    return results


def _database(redis_url: str, db: int) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{db}"


def _measure(
    peer: Peer, url: str, seconds: float, jobs: int, python: str
) -> dict[str, Any]:
    env = {**os.environ, **peer.env, "TASKMAN_REDIS_URL": url}
    connection = redis.Redis.from_url(url)
    connection.flushdb()
    figures: dict[str, Any] = {}
    with _api(python, peer.api, env) as (api_url, pid):
        figures["api_alone"] = asdict(
            load(f"{api_url}/tasks", seconds, body=ECHO, pid=pid)
        )
    # Away with what the API alone queued; then a new API, whose start declares
    # what its library declares there (taskiq's consumer group).
    connection.flushdb()
    with (
        _api(python, peer.api, env) as (api_url, pid),
        _running(peer.worker(python, url), env),
    ):
        _one_through(api_url, connection, peer.backlog)
        figures["with_worker"] = _under_load(
            api_url, seconds, pid, connection, peer.finished
        )
    connection.flushdb()
    _fill(peer, python, env, jobs)
    figures["worker_alone"] = drain(
        connection, peer.backlog, jobs, lambda: start(peer.worker(python, url), env=env)
    )
    connection.flushdb()
    connection.close()
    return figures


@contextmanager
def _api(python: str, module: str, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``module``'s app under uvicorn, run by ``python``, with the baseline's
    settings (1 process, access log off)."""
    port = free_port()
    process = start([python, *api_command(module, port)[1:]], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process.pid
    finally:
        stop(process)


@contextmanager
def _running(argv: list[str], env: dict[str, str]) -> Iterator[Process]:
    process = start(argv, env=env)
    try:
        yield process
    finally:
        stop_tree(process)


def _one_through(url: str, connection: redis.Redis, backlog: Backlog) -> None:
    """One task submitted and finished: the worker is up (Celery takes seconds)."""
    httpx.post(f"{url}/tasks", json=ECHO, timeout=10).raise_for_status()
    _wait_empty(connection, backlog, timeout=60)


def _wait_empty(connection: redis.Redis, backlog: Backlog, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while backlog(connection):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{backlog(connection)} jobs left after {timeout} s")
        time.sleep(0.01)


def _under_load(
    url: str, seconds: float, pid: int, connection: redis.Redis, finished: Backlog
) -> dict[str, Any]:
    """POST load with the worker on: tasks accepted (the load's req/s) and
    finished (the library's own count, read just before and just after) per
    second."""
    before, started = finished(connection), time.perf_counter()
    result = load(f"{url}/tasks", seconds, body=ECHO, pid=pid)
    done, elapsed = finished(connection) - before, time.perf_counter() - started
    return {
        **asdict(result),
        "accepted_per_s": round(result.rps, 1),
        "finished_per_s": round(done / elapsed, 1),
        "finished": done,
    }


def _fill(peer: Peer, python: str, env: dict[str, str], jobs: int) -> None:
    """``jobs`` echo jobs in the peer's queue, enqueued by its own client."""
    if peer.fill_module:
        argv = [python, "-m", "taskman.bench.peers.fill", peer.fill_module, str(jobs)]
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        return
    # A taskman phase: the jobs its API would enqueue, through RQ's own client.
    from rq import Queue
    from rq.serializers import JSONSerializer

    connection = redis.Redis.from_url(env["TASKMAN_REDIS_URL"])
    queue = Queue(env["TASKMAN_QUEUE_NAME"], connection, serializer=JSONSerializer)
    queue.enqueue_many(
        [
            Queue.prepare_data("common.tasks.echo", kwargs={"value": 1})
            for _ in range(jobs)
        ]
    )
    connection.close()


def _stats(connection: redis.Redis) -> tuple[int, int]:
    """Redis's own counts: replies written (one per round trip of a client:
    a pipeline's replies go in one write), commands run."""
    info = cast(dict[str, Any], connection.info("stats"))
    return int(info["total_writes_processed"]), int(info["total_commands_processed"])


def drain(
    connection: redis.Redis,
    backlog: Backlog,
    jobs: int,
    start_worker: Callable[[], Process],
    timeout: float = 120,
) -> dict[str, Any]:
    """A worker alone on a pre-filled queue: its steady jobs/s, and the round trips
    and commands per job Redis served in that time (ours, the polling, taken out).

    Counted by the server, so every library is counted alike, each of its
    connections included; a message pushed to a subscriber counts as a write.
    """
    # What one look at the backlog costs us, in writes and commands.
    before = _stats(connection)
    backlog(connection)
    after = _stats(connection)
    poll_cost = (after[0] - before[0] - 1, after[1] - before[1] - 1)
    high, low = int(jobs * STEADY[0]), int(jobs * STEADY[1])
    marks: list[tuple[float, int, int, tuple[int, int]]] = []
    polls = 0
    worker = start_worker()
    try:
        deadline = time.monotonic() + timeout
        while len(marks) < 2:
            left = backlog(connection)
            polls += 1
            if left <= (high if not marks else low):
                marks.append((time.perf_counter(), left, polls, _stats(connection)))
                continue
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} of {jobs} jobs left after {timeout} s")
            time.sleep(0.002)
    finally:
        stop_tree(worker)
    (t1, left1, polls1, stats1), (t2, left2, polls2, stats2) = marks
    done = left1 - left2
    ours = polls2 - polls1  # our polls between the two marks, and the first INFO
    writes = stats2[0] - stats1[0] - ours * poll_cost[0] - 1
    commands = stats2[1] - stats1[1] - ours * poll_cost[1] - 1
    return {
        "jobs": done,
        "jobs_per_s": round(done / (t2 - t1), 1) if t2 > t1 else 0.0,
        "round_trips_per_job": round(writes / done, 1) if done else 0.0,
        "commands_per_job": round(commands / done, 1) if done else 0.0,
    }


def full_stack(url: str, seconds: float) -> dict[str, Any]:
    """Phase 3 as ``taskman serve --phase 3 --workers 1`` runs it (its own logging,
    uvicorn's access log on), under POST load: tasks accepted and finished per
    second, and the CPU per request of the serving process (the API)."""
    queue = "bench-serve"
    port = free_port()
    env = {
        **os.environ,
        "TASKMAN_REDIS_URL": url,
        "TASKMAN_QUEUE_NAME": queue,
        "TASKMAN_MAX_QUEUED": "1000000",
        **UNLIMITED,
    }
    connection = redis.Redis.from_url(url)
    connection.flushdb()
    argv = taskman_command(
        "serve", "--phase", "3", "--workers", "1", "--port", str(port)
    )
    api_url = f"http://127.0.0.1:{port}"
    with _running(argv, env) as process:
        wait_healthy(api_url, process)
        backlog = rq_backlog(queue)
        _one_through(api_url, connection, backlog)
        figures = _under_load(
            api_url, seconds, process.pid, connection, rq_finished(queue)
        )
    connection.flushdb()
    connection.close()
    return figures
