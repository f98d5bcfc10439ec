"""What phase 2 adds: nothing is lost when the API, a worker or Redis itself dies."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

import phase3_production
from common.settings import Settings
from phase2_queue import create_app
from taskman.redis_server import EmbeddedRedis
from tests.conftest import submit, wait_for
from tests.processes import drain_queue


@pytest.fixture
def queue_settings(redis_url: str) -> Settings:
    """A queue no session worker listens to: the test decides who runs what."""
    return Settings(
        redis_url=redis_url, queue_name=f"q{uuid.uuid4().hex[:8]}", retry_backoff=[0]
    )


def start_worker(settings: Settings, phase: int = 2) -> subprocess.Popen[bytes]:
    """A real ``taskman worker`` of ``phase`` on the settings' queue, quick to
    notice a dead worker's job."""
    env = {
        **os.environ,
        "TASKMAN_REDIS_URL": str(settings.redis_url),
        "TASKMAN_QUEUE_NAME": settings.queue_name,
        "TASKMAN_JOB_HEARTBEAT_SECONDS": "4",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "taskman", "worker", "--phase", str(phase)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_an_api_restart_loses_no_queued_task(queue_settings: Settings) -> None:
    with TestClient(create_app(queue_settings)) as client:
        ids = [submit(client, "echo", value=i)["id"] for i in range(20)]
    # The API is gone; the tasks wait in Redis for a worker.
    drain_queue(queue_settings)
    with TestClient(create_app(queue_settings)) as client:
        for i, task_id in enumerate(ids):
            task = wait_for(client, task_id)
            assert (task["status"], task["result"]) == ("succeeded", i)


@pytest.mark.parametrize(("max_retries", "ends"), [(1, "succeeded"), (0, "failed")])
def test_a_task_whose_worker_is_killed_is_retried_or_failed_within_30s(
    queue_settings: Settings, max_retries: int, ends: str
) -> None:
    doomed = start_worker(queue_settings)
    rescuer = None
    try:
        with TestClient(create_app(queue_settings)) as client:
            task = submit(client, "sleep", seconds=2, max_retries=max_retries)
            wait_for(client, task["id"], "running")
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            killed_at = time.monotonic()
            rescuer = start_worker(queue_settings)
            final = wait_for(client, task["id"], timeout=30)
            assert time.monotonic() - killed_at < 30
            assert final["status"] == ends, final
            if ends == "succeeded":
                assert final["attempts"] == 2
                assert final["result"] == {"slept": 2}
            else:
                assert final["attempts"] == 1
                assert final["error"].startswith("WorkerLost: worker ")
    finally:
        for worker in (doomed, rescuer):
            if worker is not None:
                worker.kill()
                worker.wait()


@pytest.mark.parametrize("phase", [2, 3])
def test_a_task_longer_than_its_heartbeat_ttl_runs_once_to_the_end(
    queue_settings: Settings, phase: int
) -> None:
    """The worker's keeper thread beats the running job's heartbeat (a 4 s TTL
    here): a task that runs longer is not taken for a dead worker's. A keeper that
    an RQ upgrade broke would let the clean-up (the idle worker's, here) fail it
    as abandoned, mid-run."""
    workers = [start_worker(queue_settings, phase) for _ in range(2)]
    try:
        with TestClient(create_app(queue_settings)) as client:
            task = submit(client, "sleep", seconds=7, max_retries=0)
            final = wait_for(client, task["id"], timeout=30)
        assert (final["status"], final["attempts"]) == ("succeeded", 1), final
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


@pytest.mark.parametrize("phase", [2, 3])
def test_a_task_canceled_mid_run_leaves_no_execution_behind(
    queue_settings: Settings, phase: int
) -> None:
    """The worker's canceled path (not a failure) cleans up RQ's record of the run
    itself: nothing left in the started registry or the worker's executions."""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    worker = start_worker(queue_settings, phase)
    try:
        with TestClient(create_app(queue_settings)) as client:
            task = submit(client, "sleep", seconds=30)
            wait_for(client, task["id"], "running")
            assert client.delete(f"/tasks/{task['id']}").status_code == 200
            after = submit(client, "echo", value=1)  # the worker has moved on
            assert wait_for(client, after["id"])["status"] == "succeeded"
        assert connection.zcard(f"rq:wip:{queue_settings.queue_name}") == 0
        assert not connection.keys(f"rq:execution:{task['id']}:*")
        for key in connection.smembers(f"rq:workers:{queue_settings.queue_name}"):
            assert connection.scard(key + b":executions") == 0
    finally:
        worker.kill()
        worker.wait()


def test_every_accepted_task_survives_a_redis_kill(own_redis: EmbeddedRedis) -> None:
    settings = Settings(redis_url=own_redis.url, retry_backoff=[0])
    with TestClient(create_app(settings)) as client:
        ids = [submit(client, "echo", value=i)["id"] for i in range(50)]
    time.sleep(1.5)  # appendfsync everysec: what got a 202 a second ago is on disk
    own_redis.restart(kill=True)
    drain_queue(settings)
    with TestClient(create_app(settings)) as client:
        for i, task_id in enumerate(ids):
            assert wait_for(client, task_id)["result"] == i


def test_redis_down_is_503_then_everything_recovers(own_redis: EmbeddedRedis) -> None:
    settings = Settings(redis_url=own_redis.url, retry_backoff=[0])
    worker = start_worker(settings)
    try:
        with TestClient(create_app(settings)) as client:
            before = submit(client, "echo", value="before")
            own_redis.stop()
            for response in (
                client.post("/tasks", json={"type": "echo", "payload": {"value": 1}}),
                client.get(f"/tasks/{before['id']}"),
                client.delete(f"/tasks/{before['id']}"),
                client.get("/health"),
            ):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"]
                assert "Redis" in response.text
            assert client.get("/health").json()["status"] == "degraded"
            own_redis.start()
            # Same API process, same worker process: both reconnect by themselves.
            assert client.get("/health").status_code == 200
            after = submit(client, "echo", value="after")
            assert wait_for(client, after["id"], timeout=30)["result"] == "after"
            assert wait_for(client, before["id"], timeout=30)["result"] == "before"
    finally:
        worker.kill()
        worker.wait()


def test_tasks_are_plain_rq_jobs_seen_by_rq_info(queue_settings: Settings) -> None:
    with TestClient(create_app(queue_settings)) as client:
        task = submit(client, "echo", value={"html": "<b>"})
    info = subprocess.run(
        [
            str(Path(sys.executable).parent / "rq"),
            "info",
            "--url",
            str(queue_settings.redis_url),
            queue_settings.queue_name,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert queue_settings.queue_name in info.stdout
    assert re.search(r"\b1 jobs? total", info.stdout), info.stdout
    # JSON, never pickle: the job's data decodes as JSON naming a registered function.
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    data = json.loads(zlib.decompress(connection.hget(f"rq:job:{task['id']}", "data")))
    assert data[0] == "common.tasks.echo"
    assert (
        connection.hget(f"rq:job:{task['id']}", "description") == b"taskman echo task"
    )
    drain_queue(queue_settings)


def test_an_idempotency_key_holds_across_api_processes(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"type": "echo", "payload": {"value": "once"}}
    with (
        TestClient(create_app(settings)) as one,
        TestClient(create_app(settings)) as two,
    ):
        first = one.post("/tasks", json=body, headers=key)
        again = two.post("/tasks", json=body, headers=key)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]


def test_health_reports_queue_depth_and_workers(queue_settings: Settings) -> None:
    with TestClient(create_app(queue_settings)) as client:
        for i in range(3):
            submit(client, "echo", value=i)
        health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "phase": 2,
        "redis": "ok",
        "queued": 3,
        "workers": 0,
    }
    drain_queue(queue_settings)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_delayed_retries_run_after_the_scheduler_worker_stops(
    queue_settings: Settings, stop: signal.Signals
) -> None:
    # Retries with a delay wait in RQ's scheduled registry; one worker's scheduler
    # moves them to the queue. When that worker goes, another must take over.
    settings = queue_settings.model_copy(update={"retry_backoff": [1.0]})
    first = start_worker(settings)
    second = None
    try:
        # The first one takes the scheduler lock before the second exists.
        connection = redis.Redis.from_url(str(settings.redis_url))
        lock = f"rq:scheduler-lock:{settings.queue_name}"
        deadline = time.monotonic() + 10
        while not connection.exists(lock):
            assert time.monotonic() < deadline, "no worker took the scheduler lock"
            time.sleep(0.1)
        second = start_worker(settings)
        first.send_signal(stop)
        first.wait(timeout=30)
        with TestClient(create_app(settings)) as client:
            task = submit(client, "flaky", fail_times=1, max_retries=2)
            final = wait_for(client, task["id"], timeout=40)
        assert (final["status"], final["attempts"]) == ("succeeded", 2), final
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.kill()
                worker.wait()


@pytest.mark.parametrize(
    "data",
    [
        zlib.compress(pickle.dumps(("os.system", None, ("true",), {}))),
        b"not even zlib",
        zlib.compress(b'{"not": "a call"}'),
    ],
    ids=["pickle", "garbage", "json but not a call"],
)
def test_a_job_that_is_not_ours_is_404_and_left_alone(
    queue_settings: Settings, data: bytes
) -> None:
    """Anyone who can write to Redis can leave a job there that no JSON decoder
    reads: GET and DELETE must answer 404 (not 500), and DELETE must not touch it."""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    job_id = uuid.uuid4().hex
    key = f"rq:job:{job_id}"
    connection.hset(key, mapping={"data": data, "status": "queued"})
    try:
        with TestClient(create_app(queue_settings)) as client:
            for response in (
                client.get(f"/tasks/{job_id}"),
                client.delete(f"/tasks/{job_id}"),
            ):
                assert response.status_code == 404, response.text
                assert response.json() == {"detail": "task not found"}
        assert connection.hget(key, "status") == b"queued"
    finally:
        connection.delete(key)


@pytest.mark.parametrize(
    "create", [create_app, phase3_production.create_app], ids=["phase2", "phase3"]
)
def test_a_redis_refusing_writes_is_503_and_reads_still_work(
    own_redis: EmbeddedRedis, create: Callable[[Settings], FastAPI]
) -> None:
    """Redis up but out of memory (maxmemory, noeviction): no 500, no false 202."""
    settings = Settings(redis_url=own_redis.url)
    connection = redis.Redis.from_url(own_redis.url)
    worker = start_worker(settings)
    try:
        with TestClient(create(settings)) as client:
            done = submit(client, "echo", value="done")
            deadline = time.monotonic() + 20  # finished, and never read: not cached
            while connection.hget(f"rq:job:{done['id']}", "status") != b"finished":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            connection.config_set("maxmemory-policy", "noeviction")
            connection.config_set("maxmemory", "1")
            try:
                refused = client.post(
                    "/tasks", json={"type": "echo", "payload": {"value": 1}}
                )
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"]
                assert "refuses writes" in refused.json()["detail"]
                read = client.get(f"/tasks/{done['id']}")
                assert read.status_code == 200, read.text
                assert read.json()["result"] == "done"
            finally:
                connection.config_set("maxmemory", "0")
            after = submit(client, "echo", value="after")
            assert wait_for(client, after["id"], timeout=30)["result"] == "after"
    finally:
        worker.kill()
        worker.wait()
