"""Phase 3's engine room: its fast paths write and do what plain RQ would.

Each optimisation leans on something RQ does not promise (its job format, when
its worker calls which method); these tests are where an RQ upgrade that changes
one of those fails, rather than a job.
"""

import json
import math
import subprocess
import sys
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

import phase2_queue
import phase3_production
from common.listing import position
from common.settings import Settings
from phase2_queue.jobs import index_key, queue_names
from phase3_production.enqueue import ENQUEUE
from tests.conftest import submit, wait_for
from tests.processes import drain_queue
from tests.test_phase2 import start_worker


@pytest.fixture
def queue_settings(redis_url: str) -> Settings:
    """A queue no session worker listens to: the test decides who runs what."""
    return Settings(
        redis_url=redis_url,
        queue_name=f"e{uuid.uuid4().hex[:8]}",
        retry_backoff=[0],
        rate_limit_submit="100000/second",
    )


# A moment to schedule at, the same for both phases (so their scores and metas
# compare): an hour ahead, to the millisecond.
RUN_AT = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="milliseconds")


def placement(connection: redis.Redis, settings: Settings, task: Any) -> Any:
    """Where a task's job is: which queue's list holds its id, which scheduled
    registry and at what score (relative to its due time), and its index entry."""
    names = queue_names(settings)
    due = (
        math.ceil(datetime.fromisoformat(task["run_at"]).timestamp())
        if task["run_at"]
        else 0
    )
    member = position(task["id"], datetime.fromisoformat(task["created_at"]))
    return {
        "queued in": [
            name
            for name in names
            if task["id"].encode() in connection.lrange(f"rq:queue:{name}", 0, -1)
        ],
        "scheduled in": [
            (name, score - due)
            for name in names
            if (score := connection.zscore(f"rq:scheduled:{name}", task["id"]))
            is not None
        ],
        "known queues": sorted(
            name
            for name in names
            if connection.sismember("rq:queues", f"rq:queue:{name}")
        ),
        "indexed": connection.zscore(index_key(settings), member),
    }


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": 0},
        {"max_retries": 3},
        {"priority": "high"},
        {"priority": "low", "max_retries": 2},
        {"run_at": RUN_AT},
        {"run_at": RUN_AT, "priority": "high", "max_retries": 1},
        {"delay_seconds": 3600, "priority": "low"},
    ],
)
def test_the_fast_enqueue_stores_the_job_as_phase_2s_plain_enqueue_does(
    queue_settings: Settings, options: dict[str, Any]
) -> None:
    """Phase 3's POST writes RQ's job hash itself (enqueue.py); field for field it
    must be what phase 2's ``Queue.enqueue`` (``enqueue_at`` for a due time)
    writes for the same task, in the same queue or scheduled registry, with the
    same index entry."""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    body = {"type": "echo", "payload": {"value": [1, "é"]}, **options}
    jobs, places = [], []
    for phase in (phase3_production, phase2_queue):
        with TestClient(phase.create_app(queue_settings)) as client:
            response = client.post("/tasks", json=body)
            assert response.status_code == 202, response.text
            task = response.json()
        jobs.append(connection.hgetall(f"rq:job:{task['id']}"))
        places.append(placement(connection, queue_settings, task))
    drain_queue(queue_settings)
    ours, theirs = jobs

    assert places[0] == places[1]
    assert places[0]["indexed"] == 0
    assert ours.keys() == theirs.keys()
    # The moments differ (two tasks); each is a timestamp in RQ's format.
    for fields in (ours, theirs):
        for name in (b"created_at", b"enqueued_at"):
            if name in fields:
                moment = fields.pop(name).decode()
                datetime.strptime(moment, "%Y-%m-%dT%H:%M:%S.%fZ")
    # JSON fields: compare what they say, not their spacing (nor the compression).
    data = [zlib.decompress(fields.pop(b"data")) for fields in (ours, theirs)]
    assert json.loads(data[0]) == json.loads(data[1])
    intervals = [fields.pop(b"retry_intervals", b"null") for fields in (ours, theirs)]
    assert json.loads(intervals[0]) == json.loads(intervals[1])
    if "delay_seconds" in options:  # two due times, a moment apart
        metas = [json.loads(fields.pop(b"meta")) for fields in (ours, theirs)]
        assert metas[0].keys() == metas[1].keys() == {"max_retries", "run_at"}
    assert ours == theirs


def test_an_enqueue_sent_twice_queues_the_task_once(queue_settings: Settings) -> None:
    """redis-py repeats a call whose connection failed, even if the call had reached
    Redis: the enqueue script must leave one job, queued once. (Plain RQ's
    enqueue, sent twice, queues twice: docs/phase2.md.)"""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))
    with TestClient(phase3_production.create_app(queue_settings)) as client:
        task = submit(client, "echo", value="once")
    job_key = f"rq:job:{task['id']}"
    queue_key = f"rq:queue:{queue_settings.queue_name}"
    index = index_key(queue_settings)
    member = position(task["id"], datetime.fromisoformat(task["created_at"]))
    flat = [item for pair in connection.hgetall(job_key).items() for item in pair]
    keys = ["", index, job_key, queue_key, queue_key]
    args = [f" {task['id']}", 60, task["id"], member, "", len(flat), *flat]
    again = connection.eval(ENQUEUE, len(keys), *keys, *args)
    assert again is None
    queued = connection.lrange(queue_key, 0, -1)
    assert queued == [task["id"].encode()]
    assert connection.zcard(index) == 1
    drain_queue(queue_settings)


def rq_cli(settings: Settings, *args: str) -> None:
    rq = str(Path(sys.executable).parent / "rq")
    url = ["--url", str(settings.redis_url)]
    subprocess.run([rq, *args, *url], check=True, capture_output=True, timeout=30)


def test_the_worker_skips_round_trips_but_not_what_rq_tools_show(
    queue_settings: Settings,
) -> None:
    """Phase 3's worker writes its state and heartbeat less often than RQ's: rq
    info and the dashboard must still see busy and idle, and `rq suspend` must
    still hold it back from new jobs."""
    connection = redis.Redis.from_url(str(queue_settings.redis_url))

    def states() -> set[bytes]:
        keys = connection.smembers(f"rq:workers:{queue_settings.queue_name}")
        return {connection.hget(key, "state") or b"" for key in keys}

    worker = start_worker(queue_settings, phase=3)
    try:
        with TestClient(phase3_production.create_app(queue_settings)) as client:
            task = submit(client, "sleep", seconds=1)
            wait_for(client, task["id"], "running")
            assert states() == {b"busy"}
            wait_for(client, task["id"])
            deadline = time.monotonic() + 5
            while states() != {b"idle"} and time.monotonic() < deadline:
                time.sleep(0.05)
            assert states() == {b"idle"}

            # A suspended worker finishes its job, then takes no other.
            busy = submit(client, "sleep", seconds=1.5)
            wait_for(client, busy["id"], "running")
            rq_cli(queue_settings, "suspend")
            held = submit(client, "echo", value="held")
            wait_for(client, busy["id"])
            time.sleep(1.5)
            assert client.get(f"/tasks/{held['id']}").json()["status"] == "queued"
            rq_cli(queue_settings, "resume")
            assert wait_for(client, held["id"])["status"] == "succeeded"
    finally:
        rq_cli(queue_settings, "resume")
        worker.kill()
        worker.wait()
