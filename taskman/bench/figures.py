"""The figures, each measured on real processes: the phases' APIs and workers,
stock RQ's worker, a phase killed mid-run."""

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from taskman.bench.load import percentiles
from taskman.phases import PHASES, queued
from taskman.processes import (
    Process,
    start,
    start_api,
    stop,
    taskman_command,
    wait_healthy,
)
from taskman.redis_server import EmbeddedRedis

# Phase 3 is measured with limits no load generator reaches: the bench measures the
# cost of checking a limit, not of being refused.
UNLIMITED = {
    "TASKMAN_RATE_LIMIT_SUBMIT": "1000000/second",
    "TASKMAN_RATE_LIMIT_READ": "1000000/second",
}
ECHO = {"type": "echo", "payload": {"value": 1}}


def serve(
    module: str, env: dict[str, str] | None = None, port: int | None = None
) -> tuple[Process, str]:
    """``module``'s app under uvicorn, up and healthy; the process and its URL."""
    process, url = start_api(module, {**os.environ, **(env or {})}, port=port)
    wait_healthy(url, process)
    return process, url


@contextmanager
def service(
    module: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """``module``'s app served for the block: its URL and pid (for its CPU)."""
    process, url = serve(module, env)
    try:
        yield url, process.pid
    finally:
        stop(process)


@contextmanager
def workers(count: int, env: dict[str, str], phase: int) -> Iterator[None]:
    processes = [_worker(env, phase) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            stop(process, kill=True)


def _worker(env: dict[str, str], phase: int | None, burst: bool = False) -> Process:
    """``taskman worker --phase PHASE``; with no phase, stock RQ's own."""
    if phase is None:
        # Stock RQ: its own CLI, SimpleWorker, the same JSON serializer.
        command = [
            str(Path(sys.executable).parent / "rq"),
            "worker",
            "-w",
            "rq.worker.SimpleWorker",
            "--serializer",
            "rq.serializers.JSONSerializer",
            "--url",
            env["TASKMAN_REDIS_URL"],
            "--quiet",
            env["TASKMAN_QUEUE_NAME"],
        ]
    else:
        command = taskman_command("worker", "--phase", str(phase))
    if burst:
        command.append("--burst")
    return start(command, env={**os.environ, **env})


def _succeeded(client: httpx.Client, task_id: str, timeout: float = 30) -> Any:
    """Poll a task until it has succeeded; the task."""
    deadline = time.monotonic() + timeout
    while (task := client.get(f"/tasks/{task_id}").json())["status"] != "succeeded":
        if time.monotonic() > deadline:
            raise TimeoutError(task)
        time.sleep(0.01)
    return task


def finished_task(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10) as client:
        task_id: str = client.post("/tasks", json=ECHO).json()["id"]
        _succeeded(client, task_id)
    return task_id


def unfinished_task(url: str) -> str:
    """A task that stays unfinished through the run (due in an hour): what a
    client polling a running task reads, which no cache may keep for long."""
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.post("/tasks", json={**ECHO, "delay_seconds": 3600})
        task_id: str = response.json()["id"]
    return task_id


def echo_latency(url: str, count: int) -> tuple[float, float]:
    """Submit -> succeeded, from the task's own timestamps (server clock)."""
    spans = []
    with httpx.Client(base_url=url, timeout=10) as client:
        ids = []
        for _ in range(count):
            ids.append(client.post("/tasks", json=ECHO).json()["id"])
            time.sleep(0.005)  # one at a time: latency, not throughput
        for task_id in ids:
            task = _succeeded(client, task_id)
            created = datetime.fromisoformat(task["created_at"])
            spans.append(
                (datetime.fromisoformat(task["finished_at"]) - created).total_seconds()
            )
    return percentiles(spans)


def health_latency(url: str, count: int) -> tuple[float, float]:
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            times.append(time.perf_counter() - started)
            time.sleep(0.005)
    return percentiles(times)


def worker_rate(redis_url: str, jobs: int, processes: int, phase: int | None) -> float:
    """Jobs/s of a burst of echo jobs, from RQ's own stamps; by the workers of
    ``phase``, or by stock RQ's. Counted from the first job's end, not its start:
    a worker's first job imports the task module (and a stock worker's, RQ's
    job machinery), a one-off that a burst of 1500 would otherwise spread over
    every job."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(name, connection=connection, serializer=JSONSerializer)
    queue.enqueue_many(
        [
            Queue.prepare_data(
                "common.tasks.echo", kwargs={"value": None}, result_ttl=600
            )
            for _ in range(jobs)
        ]
    )
    # Both quiet: a log line per job costs as much as a Redis round trip.
    env = {
        "TASKMAN_REDIS_URL": redis_url,
        "TASKMAN_QUEUE_NAME": name,
        "TASKMAN_LOG_LEVEL": "WARNING",
    }
    burst = [_worker(env, phase, burst=True) for _ in range(processes)]
    for process in burst:
        process.wait(timeout=600)
    keys = [f"rq:job:{job_id}" for job_id in queue.finished_job_registry.get_job_ids()]
    with connection.pipeline() as pipe:
        for key in keys:
            pipe.hmget(key, ["started_at", "ended_at"])
        stamps = pipe.execute()
    if len(stamps) != jobs:
        raise RuntimeError(f"{jobs - len(stamps)} jobs did not finish")
    ends = [datetime.fromisoformat(e.decode()) for _, e in stamps]
    connection.close()
    return (jobs - 1) / (max(ends) - min(ends)).total_seconds()


def durability(phase: int, data: Path, count: int = 200) -> dict[str, int]:
    """Submit ``count`` short tasks, SIGKILL the API (and a worker) mid-run,
    start them again, and count the tasks that got a 202 but are gone."""
    env = {
        "TASKMAN_IO_CONCURRENCY": "4",
        "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
        "TASKMAN_RETRY_BACKOFF": "0",
        **UNLIMITED,
    }
    body = {"type": "sleep", "payload": {"seconds": 0.02}}
    with contextlib.ExitStack() as stack:
        if queued(phase):
            store = EmbeddedRedis(data / f"durability{phase}")
            env["TASKMAN_REDIS_URL"] = stack.enter_context(store)
            env["TASKMAN_QUEUE_NAME"] = "durability"
        api, url = serve(PHASES[phase], env)
        port = int(url.rsplit(":", 1)[1])
        worker = _worker(env, phase) if queued(phase) else None
        with httpx.Client(base_url=url, timeout=10) as client:
            ids = [client.post("/tasks", json=body).json()["id"] for _ in range(count)]
        time.sleep(0.2)  # some ran, most wait
        stop(api, kill=True)
        if worker is not None:
            stop(worker, kill=True)
            time.sleep(1.1)  # what got a 202 is fsynced to the AOF within a second
        api, url = serve(PHASES[phase], env, port=port)
        stack.callback(stop, api)
        if queued(phase):
            stack.enter_context(workers(1, env, phase))
        lost = 0
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 60
            for task_id in ids:
                while True:
                    response = client.get(f"/tasks/{task_id}")
                    if response.status_code == 404:
                        lost += 1
                        break
                    if response.json()["status"] in ("succeeded", "failed", "canceled"):
                        break
                    if time.monotonic() > deadline:
                        lost += 1  # stuck counts as lost
                        break
                    time.sleep(0.02)
    return {"submitted": count, "lost": lost}


def loop_figures(seconds: float) -> dict[str, Any]:
    """/health p50/p99: idle; pool saturated; pool as large as the machine; naive."""
    cores = os.cpu_count() or 2
    variants = {
        "default pool": ("phase1_inprocess", {}),
        f"pool of {cores} (one per core)": (
            "phase1_inprocess",
            {"TASKMAN_CPU_WORKERS": str(cores)},
        ),
        "naive (CPU work on the loop)": ("taskman.naive", {}),
    }
    figures: dict[str, Any] = {}
    count = max(30, int(seconds * 20))
    for label, (module, env) in variants.items():
        with service(module, env) as (url, _):
            if not figures:
                figures["idle"] = health_latency(url, count)
            busy = {"type": "hash", "payload": {"data": "x", "iterations": 2_000_000}}
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(cores * 4):
                    client.post("/tasks", json=busy)
            time.sleep(0.3)
            figures[label] = health_latency(url, count)
    return figures
