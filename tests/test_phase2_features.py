"""Issue 11 on RQ's own features (phase 2): stock ``rq`` tools see the priority
queues and the scheduled jobs; a batch is one transaction; a page of the list
reads a bounded number of keys; a wait wakes on RQ's results stream.

The contract itself is tests/test_features*.py, run in every phase; this file
checks how phase 2 does it, on a Redis of each test's own where it counts
commands (INFO commandstats), so that no other client's are counted.
"""

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from common.settings import Settings
from phase2_queue import create_app
from phase2_queue.jobs import index_key, queue_names
from taskman.redis_server import EmbeddedRedis
from tests.conftest import wait_for
from tests.processes import drain_queue
from tests.test_phase2 import start_worker

RQ = str(Path(sys.executable).parent / "rq")


@pytest.fixture
def settings(own_redis: EmbeddedRedis) -> Settings:
    return Settings(
        redis_url=own_redis.url,
        queue_name=f"q{uuid.uuid4().hex[:8]}",
        retry_backoff=[0],
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def connection(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(str(settings.redis_url))


def calls(connection: redis.Redis) -> dict[str, int]:
    """Commands Redis has run since the last CONFIG RESETSTAT, by name."""
    stats: Any = connection.info("commandstats")
    counted = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
    return {name: n for name, n in counted.items() if name not in ("info", "config")}


def batch(client: TestClient, tasks: list[dict[str, Any]], status: int = 202) -> Any:
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == status, response.text
    return response.json()


def echo(value: Any, **fields: Any) -> dict[str, Any]:
    return {"type": "echo", "payload": {"value": value}, **fields}


# --- priority and scheduling, as stock RQ sees them


def test_rq_sees_the_priority_queues_and_the_scheduled_jobs(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    high, normal, low = queue_names(settings)
    assert (high, normal, low) == (
        f"{settings.queue_name}-high",
        settings.queue_name,
        f"{settings.queue_name}-low",
    )
    tasks = batch(
        client,
        [
            echo(1, priority="high"),
            echo(2),
            echo(3, priority="low"),
            echo(4, priority="low"),
            echo(5, priority="high", delay_seconds=600),
        ],
    )["tasks"]
    queues = {
        name: Queue(name, connection=connection, serializer=JSONSerializer)
        for name in (high, normal, low)
    }
    assert [queues[name].job_ids for name in (high, normal, low)] == [
        [tasks[0]["id"]],
        [tasks[1]["id"]],
        [tasks[2]["id"], tasks[3]["id"]],
    ]
    scheduled = ScheduledJobRegistry(queue=queues[high])
    assert scheduled.get_job_ids() == [tasks[4]["id"]]
    # RQ's registry holds the due time in whole seconds, never before run_at.
    due = scheduled.get_scheduled_time(tasks[4]["id"])
    run_at = datetime.fromisoformat(tasks[4]["run_at"])
    assert run_at <= due < run_at + timedelta(seconds=1)
    info = subprocess.run(
        [RQ, "info", "--url", str(settings.redis_url), high, normal, low],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    for name, count in ((high, 1), (normal, 1), (low, 2)):
        assert re.search(rf"^{name} +\|\S* {count},", info.stdout, re.M), info.stdout
    # The priority reads back from the job's queue.
    assert client.get(f"/tasks/{tasks[3]['id']}").json()["priority"] == "low"
    assert client.get(f"/tasks/{tasks[4]['id']}").json()["status"] == "scheduled"


def test_a_worker_takes_high_then_normal_then_low(
    client: TestClient, settings: Settings
) -> None:
    tasks = batch(
        client,
        [echo(0, priority="low"), echo(1), echo(2, priority="high"), echo(3)],
    )["tasks"]
    drain_queue(settings)  # one burst worker, on the three queues in order
    started = {t["id"]: wait_for(client, t["id"])["started_at"] for t in tasks}
    order = sorted(started, key=started.__getitem__)
    assert order == [tasks[2]["id"], tasks[1]["id"], tasks[3]["id"], tasks[0]["id"]]


def test_the_scheduler_moves_due_jobs_of_every_queue(
    client: TestClient, settings: Settings
) -> None:
    tasks = [
        client.post("/tasks", json=echo(p, priority=p, delay_seconds=1)).json()
        for p in ("high", "normal", "low")
    ]
    assert {task["status"] for task in tasks} == {"scheduled"}
    worker = start_worker(settings)
    try:
        for task in tasks:
            done = wait_for(client, task["id"], timeout=20)
            assert done["status"] == "succeeded", done
            assert done["started_at"] >= task["run_at"]
    finally:
        worker.kill()
        worker.wait()


def test_a_canceled_scheduled_job_leaves_rqs_scheduled_registry(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    task = client.post("/tasks", json=echo(1, priority="low", delay_seconds=60)).json()
    low = Queue(queue_names(settings)[2], connection=connection)
    assert ScheduledJobRegistry(queue=low).get_job_ids() == [task["id"]]
    canceled = client.delete(f"/tasks/{task['id']}")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert ScheduledJobRegistry(queue=low).get_job_ids() == []
    assert task["id"].encode() in connection.zrange(f"rq:canceled:{low.name}", 0, -1)


# --- a batch is one transaction


def test_a_batch_is_one_multi_exec_with_its_index_and_key(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    tasks = [echo(i, priority=("high", "normal", "low")[i % 3]) for i in range(99)]
    tasks.append(echo("later", delay_seconds=60))
    connection.config_resetstat()
    response = client.post(
        "/tasks/batch", json={"tasks": tasks}, headers={"Idempotency-Key": "b1"}
    )
    assert response.status_code == 202, response.text
    counted = calls(connection)
    assert counted["multi"] == counted["exec"] == 1, counted
    assert counted["zadd"] == 2  # the index (all 100), the scheduled registry
    assert connection.zcard(index_key(settings)) == 100
    assert connection.exists("taskman:idempotency:b1")
    # Enqueued in the order sent, whatever the queues: the list shows it newest first.
    sent = [task["id"] for task in response.json()["tasks"]]
    listed = client.get("/tasks", params={"limit": 100}).json()["tasks"]
    assert [task["id"] for task in listed] == sent[::-1]


def test_a_batch_redis_refuses_is_not_half_queued(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    """Redis out of memory (maxmemory, noeviction) refuses the transaction's
    writes: the whole batch is a 503, and not one job, index entry or key lands."""
    before = connection.dbsize()
    connection.config_set("maxmemory", "1")
    try:
        response = client.post(
            "/tasks/batch",
            json={"tasks": [echo(i) for i in range(50)]},
            headers={"Idempotency-Key": "full"},
        )
    finally:
        connection.config_set("maxmemory", "0")
    assert response.status_code == 503, response.text
    assert connection.dbsize() == before
    assert connection.zcard(index_key(settings)) == 0


# --- the list's cost is bounded


def test_a_page_reads_only_what_it_shows_however_many_tasks_there_are(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    for _ in range(3):
        batch(client, [echo(i) for i in range(1000)])
    connection.config_resetstat()
    page = client.get("/tasks", params={"limit": 10}).json()
    assert len(page["tasks"]) == 10 and page["next_cursor"]
    counted = calls(connection)
    assert counted.get("hgetall") == 10, counted  # the jobs shown, no more
    assert counted.get("zrevrangebylex") == 1, counted
    assert sum(counted.values()) <= 25, counted
    # A filtered page looks at its budget (10 x limit) at most, then stops.
    connection.config_resetstat()
    page = client.get("/tasks", params={"limit": 5, "status": "failed"}).json()
    assert page["tasks"] == [] and page["next_cursor"]
    assert calls(connection).get("hgetall") == 50


def test_a_page_drops_the_index_entries_of_expired_jobs(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    tasks = batch(client, [echo(i) for i in range(5)])["tasks"]
    for task in tasks[1:4]:  # as RQ's TTL would
        connection.delete(f"rq:job:{task['id']}")
    page = client.get("/tasks").json()
    assert [t["id"] for t in page["tasks"]] == [tasks[4]["id"], tasks[0]["id"]]
    assert connection.zcard(index_key(settings)) == 2


# --- wait blocks on RQ's results stream


def test_a_wait_wakes_on_the_results_stream_not_by_polling(
    client: TestClient, settings: Settings, connection: redis.Redis
) -> None:
    """Five waits, each on a task that ends in the middle of a slice: each answers
    within a few milliseconds of the end (woken by the result's XADD; a wait that
    only read the job at the end of each 0.25 s slice would be late by 0.125 s on
    average), and the API reads the job about four times a second, never in a
    loop of polls."""
    worker = start_worker(settings)
    lateness: list[float] = []
    try:
        warm = client.post("/tasks", json=echo("warm")).json()
        wait_for(client, warm["id"])  # the worker is up
        connection.config_resetstat()
        for _ in range(5):
            task = client.post(
                "/tasks", json={"type": "sleep", "payload": {"seconds": 0.6}}
            ).json()
            answer = client.get(f"/tasks/{task['id']}", params={"wait": 20})
            answered = datetime.now(UTC)
            done = answer.json()
            assert done["status"] == "succeeded", done
            ended = datetime.fromisoformat(done["finished_at"])
            lateness.append((answered - ended).total_seconds())
        counted = calls(connection)
    finally:
        worker.kill()
        worker.wait()
    assert sorted(lateness)[2] < 0.05, lateness  # the median
    assert max(lateness) < 0.25, lateness
    # About 3 s of waiting in slices of 0.25 s: some 12 blocks and as many reads
    # of the job (the worker reads each job a few times too).
    assert 5 <= counted.get("xread", 0) <= 25, counted
    assert counted.get("hgetall", 0) <= 50, counted


def test_a_wait_on_a_task_that_does_not_change_answers_after_its_timeout(
    client: TestClient,
) -> None:
    """Sliced into blocks of a second, the wait still ends at its own timeout."""
    task = client.post("/tasks", json=echo(1, delay_seconds=60)).json()
    started = time.monotonic()
    same = client.get(f"/tasks/{task['id']}", params={"wait": 1.5}).json()
    assert same["status"] == "scheduled"
    assert 1.4 <= time.monotonic() - started < 3


def test_health_counts_all_three_queues_and_each_worker_once(
    client: TestClient, settings: Settings
) -> None:
    batch(client, [echo(1, priority="high"), echo(2), echo(3, priority="low")])
    assert client.get("/health").json()["queued"] == 3
    worker = start_worker(settings)
    try:
        deadline = time.monotonic() + 20
        while client.get("/health").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.1)
        health = client.get("/health").json()
        # One worker, in the worker set of each of the three queues: counted once.
        assert (health["queued"], health["workers"]) == (0, 1), health
    finally:
        worker.kill()
        worker.wait()


def test_a_batch_key_whose_tasks_expired_starts_afresh(
    client: TestClient, connection: redis.Redis
) -> None:
    body = {"tasks": [echo(1), echo(2, priority="low")]}
    key = {"Idempotency-Key": "again"}
    first = client.post("/tasks/batch", json=body, headers=key)
    repeat = client.post("/tasks/batch", json=body, headers=key)
    assert (first.status_code, repeat.status_code) == (202, 200)
    assert repeat.json() == first.json()
    connection.delete(f"rq:job:{first.json()['tasks'][1]['id']}")  # as its TTL would
    fresh = client.post("/tasks/batch", json=body, headers=key)
    assert fresh.status_code == 202, fresh.text
    old = {task["id"] for task in first.json()["tasks"]}
    assert not old & {task["id"] for task in fresh.json()["tasks"]}
