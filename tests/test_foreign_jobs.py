"""Jobs that another RQ client wrote, or damaged: stock ``rq`` tools, plain RQ's
cancel, RQ's clean-up of a dead worker's job, a meta of the wrong shape. Every read
answers a clean task or 404 (never a 500), a finished task always has its
``finished_at``, and no such job stops a worker, the scheduler, or anyone's retry."""

import json
import pickle
import signal
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job

import phase2_queue
import phase3_production
from common.models import Task
from common.settings import Settings
from tests.conftest import submit, wait_for
from tests.processes import BIN, drain_queue
from tests.test_phase2 import start_worker

PHASES = [
    pytest.param((2, phase2_queue.create_app), id="phase2"),
    pytest.param((3, phase3_production.create_app), id="phase3"),
]
Phase = tuple[int, Callable[[Settings], FastAPI]]


@pytest.fixture
def queue_settings(redis_url: str) -> Settings:
    """A queue of this test's own: the test decides who runs what."""
    return Settings(
        redis_url=redis_url,
        queue_name=f"q{uuid.uuid4().hex[:8]}",
        retry_backoff=[0],
        rate_limit_submit="100000/second",
        rate_limit_read="100000/second",
    )


@pytest.fixture
def connection(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def client_of(phase: Phase, settings: Settings) -> TestClient:
    # A 500 is answered as a 500 (as a real server would), not raised in the test.
    return TestClient(phase[1](settings), raise_server_exceptions=False)


def read_twice(client: TestClient, task_id: str) -> dict[str, object]:
    """GET the task twice (phase 3's second read comes from its cache): both 200,
    the same task."""
    first, second = client.get(f"/tasks/{task_id}"), client.get(f"/tasks/{task_id}")
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json() == second.json()
    task: dict[str, object] = first.json()
    return task


def kill(worker: subprocess.Popen[bytes] | None) -> None:
    if worker is not None:
        worker.kill()
        worker.wait()


# --- 1. a finished task always has finished_at


@pytest.mark.parametrize("phase", PHASES)
def test_a_task_whose_worker_dies_on_its_last_attempt_is_failed_with_its_finished_at(
    queue_settings: Settings, phase: Phase
) -> None:
    """RQ's clean-up fails a dead worker's job with a result but no ended_at."""
    doomed = start_worker(queue_settings, phase[0])
    rescuer = None
    try:
        with client_of(phase, queue_settings) as client:
            task = submit(client, "sleep", seconds=30, max_retries=0)
            wait_for(client, task["id"], "running")
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            killed_at = time.time()
            rescuer = start_worker(queue_settings, phase[0])
            wait_for(client, task["id"], "failed", timeout=30)
            final = read_twice(client, task["id"])
        assert str(final["error"]).startswith("WorkerLost: "), final
        assert final["finished_at"] is not None, final
        finished = Task.model_validate(final).finished_at
        assert finished is not None
        assert killed_at - 1 < finished.timestamp() < time.time() + 1
    finally:
        kill(doomed)
        kill(rescuer)


@pytest.mark.parametrize("phase", PHASES)
def test_a_queued_task_canceled_with_plain_rq_reads_canceled_with_its_finished_at(
    queue_settings: Settings, phase: Phase, connection: redis.Redis
) -> None:
    """Plain RQ's Job.cancel() (a stock client: RQ's default serializer) writes
    neither ended_at nor a result; the canceled registry dates it."""
    with client_of(phase, queue_settings) as client:
        task = submit(client, "echo", value=1)  # no worker: it stays queued
        before = time.time()
        Job.fetch(task["id"], connection=connection).cancel()
        final = read_twice(client, task["id"])
    assert final["status"] == "canceled", final
    finished = Task.model_validate(final).finished_at
    assert finished is not None, final
    assert before - 1 < finished.timestamp() < time.time() + 1


# --- 4. a foreign or damaged job stops nobody


def make_due(connection: redis.Redis, queue: str, job_id: str) -> None:
    """Move a queued job to the scheduled registry, due now: a delayed retry."""
    connection.lrem(f"rq:queue:{queue}", 0, job_id)
    connection.hset(f"rq:job:{job_id}", "status", "scheduled")
    connection.zadd(f"rq:scheduled:{queue}", {job_id: int(time.time())})


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("meta", [b"5", b"null", b"[1]", pickle.dumps({"a": b"x"})])
def test_a_scheduled_job_with_a_foreign_meta_delays_no_other_retry(
    queue_settings: Settings, phase: Phase, connection: redis.Redis, meta: bytes
) -> None:
    """RQ's scheduler moves every due job in one pipeline; a meta that RQ's Job
    cannot write back made it raise on every pass, and no delayed retry ran."""
    settings = queue_settings.model_copy(update={"retry_backoff": [1.0]})
    worker = None
    try:
        with client_of(phase, settings) as client:
            foreign = submit(client, "echo", value="foreign")
            connection.hset(f"rq:job:{foreign['id']}", "meta", meta)
            make_due(connection, settings.queue_name, foreign["id"])
            worker = start_worker(settings, phase[0])
            task = submit(client, "flaky", fail_times=1, max_retries=1)
            started = time.monotonic()
            final = wait_for(client, task["id"], timeout=30)
            assert (final["status"], final["attempts"]) == ("succeeded", 2), final
            assert time.monotonic() - started < 15  # the retry's delay is 1 s
            # The foreign job went its own way: run (its data is ours), no 500.
            moved = wait_for(client, foreign["id"], timeout=20)
            assert moved["status"] == "succeeded", moved
    finally:
        kill(worker)


DAMAGE = {
    "meta 5": {"meta": b"5"},
    "meta null": {"meta": b"null"},
    "meta a list": {"meta": b"[1]"},
    "max_retries not an int": {"meta": b'{"max_retries": "x"}'},
    "meta pickled": {"meta": pickle.dumps({"max_retries": 2})},
    "created_at not a date": {"created_at": b"yesterday"},
    "attempts not a number": {"attempts": b"x"},
    "status unknown": {"status": b"bogus"},
    "kwargs not an object": {
        "data": zlib.compress(json.dumps(["common.tasks.echo", None, [], 5]).encode())
    },
}


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_a_damaged_job_reads_as_a_clean_task_or_404_and_a_burst_worker_goes_on(
    queue_settings: Settings,
    phase: Phase,
    connection: redis.Redis,
    damage: dict[str, bytes],
) -> None:
    with client_of(phase, queue_settings) as client:
        damaged = submit(client, "flaky", fail_times=1, max_retries=1)
        after = submit(client, "echo", value="after")
        connection.hset(f"rq:job:{damaged['id']}", mapping=damage)

        def read_cleanly() -> None:
            response = client.get(f"/tasks/{damaged['id']}")
            assert response.status_code in (200, 404), response.text
            if response.status_code == 200:
                Task.model_validate(response.json())

        read_cleanly()
        # One burst worker: it must not quit at the damaged job (exit 1, or
        # leave the next one queued).
        drain_queue(queue_settings, phase=phase[0])
        assert wait_for(client, after["id"])["status"] == "succeeded"
        read_cleanly()
        response = client.delete(f"/tasks/{damaged['id']}")
        assert response.status_code in (200, 404, 409), response.text
        read_cleanly()


@pytest.mark.parametrize("phase", PHASES)
def test_a_job_with_rqs_default_id_is_404(
    queue_settings: Settings, phase: Phase, connection: redis.Redis
) -> None:
    job = Queue(queue_settings.queue_name, connection=connection).enqueue(
        "common.tasks.echo", 1
    )
    with client_of(phase, queue_settings) as client:
        for response in (
            client.get(f"/tasks/{job.id}"),
            client.delete(f"/tasks/{job.id}"),
        ):
            assert response.status_code == 404, response.text


@pytest.mark.parametrize("phase", PHASES)
def test_a_task_requeued_and_run_by_stock_rq_tools_reads_cleanly_and_runs_again(
    queue_settings: Settings, phase: Phase, connection: redis.Redis, tmp_path: Path
) -> None:
    """Stock ``rq requeue`` and a stock ``rq worker``, neither told ``-S json``:
    the job they write back still reads, and still runs on our worker."""
    url, queue = str(queue_settings.redis_url), queue_settings.queue_name
    with client_of(phase, queue_settings) as client:
        task = submit(client, "flaky", fail_times=1, max_retries=0)
        drain_queue(queue_settings, phase=phase[0])
        assert wait_for(client, task["id"])["status"] == "failed"
        rq = [str(BIN / "rq")]
        for command in (
            [*rq, "requeue", "-u", url, "--queue", queue, "--all"],
            [*rq, "worker", "-u", url, "--burst", queue],  # fails it: not pickle
            [*rq, "requeue", "-u", url, "--queue", queue, "--all"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=60)
            read_twice(client, task["id"])
        drain_queue(queue_settings, phase=phase[0])
        final = wait_for(client, task["id"])
    assert final["status"] == "succeeded", final
    assert final["finished_at"] is not None
